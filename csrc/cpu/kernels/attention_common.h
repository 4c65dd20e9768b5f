// Building blocks of the CPU attention kernels (forward and backward): a register-tiled float32
// matrix product, packing of (strided, any-dtype) tiles into float32 buffers, masking and dropout.
// Included by attention_fwd_kernel.cpp and attention_bwd_kernel.cpp, once per instruction set.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>

#include "fusedformer/cpu/vec.h"
#include "fusedformer/philox.h"

namespace fusedformer::cpu::FF_ISA {

// Micro tile: MR rows x NV vectors of accumulators held in registers.
#if defined(__AVX512F__)
inline constexpr int MR = 12, NV = 2;
#elif defined(__AVX2__)
inline constexpr int MR = 6, NV = 2;
#else
inline constexpr int MR = 2, NV = 1;
#endif
inline constexpr int NW = NV * W;

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;
inline constexpr float kInf = std::numeric_limits<float>::infinity();

// Tile sizes: BR query rows per work item, BC keys per block (a multiple of NW).
inline constexpr int64_t BR = 64;
inline constexpr int64_t BC = 4 * NW;

FF_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
FF_INLINE int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// 64-byte aligned float buffer
struct FBuf {
  float* p = nullptr;
  FBuf() = default;
  explicit FBuf(int64_t n) { p = static_cast<float*>(::operator new[](std::max<int64_t>(n, 1) * sizeof(float), std::align_val_t(64))); }
  ~FBuf() {
    if (p) ::operator delete[](p, std::align_val_t(64));
  }
  FBuf(const FBuf&) = delete;
  FBuf& operator=(const FBuf&) = delete;
  float* get() const { return p; }
};

// C[M x V*W] (+)= sum_k A(i, k) * B[k, :], A(i, k) = A[i*as + k*ak], B rows ldb apart.
template <int M, int V, bool ACC>
FF_INLINE void ukernel(int64_t K, const float* A, int64_t as, int64_t ak, const float* B, int64_t ldb, float* C,
                       int64_t ldc) {
  vf c[M][V];
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < V; ++v) c[i][v] = ACC ? vload(C + i * ldc + v * W) : vzero();
  for (int64_t k = 0; k < K; ++k) {
    vf b[V];
    for (int v = 0; v < V; ++v) b[v] = vload(B + k * ldb + v * W);
    const float* a = A + k * ak;
    for (int i = 0; i < M; ++i) {
      const vf ai = vset1(a[i * as]);
      for (int v = 0; v < V; ++v) c[i][v] += ai * b[v];
    }
  }
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < V; ++v) vstore(C + i * ldc + v * W, c[i][v]);
}

template <int V, bool ACC, int R = MR - 1>
FF_INLINE void ukernel_rows(int r, int64_t K, const float* A, int64_t as, int64_t ak, const float* B, int64_t ldb,
                            float* C, int64_t ldc) {
  if constexpr (R >= 1) {
    if (r == R) {
      ukernel<R, V, ACC>(K, A, as, ak, B, ldb, C, ldc);
      return;
    }
    ukernel_rows<V, ACC, R - 1>(r, K, A, as, ak, B, ldb, C, ldc);
  }
}

// C[M x N] (+)= A[M x K] B[K x N]; N a multiple of W.
template <bool ACC>
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t as, int64_t ak, const float* B, int64_t ldb,
                 float* C, int64_t ldc) {
  int64_t j = 0;
  for (; j + NW <= N; j += NW) {
    int64_t i = 0;
    for (; i + MR <= M; i += MR) ukernel<MR, NV, ACC>(K, A + i * as, as, ak, B + j, ldb, C + i * ldc + j, ldc);
    if (i < M) ukernel_rows<NV, ACC>(int(M - i), K, A + i * as, as, ak, B + j, ldb, C + i * ldc + j, ldc);
  }
  if constexpr (NV > 1) {
    for (; j < N; j += W) {
      int64_t i = 0;
      for (; i + MR <= M; i += MR) ukernel<MR, 1, ACC>(K, A + i * as, as, ak, B + j, ldb, C + i * ldc + j, ldc);
      if (i < M) ukernel_rows<1, ACC>(int(M - i), K, A + i * as, as, ak, B + j, ldb, C + i * ldc + j, ldc);
    }
  }
}

// dst[r][c] = scale * src(row0 + r, c) for r < rows, c < cols; zero up to (rows_pad, ld).
template <typename T>
inline void pack_rows(const T* src, int64_t sl, int64_t se, int64_t rows, int64_t cols, float scale, float* dst,
                      int64_t ld, int64_t rows_pad) {
  const vf vs = vset1(scale);
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * sl;
    float* d = dst + r * ld;
    int64_t c = 0;
    if (se == 1) {
      for (; c + W <= cols; c += W) vstore(d + c, vload(s + c) * vs);
    }
    for (; c < cols; ++c) d[c] = to_float(s[c * se]) * scale;
    for (; c < ld; ++c) d[c] = 0.f;
  }
  for (int64_t r = rows; r < rows_pad; ++r)
    for (int64_t c = 0; c < ld; ++c) dst[r * ld + c] = 0.f;
}

// dst[c][r] = src(row r, col c) for r < rows, c < cols; columns r in [rows, ld) are zero.
template <typename T>
inline void pack_transposed(const T* src, int64_t sl, int64_t se, int64_t rows, int64_t cols, float* dst,
                            int64_t ld) {
  for (int64_t c = 0; c < cols; ++c) {
    float* d = dst + c * ld;
    const T* s = src + c * se;
    int64_t r = 0;
    for (; r < rows; ++r) d[r] = to_float(s[r * sl]);
    for (; r < ld; ++r) d[r] = 0.f;
  }
}

// Base-2 logits of a tile: apply the mask (additive, scaled by log2 e, or bool), the causal rule
// (key j > query i is dropped) and the sequence end (keys >= S). Rows i0.., keys j0...
template <MaskKind MK>
inline void mask_tile(float* s, int64_t lds, int64_t rows, int64_t i0, int64_t j0, int64_t valid, const void* mask,
                      int64_t m_sl, int64_t m_ss, bool causal) {
  const float ninf = -kInf;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * lds;
    const int64_t i = i0 + r;
    int64_t lim = valid;  // keys [lim, BC) are dropped
    if (causal) lim = std::min<int64_t>(lim, std::max<int64_t>(0, i - j0 + 1));
    if constexpr (MK == MaskKind::Float) {
      const float* m = static_cast<const float*>(mask) + i * m_sl + j0 * m_ss;
      int64_t c = 0;
      if (m_ss == 1) {
        const vf l2e = vset1(kLog2e);
        for (; c + W <= lim; c += W) vstore(row + c, vload(row + c) + vload(m + c) * l2e);
      }
      for (; c < lim; ++c) row[c] += m[c * m_ss] * kLog2e;
    } else if constexpr (MK == MaskKind::Bool) {
      const uint8_t* m = static_cast<const uint8_t*>(mask) + i * m_sl + j0 * m_ss;
      for (int64_t c = 0; c < lim; ++c)
        if (!m[c * m_ss]) row[c] = ninf;
    }
    for (int64_t c = lim; c < BC; ++c) row[c] = ninf;
  }
}

// Dropout: multiplies row `r` of p (keys j0 .. j0+cols) by keep / (1 - p_drop).
struct Dropout {
  uint64_t seed;
  uint32_t threshold;
  float scale;  // 1 / (1 - p)
  bool on;
  explicit Dropout(float p, uint64_t s)
      : seed(s), threshold(dropout_threshold(p)), scale(p > 0.f ? 1.f / (1.f - p) : 1.f), on(p > 0.f) {}
  FF_INLINE void apply(float* row, int64_t cols, uint64_t bh, int64_t i, int64_t j0) const {
    // j0 is a multiple of 4 (BC is), so columns group in fours as dropout_bits4 numbers them
    for (int64_t c = 0; c < cols; c += 4) {
      Philox4 b = dropout_bits4(seed, bh, uint32_t(i), uint32_t((j0 + c) >> 2));
      const int64_t n = std::min<int64_t>(4, cols - c);
      for (int64_t t = 0; t < n; ++t) row[c + t] = b.v[t] >= threshold ? row[c + t] * scale : 0.f;
    }
  }
};

}  // namespace fusedformer::cpu::FF_ISA
