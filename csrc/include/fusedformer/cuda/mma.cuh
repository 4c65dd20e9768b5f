// Tensor-core building blocks (sm_80+): asynchronous global -> shared copies, swizzled shared
// tiles, ldmatrix fragment loads and the m16n8k16 bf16/fp16 matrix instruction with float32
// accumulation.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16 x 16, row major), 4 registers of 2 halves: a0 (row g, cols 2t..2t+1), a1 (row g+8, same
//     cols), a2 (row g, cols 2t+8..), a3 (row g+8, cols 2t+8..).
//   B (16 x 8, k x n), 2 registers: b0 (k 2t..2t+1, col g), b1 (k 2t+8.., col g).
//   C (16 x 8 float): c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, cols 2t, 2t+1).
#pragma once

#include "fusedformer/cuda/common.cuh"

namespace fusedformer::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, zero-filled when !valid (src is then not read)
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// A shared tile of ROWS x COLS 16-bit elements, row major, whose 16-byte chunks are XOR-swizzled
// by the row (chunk c of row r is stored at chunk c ^ (r % 8)), so that the eight rows an ldmatrix
// reads at one logical chunk fall in eight different bank groups, and so do cp.async writes.
template <int ROWS, int COLS>
struct STile {
  static_assert(COLS % 64 == 0, "a swizzled row spans at least 8 chunks of 16 bytes");
  static constexpr int kElems = ROWS * COLS;
  static __device__ __forceinline__ int offset(int r, int c) {
    return r * COLS + ((((c >> 3) ^ r) & 7) | ((c >> 3) & ~7)) * 8 + (c & 7);
  }
};

// Copies rows [0, ROWS) of a global matrix (row stride ld elements, unit column stride) into the
// tile: rows >= nrows and columns >= ncols (a multiple of 8) are zero. All NT threads take part.
template <int ROWS, int COLS, int NT, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* src, int64_t ld, int nrows, int ncols) {
  constexpr int kChunksPerRow = COLS / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
  for (int c = threadIdx.x; c < kChunks; c += NT) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool valid = r < nrows && col < ncols;
    cp_async16(tile + STile<ROWS, COLS>::offset(r, col), valid ? src + r * ld + col : src, valid);
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Fragment loads from a swizzled tile (lane = threadIdx.x % 32):
// A fragment of rows m0.., k cols k0.. of a tile stored [M][K]
template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void lds_a(uint32_t (&a)[4], const T* tile, int m0, int k0, int lane) {
  const int r = m0 + (lane & 7) + ((lane >> 3) & 1) * 8, c = k0 + (lane >> 4) * 8;
  ldmatrix_x4(a, tile + STile<ROWS, COLS>::offset(r, c));
}
// A fragment of rows m0.., k cols k0.. of a tile stored transposed, [K][M]
template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void lds_a_t(uint32_t (&a)[4], const T* tile, int m0, int k0, int lane) {
  const int r = k0 + (lane & 7) + (lane >> 4) * 8, c = m0 + ((lane >> 3) & 1) * 8;
  ldmatrix_x4_trans(a, tile + STile<ROWS, COLS>::offset(r, c));
}
// B fragments of the two n-tiles n0, n0+8 at k rows k0.. of a tile stored [N][K]:
// {b[0], b[1]} for n0, {b[2], b[3]} for n0 + 8
template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void lds_b(uint32_t (&b)[4], const T* tile, int n0, int k0, int lane) {
  const int r = n0 + (lane & 7) + (lane >> 4) * 8, c = k0 + ((lane >> 3) & 1) * 8;
  ldmatrix_x4(b, tile + STile<ROWS, COLS>::offset(r, c));
}
// the same from a tile stored [K][N]
template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void lds_b_t(uint32_t (&b)[4], const T* tile, int n0, int k0, int lane) {
  const int r = k0 + (lane & 7) + ((lane >> 3) & 1) * 8, c = n0 + (lane >> 4) * 8;
  ldmatrix_x4_trans(b, tile + STile<ROWS, COLS>::offset(r, c));
}

// c += a b: one m16n8k16 tensor-core product with float accumulators
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
#define FF_MMA16816(T, PTX)                                                                        \
  template <>                                                                                      \
  __device__ __forceinline__ void mma16816<T>(float(&c)[4], const uint32_t(&a)[4], uint32_t b0,   \
                                              uint32_t b1) {                                      \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX                              \
                 ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"         \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                 \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                 \
  }
FF_MMA16816(bf16, "bf16")
FF_MMA16816(f16, "f16")
#undef FF_MMA16816

template <int MT, int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][n][e] = 0.f;
}

// acc[mt][2 np] and acc[mt][2 np + 1] += a[mt] times the two 8-column halves of the 16 x 16 B
// fragment b (as lds_b / lds_b_t load it), for every row tile mt
template <typename T, int MT, int NT>
__device__ __forceinline__ void mma_pair(float (&acc)[MT][NT][4], const uint32_t (&a)[MT][4], const uint32_t (&b)[4],
                                         int np) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    mma16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
    mma16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
  }
}

// acc += a B for the warp's 16-column pairs np of B from column n0 (with ALL_COLS false, only the
// pairs that start below `limit`), B read from a ROWS x COLS tile stored [N][K] (lds_b) or, with
// TRANS, [K][N] (lds_b_t)
template <bool TRANS, int ROWS, int COLS, bool ALL_COLS, typename T, int MT, int NT>
__device__ __forceinline__ void mma_tile(float (&acc)[MT][NT][4], const uint32_t (&a)[MT][4], const T* tile, int n0,
                                         int k0, int limit, int lane) {
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    if (ALL_COLS || n0 + np * 16 < limit) {
      uint32_t b[4];
      if constexpr (TRANS) {
        lds_b_t<ROWS, COLS>(b, tile, n0 + np * 16, k0, lane);
      } else {
        lds_b<ROWS, COLS>(b, tile, n0 + np * 16, k0, lane);
      }
      mma_pair<T>(acc, a, b, np);
    }
  }
}

// two floats -> a register of two 16-bit values (lo = a)
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<bf16>(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<f16>(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

// The A fragment (16 x 16) made of two C fragments (16 x 8 each, cols 0-7 and 8-15).
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// store the two values of a C fragment row half (cols 2t, 2t+1) into a swizzled tile
template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void sts_pair(T* tile, int r, int c, float v0, float v1) {
  *reinterpret_cast<uint32_t*>(tile + STile<ROWS, COLS>::offset(r, c)) = pack2<T>(v0, v1);
}

}  // namespace fusedformer::cuda
