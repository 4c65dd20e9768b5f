// quantized_linear for the CUDA dispatch key (formats: common/quantized_linear.h and the schema).
//
// Few rows (decode): one warp per output channel streams its packed weight row once, dequantizes
// in registers and accumulates all rows of x at once (x, a few KB, stays in L1/L2); the warp's sum
// goes to each row's output. Many rows: the weights are dequantized into a tensor of the input's
// dtype by one elementwise kernel and the library GEMM (at::linear) runs the product.
// int8_dynamic quantizes the input rows as the CPU does (scale max|x| / 127, round to nearest) and
// multiplies the dequantized integers with the library GEMM: the same values as int32 sums up to
// float rounding.
#include <torch/library.h>

#include "common/glue.h"
#include "common/quantized_linear.h"
#include "fusedformer/cuda/device.h"

namespace fusedformer::cuda {
namespace {

constexpr int kFewRows = 16;
constexpr int kWarps = 8;  // warps (output channels) per block of the streaming kernel

// element k of row n of the packed weights, dequantized
__device__ __forceinline__ float qvalue(const void* qw, const float* scale, int64_t n, int64_t k, int64_t K,
                                        int64_t group, bool int4) {
  if (int4) {
    const uint8_t* row = static_cast<const uint8_t*>(qw) + n * (K / 2);
    const int64_t j = k % 32;
    const uint8_t b = row[(k - j) / 2 + (j & 15)];
    const int q = (j < 16 ? (b & 15) : (b >> 4)) - 8;
    return float(q) * scale[n * (K / group) + k / group];
  }
  return float(static_cast<const int8_t*>(qw)[n * K + k]) * scale[n];
}

template <typename T, bool INT4>
__global__ void stream_kernel(const T* __restrict__ x, const void* __restrict__ qw, const float* __restrict__ scale,
                              const T* __restrict__ bias, T* __restrict__ y, int M, int64_t N, int64_t K,
                              int64_t ldx, int64_t group) {
  using C = compute_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  C acc[kFewRows];
#pragma unroll
  for (int i = 0; i < kFewRows; ++i) acc[i] = C(0);
  // each lane takes consecutive elements: one byte pair (int4) or byte (int8) apart from its neighbours
  for (int64_t k = lane; k < K; k += 32) {
    const C w = C(qvalue(qw, scale, n, k, K, group, INT4));
#pragma unroll
    for (int i = 0; i < kFewRows; ++i)
      if (i < M) acc[i] += C(to_f(x[i * ldx + k])) * w;
  }
#pragma unroll
  for (int i = 0; i < kFewRows; ++i) {
    if (i >= M) break;
    const C s = warp_sum(acc[i]);
    if (lane == 0) y[i * N + n] = from_c<T>(s + (bias ? C(to_f(bias[n])) : C(0)));
  }
}

template <typename T>
__global__ void dequant_kernel(const void* __restrict__ qw, const float* __restrict__ scale, T* __restrict__ w,
                               int64_t N, int64_t K, int64_t group, bool int4) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * K; i += int64_t(gridDim.x) * blockDim.x)
    w[i] = from_c<T>(compute_t<T>(qvalue(qw, scale, i / K, i % K, K, group, int4)));
}

at::Tensor dequantize(const at::Tensor& qw, const at::Tensor& scale, const QuantizedLinearShape& s,
                      at::ScalarType dtype) {
  at::Tensor w = at::empty({s.N, s.K}, qw.options().dtype(dtype));
  const int64_t total = s.N * s.K;
  if (total == 0) return w;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>(ceil_div(total, threads), int64_t(sm_count()) * 8));
  dispatch_dtype(dtype_of(w), [&](auto tag) {
    using T = decltype(tag);
    dequant_kernel<T><<<blocks, threads, 0, current_stream()>>>(qw.data_ptr(), scale.data_ptr<float>(),
                                                                 static_cast<T*>(w.data_ptr()), s.N, s.K,
                                                                 s.group_size, s.scheme == QuantScheme::Int4);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return w;
}

at::Tensor quantized_linear(const at::Tensor& input, const at::Tensor& qweight, const at::Tensor& scale,
                            const std::optional<at::Tensor>& bias, c10::string_view scheme) {
  const QuantizedLinearShape s =
      check_quantized_linear(input, qweight, scale, bias, std::string_view(scheme.data(), scheme.size()));
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor qw = qweight.contiguous(), sc = scale.contiguous();
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  if (s.scheme == QuantScheme::Int8Dynamic) {
    at::Tensor xf = input.to(at::kFloat);
    at::Tensor amax = xf.abs().amax(-1, true);
    at::Tensor inv = at::where(amax > 0, amax.reciprocal() * 127.0, at::zeros_like(amax));
    at::Tensor xq = (xf * inv).clamp(-127, 127).round() * (amax / 127.0);
    at::Tensor y = at::linear(xq, dequantize(qw, sc, s, at::kFloat), b.defined() ? b.to(at::kFloat) : b);
    return y.to(input.scalar_type());
  }
  if (s.M > kFewRows) return at::linear(input, dequantize(qw, sc, s, input.scalar_type()), b);
  auto out_shape = input.sizes().vec();
  out_shape.back() = s.N;
  at::Tensor y = at::empty(out_shape, input.options().memory_format(at::MemoryFormat::Contiguous));
  if (s.M == 0 || s.N == 0) return y;
  at::Tensor x2 = input.reshape({s.M, s.K}).contiguous();
  const int blocks = int(ceil_div(s.N, kWarps));
  dispatch_dtype(dtype_of(input), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x2.data_ptr());
    const T* bp = b.defined() ? static_cast<const T*>(b.data_ptr()) : nullptr;
    T* yp = static_cast<T*>(y.data_ptr());
    if (s.scheme == QuantScheme::Int4)
      stream_kernel<T, true><<<blocks, kWarps * 32, 0, current_stream()>>>(
          xp, qw.data_ptr(), sc.data_ptr<float>(), bp, yp, int(s.M), s.N, s.K, s.K, s.group_size);
    else
      stream_kernel<T, false><<<blocks, kWarps * 32, 0, current_stream()>>>(
          xp, qw.data_ptr(), sc.data_ptr<float>(), bp, yp, int(s.M), s.N, s.K, s.K, s.group_size);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CUDA, m) { m.impl("quantized_linear", &quantized_linear); }

}  // namespace fusedformer::cuda
