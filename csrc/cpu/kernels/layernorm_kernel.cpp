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

// Row of the input in float32 (h = x + residual rounded to T, as the unfused code computes it).
template <typename T, bool RES>
FF_INLINE void load_row(const T* x, const T* res, T* h_out, float* buf, int64_t n) {
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    vf v = vload(x + j);
    if constexpr (RES) {
      v += vload(res + j);
      vstore(h_out + j, v);
      if constexpr (!std::is_same_v<T, float>) v = vload(h_out + j);  // the rounded h
    }
    vstore(buf + j, v);
  }
  for (; j < n; ++j) {
    float v = to_float(x[j]);
    if constexpr (RES) {
      T h = from_float<T>(v + to_float(res[j]));
      h_out[j] = h;
      v = to_float(h);
    }
    buf[j] = v;
  }
}

template <typename T, bool RMS, bool RES>
void norm_fwd_impl(const NormFwdArgs& a) {
  const T* x = static_cast<const T*>(a.x);
  const T* res = static_cast<const T*>(a.residual);
  T* y = static_cast<T*>(a.y);
  T* h = static_cast<T*>(a.h_out);
  const int64_t n = a.n;
  const float* w = a.weight;
  const float* b = a.bias;
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  parallel_for(0, a.rows, grain, [&](int64_t r0, int64_t r1) {
    std::unique_ptr<float[]> buf(new float[n]);
    for (int64_t r = r0; r < r1; ++r) {
      load_row<T, RES>(x + r * n, RES ? res + r * n : nullptr, RES ? h + r * n : nullptr, buf.get(), n);
      const float* v = buf.get();
      float mean = 0.f;
      if constexpr (!RMS) {
        vf s = vzero();
        int64_t j = 0;
        for (; j + W <= n; j += W) s += vload(v + j);
        float t = hsum(s);
        for (; j < n; ++j) t += v[j];
        mean = t / float(n);
      }
      vf s2 = vzero();
      const vf vm = vset1(mean);
      int64_t j = 0;
      for (; j + W <= n; j += W) {
        vf d = vload(v + j) - vm;
        s2 += d * d;
      }
      float t2 = hsum(s2);
      for (; j < n; ++j) t2 += (v[j] - mean) * (v[j] - mean);
      const float rstd = 1.f / std::sqrt(t2 / float(n) + a.eps);
      if constexpr (!RMS) a.mean[r] = mean;
      a.rstd[r] = rstd;
      T* yr = y + r * n;
      const vf vr = vset1(rstd);
      j = 0;
      for (; j + W <= n; j += W) {
        vf o = (vload(v + j) - vm) * vr;
        if (w) o *= vload(w + j);
        if (b) o += vload(b + j);
        vstore(yr + j, o);
      }
      for (; j < n; ++j) {
        float o = (v[j] - mean) * rstd;
        if (w) o *= w[j];
        if (b) o += b[j];
        yr[j] = from_float<T>(o);
      }
    }
  });
}

template <typename T, bool RMS>
void norm_bwd_impl(const NormBwdArgs& a) {
  const T* gy = static_cast<const T*>(a.grad_y);
  const T* gh = static_cast<const T*>(a.grad_h);
  const T* x = static_cast<const T*>(a.x);
  T* gx = static_cast<T*>(a.grad_x);
  const int64_t n = a.n, rows = a.rows;
  const float* w = a.weight;
  const bool want_wb = a.grad_weight || a.grad_bias;
  const int64_t nchunks = num_chunks(rows, n);
  std::unique_ptr<float[]> part_w, part_b;
  if (a.grad_weight) part_w.reset(new float[nchunks * n]());
  if (a.grad_bias) part_b.reset(new float[nchunks * n]());

  parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::unique_ptr<float[]> xh(new float[n]), gw(new float[n]);
    for (int64_t c = c0; c < c1; ++c) {
      float* pw = a.grad_weight ? part_w.get() + c * n : nullptr;
      float* pb = a.grad_bias ? part_b.get() + c * n : nullptr;
      const int64_t rbeg = rows * c / nchunks, rend = rows * (c + 1) / nchunks;
      for (int64_t r = rbeg; r < rend; ++r) {
        const T* xr = x + r * n;
        const T* g = gy + r * n;
        const float mean = RMS ? 0.f : a.mean[r];
        const float rstd = a.rstd[r];
        const vf vm = vset1(mean), vr = vset1(rstd);
        // xhat, g * w and the two row means
        vf s1 = vzero(), s2 = vzero();
        int64_t j = 0;
        for (; j + W <= n; j += W) {
          vf xhat = (vload(xr + j) - vm) * vr;
          vf gv = vload(g + j);
          if (pw) vstore(pw + j, vload(pw + j) + gv * xhat);
          if (pb) vstore(pb + j, vload(pb + j) + gv);
          vf gwv = w ? gv * vload(w + j) : gv;
          vstore(xh.get() + j, xhat);
          vstore(gw.get() + j, gwv);
          s1 += gwv;
          s2 += gwv * xhat;
        }
        float t1 = hsum(s1), t2 = hsum(s2);
        for (; j < n; ++j) {
          float xhat = (to_float(xr[j]) - mean) * rstd;
          float gv = to_float(g[j]);
          if (pw) pw[j] += gv * xhat;
          if (pb) pb[j] += gv;
          float gwv = w ? gv * w[j] : gv;
          xh[j] = xhat;
          gw[j] = gwv;
          t1 += gwv;
          t2 += gwv * xhat;
        }
        const float m1 = RMS ? 0.f : t1 / float(n), m2 = t2 / float(n);
        const vf vm1 = vset1(m1), vm2 = vset1(m2);
        T* o = gx + r * n;
        const T* ghr = gh ? gh + r * n : nullptr;
        j = 0;
        for (; j + W <= n; j += W) {
          vf d = (vload(gw.get() + j) - vm1 - vload(xh.get() + j) * vm2) * vr;
          if (ghr) d += vload(ghr + j);
          vstore(o + j, d);
        }
        for (; j < n; ++j) {
          float d = (gw[j] - m1 - xh[j] * m2) * rstd;
          if (ghr) d += to_float(ghr[j]);
          o[j] = from_float<T>(d);
        }
      }
    }
  });

  if (want_wb) {
    // sum the chunk partials in chunk order
    parallel_for(0, n, 1024, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        if (a.grad_weight) {
          float s = 0.f;
          for (int64_t c = 0; c < nchunks; ++c) s += part_w[c * n + j];
          a.grad_weight[j] = s;
        }
        if (a.grad_bias) {
          float s = 0.f;
          for (int64_t c = 0; c < nchunks; ++c) s += part_b[c * n + j];
          a.grad_bias[j] = s;
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
