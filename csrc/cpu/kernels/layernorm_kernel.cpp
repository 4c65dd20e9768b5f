// CPU LayerNorm / RMSNorm kernels, with the fused residual form (h = x + residual, norm of h).
// Compiled once per instruction set (see vec.h).
#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>

#include "fusedformer/cpu/vec.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

// Rows are split into a fixed number of chunks (independent of the thread count) whose weight
// and bias gradient partials are summed in a fixed order: the result is deterministic.
int64_t num_chunks(int64_t rows, int64_t n) {
  int64_t by_mem = std::max<int64_t>(1, (int64_t(1) << 22) / n);
  return std::max<int64_t>(1, std::min<int64_t>({rows, 64, by_mem}));
}

// Row of the input in the compute type (h = x + residual rounded to T, as the unfused code has it).
template <typename T, bool RES, typename C = compute_t<T>>
FF_INLINE void load_row(const T* x, const T* res, T* h_out, C* buf, int64_t n) {
  constexpr int N = lanes_v<C>;
  int64_t j = 0;
  for (; j + N <= n; j += N) {
    vec_t<C> v = vload(x + j);
    if constexpr (RES) {
      v += vload(res + j);
      vstore(h_out + j, v);
      if constexpr (!std::is_same_v<T, C>) v = vload(h_out + j);  // the rounded h
    }
    vstore(buf + j, v);
  }
  for (; j < n; ++j) {
    C v = to_float(x[j]);
    if constexpr (RES) {
      T h = to_storage<T>(v + to_float(res[j]));
      h_out[j] = h;
      v = to_float(h);
    }
    buf[j] = v;
  }
}

template <typename T, bool RMS, bool RES>
void norm_fwd_impl(const NormFwdArgs& a) {
  using C = compute_t<T>;
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  const T* x = static_cast<const T*>(a.x);
  const T* res = static_cast<const T*>(a.residual);
  T* y = static_cast<T*>(a.y);
  T* h = static_cast<T*>(a.h_out);
  const int64_t n = a.n;
  const C* w = static_cast<const C*>(a.weight);
  const C* b = static_cast<const C*>(a.bias);
  C* mean_out = static_cast<C*>(a.mean);
  C* rstd_out = static_cast<C*>(a.rstd);
  const C eps = C(a.eps);
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  parallel_for(0, a.rows, grain, [&](int64_t r0, int64_t r1) {
    std::unique_ptr<C[]> buf(new C[n]);
    for (int64_t r = r0; r < r1; ++r) {
      load_row<T, RES>(x + r * n, RES ? res + r * n : nullptr, RES ? h + r * n : nullptr, buf.get(), n);
      const C* v = buf.get();
      C mean = 0;
      if constexpr (!RMS) {
        V s = V{};
        int64_t j = 0;
        for (; j + N <= n; j += N) s += vload(v + j);
        C t = hsum(s);
        for (; j < n; ++j) t += v[j];
        mean = t / C(n);
      }
      V s2 = V{};
      const V vm = vsplat<C>(mean);
      int64_t j = 0;
      for (; j + N <= n; j += N) {
        V d = vload(v + j) - vm;
        s2 += d * d;
      }
      C t2 = hsum(s2);
      for (; j < n; ++j) t2 += (v[j] - mean) * (v[j] - mean);
      const C rstd = C(1) / std::sqrt(t2 / C(n) + eps);
      if constexpr (!RMS) mean_out[r] = mean;
      rstd_out[r] = rstd;
      T* yr = y + r * n;
      const V vr = vsplat<C>(rstd);
      j = 0;
      for (; j + N <= n; j += N) {
        V o = (vload(v + j) - vm) * vr;
        if (w) o *= vload(w + j);
        if (b) o += vload(b + j);
        vstore(yr + j, o);
      }
      for (; j < n; ++j) {
        C o = (v[j] - mean) * rstd;
        if (w) o *= w[j];
        if (b) o += b[j];
        yr[j] = to_storage<T>(o);
      }
    }
  });
}

template <typename T, bool RMS>
void norm_bwd_impl(const NormBwdArgs& a) {
  using C = compute_t<T>;
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  const T* gy = static_cast<const T*>(a.grad_y);
  const T* gh = static_cast<const T*>(a.grad_h);
  const T* x = static_cast<const T*>(a.x);
  T* gx = static_cast<T*>(a.grad_x);
  const C* w = static_cast<const C*>(a.weight);
  const C* mean_in = static_cast<const C*>(a.mean);
  const C* rstd_in = static_cast<const C*>(a.rstd);
  C* grad_w = static_cast<C*>(a.grad_weight);
  C* grad_b = static_cast<C*>(a.grad_bias);
  const int64_t n = a.n, rows = a.rows;
  const int64_t nchunks = num_chunks(rows, n);
  std::unique_ptr<C[]> part_w, part_b;
  if (grad_w) part_w.reset(new C[nchunks * n]());
  if (grad_b) part_b.reset(new C[nchunks * n]());

  parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::unique_ptr<C[]> xh(new C[n]), gw(new C[n]);
    for (int64_t c = c0; c < c1; ++c) {
      C* pw = grad_w ? part_w.get() + c * n : nullptr;
      C* pb = grad_b ? part_b.get() + c * n : nullptr;
      const int64_t rbeg = rows * c / nchunks, rend = rows * (c + 1) / nchunks;
      for (int64_t r = rbeg; r < rend; ++r) {
        const T* xr = x + r * n;
        const T* g = gy + r * n;
        const C mean = RMS ? C(0) : mean_in[r];
        const C rstd = rstd_in[r];
        const V vm = vsplat<C>(mean), vr = vsplat<C>(rstd);
        // xhat, g * w and the two row means
        V s1 = V{}, s2 = V{};
        int64_t j = 0;
        for (; j + N <= n; j += N) {
          V xhat = (vload(xr + j) - vm) * vr;
          V gv = vload(g + j);
          if (pw) vstore(pw + j, vload(pw + j) + gv * xhat);
          if (pb) vstore(pb + j, vload(pb + j) + gv);
          V gwv = w ? gv * vload(w + j) : gv;
          vstore(xh.get() + j, xhat);
          vstore(gw.get() + j, gwv);
          s1 += gwv;
          s2 += gwv * xhat;
        }
        C t1 = hsum(s1), t2 = hsum(s2);
        for (; j < n; ++j) {
          C xhat = (to_float(xr[j]) - mean) * rstd;
          C gv = to_float(g[j]);
          if (pw) pw[j] += gv * xhat;
          if (pb) pb[j] += gv;
          C gwv = w ? gv * w[j] : gv;
          xh[j] = xhat;
          gw[j] = gwv;
          t1 += gwv;
          t2 += gwv * xhat;
        }
        const C m1 = RMS ? C(0) : t1 / C(n), m2 = t2 / C(n);
        const V vm1 = vsplat<C>(m1), vm2 = vsplat<C>(m2);
        T* o = gx + r * n;
        const T* ghr = gh ? gh + r * n : nullptr;
        j = 0;
        for (; j + N <= n; j += N) {
          V d = (vload(gw.get() + j) - vm1 - vload(xh.get() + j) * vm2) * vr;
          if (ghr) d += vload(ghr + j);
          vstore(o + j, d);
        }
        for (; j < n; ++j) {
          C d = (gw[j] - m1 - xh[j] * m2) * rstd;
          if (ghr) d += to_float(ghr[j]);
          o[j] = to_storage<T>(d);
        }
      }
    }
  });

  if (grad_w || grad_b) {
    // sum the chunk partials in chunk order
    parallel_for(0, n, 1024, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        if (grad_w) {
          C s = 0;
          for (int64_t c = 0; c < nchunks; ++c) s += part_w[c * n + j];
          grad_w[j] = s;
        }
        if (grad_b) {
          C s = 0;
          for (int64_t c = 0; c < nchunks; ++c) s += part_b[c * n + j];
          grad_b[j] = s;
        }
      }
    });
  }
}

}  // namespace

void norm_fwd(const NormFwdArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool res = a.residual != nullptr;
    if (a.rms) {
      res ? norm_fwd_impl<T, true, true>(a) : norm_fwd_impl<T, true, false>(a);
    } else {
      res ? norm_fwd_impl<T, false, true>(a) : norm_fwd_impl<T, false, false>(a);
    }
  });
}

void norm_bwd(const NormBwdArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    a.rms ? norm_bwd_impl<T, true>(a) : norm_bwd_impl<T, false>(a);
  });
}

}  // namespace fusedformer::cpu::FF_ISA
