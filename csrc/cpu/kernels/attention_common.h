// Building blocks of the CPU attention kernels (forward, decode and backward), written once for
// every compute type C (float, or double for float64 inputs): a register-tiled matrix product on
// packed panels, packing of strided tiles of any storage type into C buffers, masking, the base-2
// exponential of the softmax and dropout. Included once per instruction set by the
// attention_*_kernel.cpp translation units.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <new>
#include <type_traits>

#include "fusedformer/cpu/vec.h"
#include "fusedformer/philox.h"

namespace fusedformer::cpu::FF_ISA {

// ---------------------------------------------------------------------------------------------
// Register tile of the matrix product: MR rows x NV vectors of accumulators (plus NV vectors of
// the B panel and one broadcast) must fit the register file: 16 vector registers on AVX2, 32 on
// AVX-512; the generic build's 16-lane vectors take four SSE registers each.

template <typename C>
struct Tile {
#if defined(__AVX512F__)
  static constexpr int MR = 12, NV = 2;
#elif defined(__AVX2__)
  static constexpr int MR = 6, NV = 2;
#else
  static constexpr int MR = 2, NV = 1;
#endif
  static constexpr int N = lanes_v<C>;
  static constexpr int NW = NV * N;  // width of a packed B panel
};

// Keys per block (a multiple of every panel width, and of 4 for the dropout numbering).
inline constexpr int64_t BC = 64;
// Query rows per block: a multiple of the tile rows.
#if defined(__AVX512F__) || defined(__AVX2__)
inline constexpr int64_t BR = 48;
#else
inline constexpr int64_t BR = 32;
#endif

template <typename C>
inline constexpr C kLog2e = C(1.4426950408889634);
template <typename C>
inline constexpr C kLn2 = C(0.6931471805599453);
template <typename C>
inline constexpr C kInf = std::numeric_limits<C>::infinity();

FF_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
FF_INLINE int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// 64-byte aligned buffer of n elements of C.
template <typename C>
struct Buf {
  C* p = nullptr;
  Buf() = default;
  explicit Buf(int64_t n) {
    p = static_cast<C*>(::operator new[](std::max<int64_t>(n, 1) * sizeof(C), std::align_val_t(64)));
  }
  ~Buf() {
    if (p) ::operator delete[](p, std::align_val_t(64));
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  C* get() const { return p; }
};

// ---------------------------------------------------------------------------------------------
// Matrix product on packed panels.
//
// B (K x N, N a multiple of the vector width) is stored as column panels: the panel starting at
// column j holds min(NW, N - j) columns, row after row, at B + j * kst (kst >= K: the rows of a
// panel are contiguous, panels kst rows apart). A is read in place: A(i, k) = A[i * as + k * ak].

template <typename C, int M, int V, bool ACC>
FF_INLINE void ukernel(int64_t K, const C* A, int64_t as, int64_t ak, const C* B, int64_t ldb, C* Cm, int64_t ldc) {
  using Vec = vec_t<C>;
  constexpr int N = lanes_v<C>;
  Vec c[M][V];
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < V; ++v) c[i][v] = ACC ? vload(Cm + i * ldc + v * N) : Vec{};
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    Vec b[V];
    for (int v = 0; v < V; ++v) b[v] = vload(B + k * ldb + v * N);
    const C* a = A + k * ak;
    for (int i = 0; i < M; ++i) {
      const Vec ai = vbroadcast<C>(a[i * as]);
      for (int v = 0; v < V; ++v) c[i][v] += ai * b[v];
    }
  }
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < V; ++v) vstore(Cm + i * ldc + v * N, c[i][v]);
}

// rows [0, M) of one panel, in tiles of MR rows and one smaller tile for the rest
template <typename C, int V, bool ACC>
FF_INLINE void panel_rows(int64_t M, int64_t K, const C* A, int64_t as, int64_t ak, const C* B, int64_t ldb, C* Cm,
                          int64_t ldc) {
  constexpr int MR = Tile<C>::MR;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) ukernel<C, MR, V, ACC>(K, A + i * as, as, ak, B, ldb, Cm + i * ldc, ldc);
  const int r = int(M - i);
  if (r == 0) return;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((r == R + 1 ? ukernel<C, R + 1, V, ACC>(K, A + i * as, as, ak, B, ldb, Cm + i * ldc, ldc) : void()), ...);
  }(std::make_integer_sequence<int, MR - 1>{});
}

// Cm[M x N] (+)= A[M x K] B[K x N]
template <bool ACC, typename C>
inline void gemm(int64_t M, int64_t N, int64_t K, const C* A, int64_t as, int64_t ak, const C* B, int64_t kst, C* Cm,
                 int64_t ldc) {
  constexpr int L = lanes_v<C>, NW = Tile<C>::NW;
  int64_t j = 0;
  for (; j + NW <= N; j += NW) panel_rows<C, Tile<C>::NV, ACC>(M, K, A, as, ak, B + j * kst, NW, Cm + j, ldc);
  if constexpr (Tile<C>::NV > 1) {
    for (; j < N; j += L) panel_rows<C, 1, ACC>(M, K, A, as, ak, B + j * kst, L, Cm + j, ldc);
  }
}

// The same with a row-major B (row k at B + k * ldb, N a multiple of the vector width).
template <bool ACC, typename C>
inline void gemm_rm(int64_t M, int64_t N, int64_t K, const C* A, int64_t as, int64_t ak, const C* B, int64_t ldb,
                    C* Cm, int64_t ldc) {
  constexpr int L = lanes_v<C>, NW = Tile<C>::NW;
  int64_t j = 0;
  for (; j + NW <= N; j += NW) panel_rows<C, Tile<C>::NV, ACC>(M, K, A, as, ak, B + j, ldb, Cm + j, ldc);
  if constexpr (Tile<C>::NV > 1) {
    for (; j < N; j += L) panel_rows<C, 1, ACC>(M, K, A, as, ak, B + j, ldb, Cm + j, ldc);
  }
}

// ---------------------------------------------------------------------------------------------
// Packing (conversion to C happens here).

// d[0, n) = scale * s[c * se], d[n, w) = 0
template <typename T, typename C>
FF_INLINE void pack_segment(const T* s, int64_t se, int64_t n, int64_t w, C scale, vec_t<C> vs, C* d) {
  constexpr int N = lanes_v<C>;
  int64_t c = 0;
  if (se == 1)
    for (; c + N <= n; c += N) vstore(d + c, vload(s + c) * vs);
  for (; c < n; ++c) d[c] = C(to_float(s[c * se])) * scale;
  for (; c < w; ++c) d[c] = C(0);
}

// dst[r][c] = scale * src(r, c) for r < rows, c < cols; zero up to (rows_pad, ld).
template <typename T, typename C>
inline void pack_rows(const T* src, int64_t sl, int64_t se, int64_t rows, int64_t cols, C scale, C* dst, int64_t ld,
                      int64_t rows_pad) {
  const vec_t<C> vs = vbroadcast<C>(scale);
  for (int64_t r = 0; r < rows; ++r) pack_segment(src + r * sl, se, cols, ld, scale, vs, dst + r * ld);
  std::fill(dst + rows * ld, dst + rows_pad * ld, C(0));
}

// Column panels (see gemm) of the K x N matrix B(k, c) = scale * src(k, c), k < rows, c < cols,
// zero for k in [rows, rows_pad) and c in [cols, round_up(cols, lanes)).
template <typename T, typename C>
inline void pack_panels(const T* src, int64_t sl, int64_t se, int64_t rows, int64_t cols, C scale, C* dst,
                        int64_t kst, int64_t rows_pad) {
  constexpr int L = lanes_v<C>, NW = Tile<C>::NW;
  const int64_t np = round_up(cols, L);
  const vec_t<C> vs = vbroadcast<C>(scale);
  for (int64_t j = 0; j < np; j += NW) {
    const int64_t w = std::min<int64_t>(NW, np - j);
    C* d = dst + j * kst;
    const int64_t n = std::min<int64_t>(w, cols - j);
    for (int64_t k = 0; k < rows; ++k) pack_segment(src + k * sl + j * se, se, n, w, scale, vs, d + k * w);
    std::fill(d + rows * w, d + rows_pad * w, C(0));
  }
}

// Column panels of the transpose: B(k, c) = src(c, k) for c < rows (keys), k < cols (features);
// columns c in [rows, cols_pad) are zero. cols_pad is a multiple of the lane count.
template <typename T, typename C>
inline void pack_panels_t(const T* src, int64_t sl, int64_t se, int64_t rows, int64_t cols, C* dst, int64_t kst,
                          int64_t rows_pad) {
  constexpr int NW = Tile<C>::NW, L = lanes_v<C>;
  for (int64_t j = 0; j < rows_pad; j += NW) {
    const int64_t w = std::min<int64_t>(NW, rows_pad - j);
    C* d = dst + j * kst;
    const int64_t n = std::min<int64_t>(w, std::max<int64_t>(0, rows - j));
    if (n < w)
      for (int64_t k = 0; k < cols; ++k) std::fill(d + k * w + n, d + (k + 1) * w, C(0));
    if (se == 1 && n == w && w % L == 0 && cols >= L) {
      // a few source rows at a time, converted with vector loads, scattered into the panel
      for (int64_t c = 0; c < n; ++c) {
        const T* s = src + (j + c) * sl;
        int64_t k = 0;
        for (; k + L <= cols; k += L) {
          const vec_t<C> x = vload(s + k);
          for (int t = 0; t < L; ++t) d[(k + t) * w + c] = x[t];
        }
        for (; k < cols; ++k) d[k * w + c] = C(to_float(s[k]));
      }
    } else {
      for (int64_t c = 0; c < n; ++c) {
        const T* s = src + (j + c) * sl;
        for (int64_t k = 0; k < cols; ++k) d[k * w + c] = C(to_float(s[k * se]));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Softmax pieces.

// A row whose logits so far are all masked (-inf), or whose unmasked logits are NaN (max drops NaN):
// zero probabilities, and a NaN logit makes the row's sum l NaN (finish_row), as in softmax. Returns
// the output's scale factor (1).
template <typename C>
FF_INLINE C masked_row(C* s, C& l, int64_t width) {
  for (int64_t c = 0; c < width; ++c)
    if (s[c] != s[c]) l = s[c];
  std::fill(s, s + width, C(0));
  return C(1);
}

// Online softmax of one row of base-2 logits s[0, NB * lanes): updates the running max m and sum l,
// turns s into probabilities (before dropout) and returns the factor the row's output must be scaled
// by. NB is a compile-time count so that the row stays in registers.
template <typename C, int NB = int(BC) / lanes_v<C>>
FF_INLINE C softmax_block_row(C* s, C& m, C& l) {
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>, W = NB * N;
  V x[NB];
  V mx = vbroadcast<C>(-kInf<C>);
  for (int c = 0; c < NB; ++c) {
    x[c] = vload(s + c * N);
    mx = vmax(mx, x[c]);
  }
  const C m_new = std::max(m, hmax(mx));
  if (m_new == -kInf<C>) return masked_row(s, l, W);
  const V vm = vbroadcast<C>(m_new);
  V sum = V{};
  for (int c = 0; c < NB; ++c) {
    const V p = vexp2_nonpos(x[c] - vm);
    sum += p;
    vstore(s + c * N, p);
  }
  const C alpha = m == m_new ? C(1) : std::exp2(m - m_new);
  l = l * alpha + hsum(sum);
  m = m_new;
  return alpha;
}

// The same over s[0, width), width a multiple of the lane count and at most BC.
template <typename C>
FF_INLINE C softmax_row(C* s, C& m, C& l, int64_t width) {
  constexpr int N = lanes_v<C>, NBMAX = int(BC) / N;
  if (width == BC) return softmax_block_row<C, NBMAX>(s, m, l);
  C alpha = C(1);
  [&]<int... I>(std::integer_sequence<int, I...>) {
    ((width == int64_t(I + 1) * N ? (void)(alpha = softmax_block_row<C, I + 1>(s, m, l)) : void()), ...);
  }(std::make_integer_sequence<int, NBMAX - 1>{});
  return alpha;
}

// o[0, n) *= alpha (n a multiple of the lane count), skipped when alpha is 1.
template <typename C>
FF_INLINE void rescale_row(C* o, int64_t n, C alpha) {
  if (alpha == C(1)) return;
  const vec_t<C> va = vbroadcast<C>(alpha);
  for (int64_t c = 0; c < n; c += lanes_v<C>) vstore(o + c, vload(o + c) * va);
}

// Final output row dst[0, Ev) = o / l (zeros when l == 0: every key masked) and its natural-log
// log-sum-exp from the base-2 running max m and sum l (+inf when every key is masked).
template <typename T, typename C>
FF_INLINE void finish_row(const C* o, C m, C l, int64_t Ev, T* dst, C* lse) {
  constexpr int N = lanes_v<C>;
  // l is NaN when a logit was NaN: the output and lse are then NaN, not the zeros of a masked row
  const C inv = l > C(0) ? C(1) / l : (l == C(0) ? C(0) : l);
  *lse = l > C(0) ? (m + std::log2(l)) * kLn2<C> : (l == C(0) ? kInf<C> : l);
  const vec_t<C> vi = vbroadcast<C>(inv);
  int64_t c = 0;
  for (; c + N <= Ev; c += N) vstore(dst + c, vload(o + c) * vi);
  for (; c < Ev; ++c) dst[c] = to_storage<T>(o[c] * inv);
}

// The output row of (batch b, query head h, position i).
template <typename T>
FF_INLINE T* out_row(const AttnFwdArgs& a, int64_t b, int64_t h, int64_t i) {
  return static_cast<T*>(a.out) + b * a.o_sb + h * a.o_sh + i * a.o_sl;
}

// Base-2 logits of a tile s[rows][width] (rows i0.., keys j0..): add the mask (additive, times
// log2 e) or drop (bool), drop keys j > i when causal and keys at or beyond `valid`.
template <MaskKind MK, typename C>
inline void mask_tile(C* s, int64_t lds, int64_t rows, int64_t i0, int64_t j0, int64_t valid, const void* mask,
                      int64_t m_sl, int64_t m_ss, bool causal, int64_t width = BC) {
  constexpr int N = lanes_v<C>;
  const C ninf = -kInf<C>;
  for (int64_t r = 0; r < rows; ++r) {
    C* row = s + r * lds;
    const int64_t i = i0 + r;
    int64_t lim = valid;  // keys [lim, width) are dropped
    if (causal) lim = std::min<int64_t>(lim, std::max<int64_t>(0, i - j0 + 1));
    if constexpr (MK == MaskKind::Float) {
      const C* m = static_cast<const C*>(mask) + i * m_sl + j0 * m_ss;
      int64_t c = 0;
      if (m_ss == 1) {
        const vec_t<C> l2e = vbroadcast<C>(kLog2e<C>);
        for (; c + N <= lim; c += N) vstore(row + c, vload(row + c) + vload(m + c) * l2e);
      }
      for (; c < lim; ++c) row[c] += m[c * m_ss] * kLog2e<C>;
    } else if constexpr (MK == MaskKind::Bool) {
      const uint8_t* m = static_cast<const uint8_t*>(mask) + i * m_sl + j0 * m_ss;
      for (int64_t c = 0; c < lim; ++c)
        if (!m[c * m_ss]) row[c] = ninf;
    }
    for (int64_t c = lim; c < width; ++c) row[c] = ninf;
  }
}

// The mask's slice of (batch b, query head h), or nullptr.
template <MaskKind MK, typename C>
FF_INLINE const void* mask_at(const AttnFwdArgs& a, int64_t b, int64_t h) {
  if constexpr (MK == MaskKind::None) {
    return nullptr;
  } else {
    const int64_t off = b * a.m_sb + h * a.m_sh;
    if constexpr (MK == MaskKind::Float) return static_cast<const C*>(a.mask) + off;
    return static_cast<const uint8_t*>(a.mask) + off;
  }
}

// Dropout: multiplies row entries by keep / (1 - p); the keep bit of (bh, query i, key j) is
// Philox's (see philox.h), so any tiling draws the same mask.
template <typename C>
struct Dropout {
  uint64_t seed;
  uint32_t threshold;
  C scale;  // 1 / (1 - p)
  bool on;
  Dropout(double p, uint64_t s)
      : seed(s), threshold(dropout_threshold(p)), scale(p > 0.0 ? C(1.0 / (1.0 - p)) : C(1)), on(p > 0.0) {}
  // keys j0 .. j0 + cols of row i; j0 is a multiple of 4
  FF_INLINE void apply(C* row, int64_t cols, uint64_t bh, int64_t i, int64_t j0) const {
    for (int64_t c = 0; c < cols; c += 4) {
      const Philox4 b = dropout_bits4(seed, bh, uint32_t(i), uint32_t((j0 + c) >> 2));
      const int64_t n = std::min<int64_t>(4, cols - c);
      for (int64_t t = 0; t < n; ++t) row[c + t] = b.v[t] >= threshold ? row[c + t] * scale : C(0);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Dynamic scheduling: worker(take) runs once per thread of the pool (with its own buffers) and
// calls take() for the next item index, -1 when none is left; items are handed out 0, 1, 2, ... so
// callers order them longest first where their costs differ (e.g. causal query blocks).
template <typename F>
inline void run_items(int64_t items, const F& worker) {
  if (items <= 0) return;
  std::atomic<int64_t> next{0};
  const auto take = [&]() -> int64_t {
    const int64_t it = next.fetch_add(1, std::memory_order_relaxed);
    return it < items ? it : -1;
  };
  const int64_t workers = std::min<int64_t>(items, num_threads());
  parallel_for(0, workers, 1, [&](int64_t s, int64_t e) {
    for (int64_t w = s; w < e; ++w) worker(take);
  });
}

// Decode path (attention_decode_kernel.cpp): few query rows per key/value head.
bool attention_decode_applies(const AttnFwdArgs& a);
void attention_decode(const AttnFwdArgs& a);

}  // namespace fusedformer::cpu::FF_ISA
