// CPU GELU kernels, forward and backward, exact (erf) and tanh forms. Compiled once per
// instruction set (see vec.h).
//
// Elementwise and memory-bound: one pass reads the input (and the gradient) and writes the result,
// with streaming stores for outputs larger than the caches. float32, bfloat16 and float16 are
// computed in float32 with vectorized exp and a polynomial erfc, float64 in double (through libm
// for erfc, so that gradcheck sees the exact function).
//
// Both forms are written so that nothing cancels and nothing overflows into NaN for large |x|:
// the tanh form from exp(-2|u|) (see GeluTanh), the exact form through the normal tail
// erfc(|x| / sqrt2) / 2 (see normal_cdf), whose exp(-x^2 / 2) the backward reuses for the density.
// Special values follow torch's float64 GELU: gelu(inf) = inf, gelu(-inf) = NaN (-inf * 0), NaN in
// NaN out, and the gradient is NaN at +-inf and NaN.
#include <algorithm>
#include <cmath>

#include "fusedformer/cpu/vec.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

constexpr int64_t kGrainElems = 32768;  // fewest elements per parallel task (ATen's grain size)
// Tasks cover whole blocks: with a 64-byte aligned output every task starts on a cache line, so
// that no line is written by two threads.
constexpr int64_t kBlockElems = 1024;

constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kTanhCubic = 0.044715;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)
constexpr double kLog2e = 1.44269504088896340736;

// ---------------------------------------------------------------------------------------------
// exact form: Phi(x), the standard normal CDF, and the density factor exp(-x^2 / 2)

// float32: Phi(x) = 1 - Q(x) for x > 0, Q(-x) otherwise, with the upper tail
// Q(a) = erfc(z) / 2, z = a / sqrt2, as exp(-z^2) erfcx(z) / 2: erfcx(z) / 2 = t P(t),
// t = 1 / (1 + 0.38 z) in (0, 1], P of degree 8 fitted for relative error (2e-8 in exact
// arithmetic, 1.5e-7 evaluated in float32) over z in [0, 10.2]; beyond z ~ 9.3 exp(-z^2) is below
// the float range and Q is 0. The tail thus keeps its relative precision (but for the rounding of
// x^2 in the exponent: 2e-6 at Q ~ 1e-9), where 1 + erf(x / sqrt2) would cancel.
FF_INLINE void normal_cdf(vf x, vf& cdf, vf& density) {
  density = vexp2_nonpos(x * x * float(-0.5 * kLog2e));  // x^2 = inf: 0
  const vf t = 1.f / (vabs(x) * 0.26870056986808777f + 1.f);  // 0.38 / sqrt2
  vf p = vset1(0.029494842514395714f);
  p = p * t - 0.13119789958000183f;
  p = p * t + 0.18205367028713226f;
  p = p * t - 0.08087607473134995f;
  p = p * t + 0.11511842161417007f;
  p = p * t + 0.06927752494812012f;
  p = p * t + 0.10196619480848312f;
  p = p * t + 0.10695773363113403f;
  p = p * t + 0.10720560699701309f;
  const vf q = density * t * p;
  cdf = x > 0.f ? 1.f - q : q;  // NaN: q is NaN
}

// float64: libm, lane by lane (the accuracy path)
FF_INLINE void normal_cdf(vd x, vd& cdf, vd& density) {
  for (int i = 0; i < WD; ++i) {
    cdf[i] = 0.5 * std::erfc(-x[i] * 0.70710678118654752);
    density[i] = std::exp(-0.5 * x[i] * x[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// the two forms, on vectors of the compute type C

template <typename C>
struct GeluErf {
  using V = vec_t<C>;
  static FF_INLINE V fwd(V x) {
    V cdf, density;
    normal_cdf(x, cdf, density);
    return x * cdf;
  }
  // d/dx x Phi(x) = Phi(x) + x phi(x); at x = +-inf x * phi is inf * 0 = NaN, as in torch
  static FF_INLINE V bwd(V g, V x) {
    V cdf, density;
    normal_cdf(x, cdf, density);
    return g * (cdf + x * density * C(kInvSqrt2Pi));
  }
};

// tanh form: y = x s, s = (1 + tanh u) / 2 = 1 / (1 + e^{-2u}), u = sqrt(2/pi) (x + 0.044715 x^3).
// With w = e^{-2|u|} in [0, 1] and r = 1 / (1 + w), s is r (u >= 0) or w r (u < 0), and
// s (1 - s) = w r^2: nothing overflows (large positive x gives x, large negative x -0) and nothing
// cancels (small |y| keep their relative precision).
template <typename C>
struct GeluTanh {
  using V = vec_t<C>;
  // -2u log2(e) = x (kA + kB x^2), the base-2 exponent of e^{-2u}
  static constexpr C kA = C(-2 * kSqrt2OverPi * kLog2e), kB = C(-2 * kSqrt2OverPi * kTanhCubic * kLog2e);
  // past this |x|, w is 0 in C (the derivative exactly 1 or 0) and x^3 still finite
  static constexpr C kClamp = std::is_same_v<C, double> ? C(30) : C(20);

  // s, and w r^2 in *ds; x^2 = inf (|x| > ~1e19 in float) only pushes the exponent to -inf
  static FF_INLINE V half_one_plus_tanh(V x, V x2, V* ds) {
    const V t = x * (kA + kB * x2);
    const auto pos = x > C(0);
    const V w = vexp2_nonpos(pos ? t : -t);
    const V r = C(1) / (C(1) + w);
    if (ds) *ds = w * r * r;
    return pos ? r : w * r;  // NaN: w is NaN
  }

  static FF_INLINE V fwd(V x) { return x * half_one_plus_tanh(x, x * x, nullptr); }

  // dy/dx = s + x s (1 - s) 2u', 2u' = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2), at x clamped (so that
  // x 2u' stays finite where s (1 - s) is 0); x - x (0, or NaN at +-inf and NaN) restores torch's
  // NaN there.
  static FF_INLINE V bwd(V g, V x) {
    const V xc = vmin(vmax(x, vsplat<C>(-kClamp)), vsplat<C>(kClamp));
    const V x2 = xc * xc;
    V ds;
    const V s = half_one_plus_tanh(xc, x2, &ds);
    const V du2 = C(2 * kSqrt2OverPi) + C(6 * kSqrt2OverPi * kTanhCubic) * x2;
    return g * (s + xc * du2 * ds) + (x - x);
  }
};

// ---------------------------------------------------------------------------------------------
// elementwise driver

// out[i] = f(in[i]...) for i in [begin, end): whole vectors, partial ones at the ends and, with
// streaming stores, up to the first aligned element of out.
template <typename T, typename F, typename... In>
void map_range(T* out, int64_t begin, int64_t end, bool stream, const F& f, const In*... in) {
  constexpr int N = lanes_v<compute_t<T>>;
  auto partial = [&](int64_t j, int m) { vstore_n(out + j, f(vload_n(in + j, m)...), m); };
  int64_t j = begin;
  if (stream) {
    for (const int64_t head = std::min(end, j + stream_head(out + j)); j < head;) {
      const int m = int(std::min<int64_t>(N, head - j));
      partial(j, m);
      j += m;
    }
  }
  // two independent vectors per step: their dependency chains (exp, polynomials, a division)
  // overlap better than what the out-of-order window finds across iterations (~1.4x here)
  for (; j + 2 * N <= end; j += 2 * N) {
    const auto a = f(vload(in + j)...);
    const auto b = f(vload(in + j + N)...);
    put(out + j, a, stream);
    put(out + j + N, b, stream);
  }
  if (j + N <= end) {
    put(out + j, f(vload(in + j)...), stream);
    j += N;
  }
  if (j < end) partial(j, int(end - j));
  if (stream) vstream_fence();
}

template <typename T, typename F, typename... In>
void map_elements(T* out, int64_t n, const F& f, const In*... in) {
  // in place, the result is read next (the following projection): kept in the cache, not streamed
  const bool stream = n * int64_t(sizeof(T)) >= kStreamMinBytes && ((static_cast<const void*>(in) != out) && ...);
  const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;
  parallel_for(0, blocks, std::max<int64_t>(1, kGrainElems / kBlockElems), [&](int64_t b0, int64_t b1) {
    map_range(out, b0 * kBlockElems, std::min(n, b1 * kBlockElems), stream, f, in...);
  });
}

template <bool BWD>
void gelu_impl(const GeluArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    using V = vec_t<C>;
    const T* x = static_cast<const T*>(a.x);
    T* out = static_cast<T*>(a.out);
    auto run = [&](auto form) {
      using Form = decltype(form);
      if constexpr (BWD) {
        map_elements(out, a.n, [](V g, V v) { return Form::bwd(g, v); }, static_cast<const T*>(a.grad_y), x);
      } else {
        map_elements(out, a.n, [](V v) { return Form::fwd(v); }, x);
      }
    };
    a.tanh ? run(GeluTanh<C>{}) : run(GeluErf<C>{});
  });
}

}  // namespace

void gelu_fwd(const GeluArgs& a) { gelu_impl<false>(a); }
void gelu_bwd(const GeluArgs& a) { gelu_impl<true>(a); }

}  // namespace fusedformer::cpu::FF_ISA
