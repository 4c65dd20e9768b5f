// Device helpers shared by every CUDA kernel of fusedformer: element types and their conversion to
// the compute type, 16-byte vector access, warp and block reductions.
//
// Kernel translation units include this (and the other headers of this folder) without any torch
// header, so that they compile quickly and in parallel; the ATen glue (<op>.cu) passes them the
// argument structs of fusedformer/kernel_types.h and the current stream.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fusedformer/kernel_types.h"

namespace fusedformer::cuda {

using bf16 = __nv_bfloat16;
using f16 = __half;

// f(T{}) with T the kernel element type of the argument structs' dtype
template <typename F>
inline void dispatch_dtype(DType dt, F&& f) {
  fusedformer::dispatch_dtype<ElementTypes<float, bf16, f16, double>>(dt, static_cast<F&&>(f));
}

// compute type: double for double, float otherwise (as on the CPU)
template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};
template <typename T>
using compute_t = typename Compute<T>::type;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename C>
__device__ __forceinline__ C to_c(float v) {
  return v;
}
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(f16 v) { return __half2float(v); }
__device__ __forceinline__ double to_f(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_c(float v);
template <>
__device__ __forceinline__ float from_c<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ bf16 from_c<bf16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ f16 from_c<f16>(float v) {
  return __float2half_rn(v);
}
template <typename T>
__device__ __forceinline__ T from_c(double v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ double from_c<double>(double v) {
  return v;
}

template <typename C>
__device__ __forceinline__ C c_inf() {
  return C(__builtin_huge_val());
}
template <typename C>
__device__ __forceinline__ C c_nan() {
  return C(__builtin_nan(""));
}

// exp in the compute type (fast for float, exact for double)
__device__ __forceinline__ float c_exp(float x) { return __expf(x); }
__device__ __forceinline__ double c_exp(double x) { return exp(x); }
__device__ __forceinline__ float c_rsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double c_rsqrt(double x) { return 1.0 / sqrt(x); }

// max that ignores NaN (a NaN is caught separately)
template <typename C>
__device__ __forceinline__ C c_max(C a, C b) {
  return a > b ? a : b;
}

// ---------------------------------------------------------------------------------------------
// 16-byte vectors of N = 16 / sizeof(T) elements

template <typename T>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / int(sizeof(T));
  T v[N];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load16(const T* p) {
  Vec16<T> r;
  *reinterpret_cast<uint4*>(&r) = __ldg(reinterpret_cast<const uint4*>(p));
  return r;
}
// streaming load: data read once (keeps L2 for what is reused)
template <typename T>
__device__ __forceinline__ Vec16<T> load16_stream(const T* p) {
  Vec16<T> r;
  *reinterpret_cast<uint4*>(&r) = __ldcs(reinterpret_cast<const uint4*>(p));
  return r;
}
template <typename T>
__device__ __forceinline__ void store16(T* p, const Vec16<T>& v) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&v);
}

__host__ __device__ inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---------------------------------------------------------------------------------------------
// reductions

template <typename C>
__device__ __forceinline__ C warp_sum(C v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename C>
__device__ __forceinline__ C warp_max(C v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = c_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum / max over a team of `team` consecutive threads (a multiple of 32, or 32 when a team is one
// warp): warp shuffles, then, for teams of several warps, `scratch` (one slot per warp of the
// block, in shared memory). Every thread of the team gets the result. All threads of the block
// must call it (it synchronizes the block when team > 32).
template <typename C, bool MAX>
__device__ __forceinline__ C team_reduce(C v, int team, C* scratch) {
  v = MAX ? warp_max(v) : warp_sum(v);
  if (team <= 32) return v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wpt = team >> 5;          // warps per team
  const int first = warp - warp % wpt;  // first warp of this team
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  C r = scratch[first];
  for (int w = 1; w < wpt; ++w) r = MAX ? c_max(r, scratch[first + w]) : r + scratch[first + w];
  return r;
}

}  // namespace fusedformer::cuda
