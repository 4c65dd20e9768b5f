// Row-wise kernels (softmax, layer_norm, rms_norm): each row of n contiguous elements is handled by
// a team of threads (one warp, or several warps of one block) that keeps the row in registers:
// thread `lane` of the team holds the 16-byte vectors lane, lane + team, lane + 2 team, ... so that
// every load and store of the team is coalesced. A block holds one or more teams.
#pragma once

#include "fusedformer/cuda/common.cuh"

namespace fusedformer::cuda {

struct RowPlan {
  int team = 0;   // threads per row (a power of two >= 32); 0: the row does not fit in registers
  int rows_per_block = 1;
  int nv = 0;     // vectors per thread
  int vec = 1;    // elements per vector
  int block = 0;  // threads per block
  int64_t grid = 0;
};

// Threads per block of the register-row kernels and of the long-row kernels (a block per row). The
// kernels declare these as launch bounds, so that the compiler keeps their registers within what a
// block of that size can be given (a row kernel's rows in registers would otherwise not launch).
constexpr int kRowsMaxThreads = 512;
constexpr int kLongRowThreads = 1024;

// The smallest team (32 .. max_team threads) that holds a row of n elements in max_vecs vectors of
// `vec` elements per thread; about 256 threads per block (never more than max(team, 256)).
inline RowPlan plan_rows(int64_t rows, int64_t n, int vec, int max_vecs, int max_team = kRowsMaxThreads) {
  RowPlan p;
  p.vec = vec;
  const int64_t vecs = ceil_div(n, vec);
  int team = 32;
  while (team < max_team && int64_t(team) * max_vecs < vecs) team *= 2;
  if (int64_t(team) * max_vecs < vecs) return p;
  p.team = team;
  p.nv = int(ceil_div(vecs, team));
  p.rows_per_block = team >= 256 ? 1 : 256 / team;
  p.block = p.team * p.rows_per_block;
  p.grid = ceil_div(rows, p.rows_per_block);
  return p;
}

// Position of this thread: its row (blockIdx.x * rows_per_block + team index) and lane in the team.
struct RowThread {
  int64_t row;
  int lane;
  __device__ __forceinline__ RowThread(int team) {
    const int t = threadIdx.x;
    row = int64_t(blockIdx.x) * (blockDim.x / team) + t / team;
    lane = t % team;
  }
};

// Loads the VEC elements of vector k (columns (k * team + lane) * VEC ...) of a row into `out` in
// the compute type; elements at or past `n` get `fill`.
template <int VEC, typename T, typename C>
__device__ __forceinline__ void load_vec(const T* row, int64_t col, int64_t n, C fill, C* out) {
  if constexpr (VEC == 1) {
    out[0] = col < n ? C(to_f(row[col])) : fill;
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector access is 16 bytes");
    if (col + VEC <= n) {
      Vec16<T> v = load16(row + col);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = C(to_f(v.v[i]));
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = col + i < n ? C(to_f(row[col + i])) : fill;
    }
  }
}

template <int VEC, typename T, typename C>
__device__ __forceinline__ void store_vec(T* row, int64_t col, int64_t n, const C* in) {
  if constexpr (VEC == 1) {
    if (col < n) row[col] = from_c<T>(in[0]);
  } else {
    if (col + VEC <= n) {
      Vec16<T> v;
#pragma unroll
      for (int i = 0; i < VEC; ++i) v.v[i] = from_c<T>(in[i]);
      store16(row + col, v);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        if (col + i < n) row[col + i] = from_c<T>(in[i]);
    }
  }
}

// Stores the thread's vectors k < nv of a row held in registers (as load_vec read them), element i
// of vector k being f(k, i).
template <int VEC, int MAXV, typename T, typename F>
__device__ __forceinline__ void store_row(T* row, int64_t n, int team, int lane, int nv, F&& f) {
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    if (k < nv) {
      decltype(f(0, 0)) o[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = f(k, i);
      store_vec<VEC>(row, (int64_t(k) * team + lane) * VEC, n, o);
    }
  }
}

// elements per 16-byte vector, or 1 when the rows cannot be read as aligned vectors
template <typename T>
inline int vec_width(int64_t n, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / int(sizeof(T));
  if (n % V != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 1;
  return V;
}

}  // namespace fusedformer::cuda
