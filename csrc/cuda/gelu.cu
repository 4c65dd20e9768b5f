// gelu / gelu_bwd for the CUDA dispatch key (the ops are common/gelu.h's): one grid-stride
// elementwise kernel per direction, with 16-byte accesses where the pointers allow, computed in
// float (double for double). The formulas are those of the CPU kernels
// (csrc/cpu/kernels/gelu_kernel.cpp): the tanh form as x / (1 + exp(-2u)), which neither cancels
// nor overflows into NaN for large |x|, and the exact form through erfc, which keeps the relative
// precision of the tail for negative x.
#include <torch/library.h>

#include <algorithm>

#include "common/gelu.h"
#include "common/glue.h"
#include "fusedformer/cuda/device.h"

namespace fusedformer::cuda {
namespace {

constexpr int kThreads = 256;

constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kTanhCubic = 0.044715;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)
constexpr double kInvSqrt2 = 0.70710678118654752440;

__device__ __forceinline__ float c_erfc(float x) { return erfcf(x); }
__device__ __forceinline__ double c_erfc(double x) { return ::erfc(x); }

template <typename C, bool TANH>
struct Gelu {
  // e^{-2u} = exp(x (kA + kB x^2)), u = sqrt(2/pi) (x + 0.044715 x^3)
  static constexpr C kA = C(-2 * kSqrt2OverPi), kB = C(-2 * kSqrt2OverPi * kTanhCubic);
  // past this |x|, e^{-2|u|} is 0 in C (the derivative exactly 1 or 0) and x^3 still finite
  static constexpr C kClamp = sizeof(C) == 8 ? C(30) : C(20);

  __device__ static __forceinline__ C fwd(C x) {
    if constexpr (TANH) {
      return x / (C(1) + c_exp(x * (kA + kB * (x * x))));
    } else {
      return x * (C(0.5) * c_erfc(-x * C(kInvSqrt2)));
    }
  }

  // tanh: from w = e^{-2|u|} in [0, 1] and r = 1 / (1 + w), s = (1 + tanh u) / 2 is r (u >= 0) or
  // w r, and s (1 - s) = w r^2; dy/dx = s + x 2u' s (1 - s). x - x is 0, or NaN at +-inf and NaN
  // (torch's gradient there) after the clamp has hidden them.
  __device__ static __forceinline__ C bwd(C g, C x) {
    if constexpr (TANH) {
      const C xc = x > kClamp ? kClamp : (x < -kClamp ? -kClamp : x);
      const C x2 = xc * xc;
      const C t = xc * (kA + kB * x2);  // -2u
      const C w = c_exp(xc > C(0) ? t : -t);
      const C r = C(1) / (C(1) + w);
      const C s = xc > C(0) ? r : w * r;
      const C du2 = C(2 * kSqrt2OverPi) + C(6 * kSqrt2OverPi * kTanhCubic) * x2;
      return g * (s + xc * du2 * (w * r * r)) + (x - x);
    } else {
      const C cdf = C(0.5) * c_erfc(-x * C(kInvSqrt2));
      return g * (cdf + x * c_exp(C(-0.5) * x * x) * C(kInvSqrt2Pi));
    }
  }
};

template <typename T, bool TANH, bool BWD>
__device__ __forceinline__ T gelu_at(T x, T g) {
  using C = compute_t<T>;
  using F = Gelu<C, TANH>;
  const C r = BWD ? F::bwd(C(to_f(g)), C(to_f(x))) : F::fwd(C(to_f(x)));
  return from_c<T>(r);
}

// out = gelu(x) (forward) or g * gelu'(x) (backward; g null in the forward). VEC: 16-byte
// accesses, all pointers 16-byte aligned; the last n % (16 / sizeof(T)) elements one by one.
template <typename T, bool TANH, bool BWD, bool VEC>
__global__ void gelu_kernel(const T* __restrict__ x, const T* __restrict__ g, T* __restrict__ out, int64_t n) {
  constexpr int N = Vec16<T>::N;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if constexpr (VEC) {
    const int64_t nv = n / N;
    for (int64_t i = tid; i < nv; i += stride) {
      const Vec16<T> xv = load16(x + i * N);
      Vec16<T> gv;
      if constexpr (BWD) gv = load16(g + i * N);
      Vec16<T> o;
#pragma unroll
      for (int k = 0; k < N; ++k) o.v[k] = gelu_at<T, TANH, BWD>(xv.v[k], BWD ? gv.v[k] : xv.v[k]);
      store16(out + i * N, o);
    }
    done = nv * N;
  }
  for (int64_t i = done + tid; i < n; i += stride) out[i] = gelu_at<T, TANH, BWD>(x[i], BWD ? g[i] : x[i]);
}

template <typename T, bool TANH, bool BWD>
void launch(const T* x, const T* g, T* out, int64_t n, cudaStream_t stream) {
  const bool vec = aligned16(x) && aligned16(out) && (!BWD || aligned16(g));
  const int64_t work = vec ? std::max<int64_t>(1, n / Vec16<T>::N) : n;
  const int64_t blocks = std::min<int64_t>(ceil_div(work, kThreads), int64_t(sm_count()) * 32);
  if (vec) {
    gelu_kernel<T, TANH, BWD, true><<<blocks, kThreads, 0, stream>>>(x, g, out, n);
  } else {
    gelu_kernel<T, TANH, BWD, false><<<blocks, kThreads, 0, stream>>>(x, g, out, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct Cuda {
  static void gelu(const GeluProblem& p, const at::Tensor& out, bool bwd) {
    const c10::cuda::CUDAGuard guard(p.x.device());
    const int64_t n = p.x.numel();
    const cudaStream_t stream = current_stream();
    dispatch_dtype(dtype_of(p.x), [&](auto tag) {
      using T = decltype(tag);
      const T* x = static_cast<const T*>(p.x.data_ptr());
      T* o = static_cast<T*>(out.data_ptr());
      if (bwd) {
        const T* g = static_cast<const T*>(p.grad.data_ptr());
        p.tanh ? launch<T, true, true>(x, g, o, n, stream) : launch<T, false, true>(x, g, o, n, stream);
      } else {
        p.tanh ? launch<T, true, false>(x, nullptr, o, n, stream) : launch<T, false, false>(x, nullptr, o, n, stream);
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CUDA, m) { GeluOps<Cuda>::register_ops(m); }

}  // namespace fusedformer::cuda
