// quantized_linear for the CUDA dispatch key (formats: common/quantized_linear.h and the schema).
//
// Few rows (decode): each warp streams the packed weight rows of CPW output channels once, 16 bytes
// per lane per load (16 int8 or 32 4-bit weights), dequantizes them in registers and multiplies them
// with every row of x at once (x, a few hundred KB at most, is served by L1/L2); the lanes' sums are
// added by shuffles. nf4's levels come from a 16-entry table in shared memory (lanes reading different
// entries hit different banks), int4's are computed. 4-bit group scales apply to each lane's 32-weight
// partial sums (a group is a multiple of 32 weights), int8's channel scale to the final sum. Shapes or
// pointers that do not allow 16-byte loads (int8 with K not a multiple of 16, float64) take a scalar
// form of the kernel. Many rows: the weights are dequantized into a tensor of the input's dtype by one
// elementwise kernel and the library GEMM (at::linear) runs the product.
// int8_dynamic quantizes the input rows as the CPU does (scale max|x| / 127, round to nearest) and
// multiplies the dequantized integers with the library GEMM: the same values as int32 sums up to
// float rounding.
#include <torch/library.h>

#include "common/glue.h"
#include "common/quantized_linear.h"
#include "fusedformer/cuda/device.h"

#include <type_traits>

namespace fusedformer::cuda {
namespace {

constexpr int kFewRows = 16;
constexpr int kWarps = 4;  // warps per block of the streaming kernels

// The 4-bit scheme's 16 levels in shared memory; every thread of the block calls this before any
// returns (it synchronizes the block).
__device__ __forceinline__ const float* shared_levels(const Levels4& l) {
  __shared__ float lv[16];
  if (threadIdx.x < 16) lv[threadIdx.x] = l.v[threadIdx.x];
  __syncthreads();
  return lv;
}

// element k of row n of the packed weights, dequantized (lv: the 4-bit levels, null for int8)
__device__ __forceinline__ float qvalue(const void* qw, const float* scale, int64_t n, int64_t k, int64_t K,
                                        int64_t group, const float* lv) {
  if (lv) {
    const uint8_t* row = static_cast<const uint8_t*>(qw) + n * (K / 2);
    const int64_t j = k % 32;
    const uint8_t b = row[(k - j) / 2 + (j & 15)];
    return lv[j < 16 ? (b & 15) : (b >> 4)] * scale[n * (K / group) + k / group];
  }
  return float(static_cast<const int8_t*>(qw)[n * K + k]) * scale[n];
}

template <typename T>
__global__ void stream_kernel(const T* __restrict__ x, const void* __restrict__ qw, const float* __restrict__ scale,
                              const T* __restrict__ bias, T* __restrict__ y, int M, int64_t N, int64_t K,
                              int64_t ldx, int64_t group, bool four, Levels4 levels) {
  using C = compute_t<T>;
  const float* lv = four ? shared_levels(levels) : nullptr;
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  C acc[kFewRows];
#pragma unroll
  for (int i = 0; i < kFewRows; ++i) acc[i] = C(0);
  for (int64_t k = lane; k < K; k += 32) {
    const C w = C(qvalue(qw, scale, n, k, K, group, lv));
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

// 16 consecutive elements of x from p (16-byte aligned) as floats
template <typename T>
__device__ __forceinline__ void load_x16(const T* p, float* out) {
  constexpr int V = Vec16<T>::N;
#pragma unroll
  for (int h = 0; h < 16 / V; ++h) {
    const Vec16<T> v = load16(p + h * V);
#pragma unroll
    for (int j = 0; j < V; ++j) out[h * V + j] = to_f(v.v[j]);
  }
}

// weight j (0..15) of the 16 packed bytes: int8, or the low (HIGH false) / high nibble of a 4-bit
// scheme (nf4: its level from lv)
template <QuantScheme S, bool HIGH>
__device__ __forceinline__ float weight_at(const uint4& raw, int j, const float* lv) {
  const uint32_t word = (&raw.x)[j / 4];
  const uint32_t byte = (word >> (8 * (j % 4))) & 0xFFu;
  const uint32_t code = HIGH ? byte >> 4 : byte & 15u;
  if constexpr (S == QuantScheme::NF4) return lv[code];
  else if constexpr (S == QuantScheme::Int4) return float(int(code) - 8);
  else return float(int(int8_t(uint8_t(byte))));
}

// MR: rows of x handled (M <= MR); CPW: output channels per warp
template <typename T, QuantScheme S, int MR, int CPW>
__global__ void __launch_bounds__(kWarps * 32) stream_vec_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qw,
                                                                 const float* __restrict__ scale, const T* __restrict__ bias,
                                                                 T* __restrict__ y, int M, int64_t N, int64_t K,
                                                                 int64_t group, Levels4 levels) {
  constexpr bool INT4 = is_4bit(S);
  constexpr int PER = INT4 ? 32 : 16;  // weights per 16-byte load
  const float* lv = S == QuantScheme::NF4 ? shared_levels(levels) : nullptr;
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * CPW;
  if (n0 >= N) return;
  const int64_t row_bytes = INT4 ? K / 2 : K, groups = INT4 ? K / group : 1;
  float acc[MR][CPW];
#pragma unroll
  for (int i = 0; i < MR; ++i)
#pragma unroll
    for (int c = 0; c < CPW; ++c) acc[i][c] = 0.f;
  for (int64_t k0 = int64_t(lane) * PER; k0 < K; k0 += 32 * PER) {
    uint4 raw[CPW];
    float s[CPW];
#pragma unroll
    for (int c = 0; c < CPW; ++c) {
      const int64_t n = n0 + c < N ? n0 + c : N - 1;  // past the end: row N-1 again, not stored
      raw[c] = __ldcs(reinterpret_cast<const uint4*>(qw + n * row_bytes + (INT4 ? k0 / 2 : k0)));
      s[c] = INT4 ? scale[n * groups + k0 / group] : 1.f;
    }
#pragma unroll
    for (int half = 0; half < (INT4 ? 2 : 1); ++half) {
      float w[CPW][16];
#pragma unroll
      for (int c = 0; c < CPW; ++c)
#pragma unroll
        for (int j = 0; j < 16; ++j)
          w[c][j] = half ? weight_at<S, true>(raw[c], j, lv) : weight_at<S, false>(raw[c], j, lv);
#pragma unroll
      for (int i = 0; i < MR; ++i) {
        if (i < M) {
          float xv[16];
          load_x16(x + i * K + k0 + half * 16, xv);
#pragma unroll
          for (int c = 0; c < CPW; ++c) {
            float d = 0.f;
#pragma unroll
            for (int j = 0; j < 16; ++j) d = fmaf(xv[j], w[c][j], d);
            acc[i][c] = fmaf(s[c], d, acc[i][c]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int c = 0; c < CPW; ++c) {
    const int64_t n = n0 + c;
    const float sc = INT4 || n >= N ? 1.f : scale[n];
    const float b = bias && n < N ? to_f(bias[n]) : 0.f;
#pragma unroll
    for (int i = 0; i < MR; ++i) {
      if (i < M) {
        const float v = warp_sum(acc[i][c]);
        if (lane == 0 && n < N) y[i * N + n] = from_c<T>(compute_t<T>(v * sc + b));
      }
    }
  }
}

template <typename T, QuantScheme S, int MR>
void launch_stream_vec(const T* x, const uint8_t* qw, const float* scale, const T* bias, T* y, int M, int64_t N,
                       int64_t K, int64_t group) {
  constexpr int CPW = MR <= 4 ? 4 : 2;
  const int64_t blocks = ceil_div(N, int64_t(kWarps) * CPW);
  stream_vec_kernel<T, S, MR, CPW><<<unsigned(blocks), kWarps * 32, 0, current_stream()>>>(x, qw, scale, bias, y, M, N,
                                                                                           K, group, levels4(S));
}

template <typename T, QuantScheme S>
void launch_stream_vec_rows(const T* x, const uint8_t* qw, const float* scale, const T* bias, T* y, int M, int64_t N,
                            int64_t K, int64_t group) {
  if (M <= 1) launch_stream_vec<T, S, 1>(x, qw, scale, bias, y, M, N, K, group);
  else if (M <= 2) launch_stream_vec<T, S, 2>(x, qw, scale, bias, y, M, N, K, group);
  else if (M <= 4) launch_stream_vec<T, S, 4>(x, qw, scale, bias, y, M, N, K, group);
  else if (M <= 8) launch_stream_vec<T, S, 8>(x, qw, scale, bias, y, M, N, K, group);
  else launch_stream_vec<T, S, kFewRows>(x, qw, scale, bias, y, M, N, K, group);
}

template <typename T>
__global__ void dequant_kernel(const void* __restrict__ qw, const float* __restrict__ scale, T* __restrict__ w,
                               int64_t N, int64_t K, int64_t group, bool four, Levels4 levels) {
  const float* lv = four ? shared_levels(levels) : nullptr;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * K; i += int64_t(gridDim.x) * blockDim.x)
    w[i] = from_c<T>(compute_t<T>(qvalue(qw, scale, i / K, i % K, K, group, lv)));
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
                                                                 s.group_size, is_4bit(s.scheme), levels4(s.scheme));
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
  if (s.scheme == QuantScheme::Int8Dynamic || s.scheme == QuantScheme::Int4Dynamic) {
    // x quantized per row (int8_dynamic) or per block of 32 features (int4_dynamic)
    const int64_t block = s.scheme == QuantScheme::Int8Dynamic ? s.K : 32;
    at::Tensor xf = input.to(at::kFloat).reshape({s.M, s.K / block, block});
    at::Tensor amax = xf.abs().amax(-1, true);
    // 127 / max|x| in one division, as the CPU kernels round it
    at::Tensor inv = at::where(amax > 0, at::full_like(amax, 127.0) / amax, at::zeros_like(amax));
    at::Tensor xq = ((xf * inv).clamp(-127, 127).round() * (amax / 127.0)).reshape(input.sizes());
    at::Tensor y = at::linear(xq, dequantize(qw, sc, s, at::kFloat), b.defined() ? b.to(at::kFloat) : b);
    return y.to(input.scalar_type());
  }
  if (s.M > kFewRows) return at::linear(input, dequantize(qw, sc, s, input.scalar_type()), b);
  auto out_shape = input.sizes().vec();
  out_shape.back() = s.N;
  at::Tensor y = at::empty(out_shape, input.options().memory_format(at::MemoryFormat::Contiguous));
  if (s.M == 0 || s.N == 0) return y;
  at::Tensor x2 = input.reshape({s.M, s.K}).contiguous();
  const bool four = is_4bit(s.scheme);
  // 16-byte loads: the weight rows (K bytes or K / 2) and x's rows (K elements) start 16-byte aligned
  const bool vec = input.scalar_type() != at::kDouble && aligned16(qw.data_ptr()) && aligned16(x2.data_ptr()) &&
                   s.K % (four ? 32 : 16) == 0;
  dispatch_dtype(dtype_of(input), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x2.data_ptr());
    const T* bp = b.defined() ? static_cast<const T*>(b.data_ptr()) : nullptr;
    T* yp = static_cast<T*>(y.data_ptr());
    const auto* qp = static_cast<const uint8_t*>(qw.data_ptr());
    const float* sp = sc.data_ptr<float>();
    if constexpr (!std::is_same_v<T, double>) {
      if (vec) {
        if (s.scheme == QuantScheme::NF4)
          launch_stream_vec_rows<T, QuantScheme::NF4>(xp, qp, sp, bp, yp, int(s.M), s.N, s.K, s.group_size);
        else if (four)
          launch_stream_vec_rows<T, QuantScheme::Int4>(xp, qp, sp, bp, yp, int(s.M), s.N, s.K, s.group_size);
        else
          launch_stream_vec_rows<T, QuantScheme::Int8>(xp, qp, sp, bp, yp, int(s.M), s.N, s.K, s.group_size);
        return;
      }
    }
    const int blocks = int(ceil_div(s.N, kWarps));
    stream_kernel<T><<<blocks, kWarps * 32, 0, current_stream()>>>(xp, qp, sp, bp, yp, int(s.M), s.N, s.K, s.K,
                                                                   s.group_size, four, levels4(s.scheme));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CUDA, m) { m.impl("quantized_linear", &quantized_linear); }

}  // namespace fusedformer::cuda
