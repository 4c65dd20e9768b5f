// CPU LayerNorm / RMSNorm kernels, with the fused residual form (h = x + residual, norm of h).
// Compiled once per instruction set (see vec.h).
//
// Forward, per row (which stays in cache): one pass reads the input (adding the residual and
// writing h), summing; LayerNorm takes a second pass over the cached row for the variance about
// the mean (exact two-pass statistics), then one pass writes the output. RMSNorm sums squares in
// the first pass. Backward, per row: one pass for the two row sums and the weight / bias
// gradient partials, one pass writing grad_input. Outputs larger than the caches are written with
// streaming stores.
#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "fusedformer/cpu/vec.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

constexpr int64_t kGrainElems = 16384;  // fewest elements per parallel task

// per-thread scratch of n compute values, 64-byte aligned
template <typename C>
struct RowBuf {
  std::unique_ptr<C[]> raw;
  C* p = nullptr;
  explicit RowBuf(int64_t n) : raw(new C[n + 64 / sizeof(C)]) {
    p = reinterpret_cast<C*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) & ~uintptr_t(63));
  }
};

// Rows are split into a fixed number of chunks (independent of the thread count) whose weight
// and bias gradient partials are summed in a fixed order: the result is deterministic.
int64_t num_chunks(int64_t rows, int64_t n) {
  int64_t by_mem = std::max<int64_t>(1, (int64_t(1) << 22) / n);
  return std::max<int64_t>(1, std::min<int64_t>({rows, 64, by_mem}));
}

// y[0, n) from a vector function fv(j) and a scalar function fs(j); streaming stores from the
// first kStreamAlign boundary on
template <typename T, typename FV, typename FS>
FF_INLINE void write_row(T* y, int64_t n, bool stream, FV&& fv, FS&& fs) {
  constexpr int N = lanes_v<compute_t<T>>;
  int64_t j = 0;
  if (stream) {
    const int64_t h = std::min(n, stream_head(y));
    for (; j < h; ++j) y[j] = to_storage<T>(fs(j));
  }
  for (; j + N <= n; j += N) put(y + j, fv(j), stream);
  for (; j < n; ++j) y[j] = to_storage<T>(fs(j));
}

// Params in the compute type; a missing weight reads as ones.
template <typename C>
struct Params {
  std::vector<C> ones;
  const C* w;
  const C* b;
  Params(const void* weight, const void* bias, int64_t n) {
    w = static_cast<const C*>(weight);
    b = static_cast<const C*>(bias);
    if (!w) {
      ones.assign(n, C(1));
      w = ones.data();
    }
  }
};

// First pass over a row: v = x (+ residual, rounded to T as the unfused x + residual is, and
// written to h), into buf when the row is not read from x itself; returns sum(v - shift)
// (LayerNorm: shift is the row's first value, so that a large common offset costs no precision
// in the sum) or sum(v * v) (RMSNorm).
template <typename T, bool RMS, bool RES, typename C = compute_t<T>>
FF_INLINE C load_row(const T* x, const T* res, T* h, C* buf, int64_t n, bool stream, C shift) {
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  constexpr bool kBuf = RES || !std::is_same_v<T, C>;
  auto value = [&](int64_t j) -> V {
    V v = vload(x + j);
    if constexpr (RES) {
      v = round_through<T>(v + vload(res + j));
      put(h + j, v, stream);
    }
    return v;
  };
  auto value1 = [&](int64_t j) -> C {
    C v = to_float(x[j]);
    if constexpr (RES) {
      const T hv = to_storage<T>(v + to_float(res[j]));
      h[j] = hv;
      v = to_float(hv);
    }
    return v;
  };
  const V vshift = vsplat<C>(shift);
  C t = 0;
  int64_t j = 0;
  if (RES && stream) {
    for (const int64_t hd = std::min(n, stream_head(h)); j < hd; ++j) {
      const C v = value1(j);
      buf[j] = v;
      t += RMS ? v * v : v - shift;
    }
  }
  V s0 = V{}, s1 = V{};
  for (; j + 2 * N <= n; j += 2 * N) {
    const V v0 = value(j), v1 = value(j + N);
    if constexpr (kBuf) {
      vstore(buf + j, v0);
      vstore(buf + j + N, v1);
    }
    s0 += RMS ? v0 * v0 : v0 - vshift;
    s1 += RMS ? v1 * v1 : v1 - vshift;
  }
  for (; j + N <= n; j += N) {
    const V v = value(j);
    if constexpr (kBuf) vstore(buf + j, v);
    s0 += RMS ? v * v : v - vshift;
  }
  t += hsum(s0 + s1);
  for (; j < n; ++j) {
    const C v = value1(j);
    if constexpr (kBuf) buf[j] = v;
    t += RMS ? v * v : v - shift;
  }
  return t;
}

template <typename T, bool RMS, bool RES, bool HAS_B>
void norm_fwd_impl(const NormFwdArgs& a) {
  using C = compute_t<T>;
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  constexpr bool kBuf = RES || !std::is_same_v<T, C>;
  const T* x = static_cast<const T*>(a.x);
  const T* res = static_cast<const T*>(a.residual);
  T* y = static_cast<T*>(a.y);
  T* h = static_cast<T*>(a.h_out);
  const int64_t n = a.n;
  const Params<C> prm(a.weight, a.bias, n);
  const C* w = prm.w;
  const C* b = prm.b;
  C* mean_out = static_cast<C*>(a.mean);
  C* rstd_out = static_cast<C*>(a.rstd);
  const C eps = C(a.eps);
  const bool stream = a.rows * n * int64_t(sizeof(T)) >= kStreamMinBytes;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / n);
  parallel_for(0, a.rows, grain, [&](int64_t r0, int64_t r1) {
    RowBuf<C> buf(kBuf ? n : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      // the next row is prefetched while this one, in L1, is normalized
      const bool next = r + 1 < r1;
      const T* next_x = xr + n;
      const T* next_res = RES ? res + (r + 1) * n : nullptr;
      auto prefetch = [&](int64_t j) {
        if (next) {
          prefetch_l2<N * sizeof(T)>(next_x + j);
          if constexpr (RES) prefetch_l2<N * sizeof(T)>(next_res + j);
        }
      };
      C shift = 0;
      if constexpr (!RMS) {
        shift = to_float(xr[0]);
        if constexpr (RES) shift = to_float(to_storage<T>(shift + to_float(res[r * n])));
      }
      const C t = load_row<T, RMS, RES>(xr, RES ? res + r * n : nullptr, RES ? h + r * n : nullptr, buf.p, n,
                                        stream, shift);
      // the row in the compute type
      auto v = [&](int64_t j) -> V {
        if constexpr (kBuf) {
          return vload(buf.p + j);
        } else {
          return vload(xr + j);
        }
      };
      auto v1 = [&](int64_t j) -> C {
        if constexpr (kBuf) {
          return buf.p[j];
        } else {
          return to_float(xr[j]);
        }
      };
      C mean = 0, var;
      if constexpr (RMS) {
        var = t / C(n);
      } else {
        mean = shift + t / C(n);
        const V vm = vsplat<C>(mean);
        V s0 = V{}, s1 = V{};
        int64_t j = 0;
        for (; j + 2 * N <= n; j += 2 * N) {
          const V d0 = v(j) - vm, d1 = v(j + N) - vm;
          s0 += d0 * d0;
          s1 += d1 * d1;
        }
        for (; j + N <= n; j += N) {
          const V d = v(j) - vm;
          s0 += d * d;
        }
        C q = hsum(s0 + s1);
        for (; j < n; ++j) q += (v1(j) - mean) * (v1(j) - mean);
        var = q / C(n);
      }
      const C rstd = C(1) / std::sqrt(var + eps);
      if constexpr (!RMS) mean_out[r] = mean;
      rstd_out[r] = rstd;
      const V vm = vsplat<C>(mean), vr = vsplat<C>(rstd);
      write_row(
          y + r * n, n, stream,
          [&](int64_t j) {
            prefetch(j);
            V o = (v(j) - vm) * vr * vload(w + j);
            if constexpr (HAS_B) o += vload(b + j);
            return o;
          },
          [&](int64_t j) {
            C o = (v1(j) - mean) * rstd * w[j];
            if constexpr (HAS_B) o += b[j];
            return o;
          });
    }
    if (stream) vstream_fence();
  });
}

template <typename T, bool RMS, bool HAS_GH>
void norm_bwd_impl(const NormBwdArgs& a) {
  using C = compute_t<T>;
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  const T* gy = static_cast<const T*>(a.grad_y);
  const T* gh = static_cast<const T*>(a.grad_h);
  const T* x = static_cast<const T*>(a.x);
  T* gx = static_cast<T*>(a.grad_x);
  const int64_t n = a.n, rows = a.rows;
  const Params<C> prm(a.weight, nullptr, n);
  const C* w = prm.w;
  const C* mean_in = static_cast<const C*>(a.mean);
  const C* rstd_in = static_cast<const C*>(a.rstd);
  C* grad_w = static_cast<C*>(a.grad_weight);
  C* grad_b = static_cast<C*>(a.grad_bias);
  const int64_t nchunks = num_chunks(rows, n);
  std::unique_ptr<C[]> part_w, part_b;
  if (grad_w) part_w.reset(new C[nchunks * n]());
  if (grad_b) part_b.reset(new C[nchunks * n]());
  const bool stream = rows * n * int64_t(sizeof(T)) >= kStreamMinBytes;

  parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
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
        // row sums of g * w and g * w * xhat; weight / bias gradient partials
        V s1 = V{}, s2 = V{};
        int64_t j = 0;
        for (; j + N <= n; j += N) {
          const V xhat = (vload(xr + j) - vm) * vr;
          const V gv = vload(g + j);
          const V gw = gv * vload(w + j);
          if (pw) vstore(pw + j, vload(pw + j) + gv * xhat);
          if (pb) vstore(pb + j, vload(pb + j) + gv);
          if constexpr (!RMS) s1 += gw;
          s2 += gw * xhat;
        }
        C t1 = hsum(s1), t2 = hsum(s2);
        for (; j < n; ++j) {
          const C xhat = (to_float(xr[j]) - mean) * rstd;
          const C gv = to_float(g[j]);
          if (pw) pw[j] += gv * xhat;
          if (pb) pb[j] += gv;
          t1 += gv * w[j];
          t2 += gv * w[j] * xhat;
        }
        const C m1 = RMS ? C(0) : t1 / C(n), m2 = t2 / C(n);
        const V vm1 = vsplat<C>(m1), vm2 = vsplat<C>(m2);
        const T* ghr = HAS_GH ? gh + r * n : nullptr;
        const bool next = r + 1 < rend;
        write_row(
            gx + r * n, n, stream,
            [&](int64_t k) {
              if (next) {
                prefetch_l2<N * sizeof(T)>(xr + n + k);
                prefetch_l2<N * sizeof(T)>(g + n + k);
                if constexpr (HAS_GH) prefetch_l2<N * sizeof(T)>(ghr + n + k);
              }
              const V xhat = (vload(xr + k) - vm) * vr;
              V d = (vload(g + k) * vload(w + k) - vm1 - xhat * vm2) * vr;
              if constexpr (HAS_GH) d += vload(ghr + k);
              return d;
            },
            [&](int64_t k) {
              const C xhat = (to_float(xr[k]) - mean) * rstd;
              C d = (to_float(g[k]) * w[k] - m1 - xhat * m2) * rstd;
              if constexpr (HAS_GH) d += to_float(ghr[k]);
              return d;
            });
      }
    }
    if (stream) vstream_fence();
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
      res ? norm_fwd_impl<T, true, true, false>(a) : norm_fwd_impl<T, true, false, false>(a);
    } else if (a.bias) {
      res ? norm_fwd_impl<T, false, true, true>(a) : norm_fwd_impl<T, false, false, true>(a);
    } else {
      res ? norm_fwd_impl<T, false, true, false>(a) : norm_fwd_impl<T, false, false, false>(a);
    }
  });
}

void norm_bwd(const NormBwdArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool gh = a.grad_h != nullptr;
    if (a.rms) {
      gh ? norm_bwd_impl<T, true, true>(a) : norm_bwd_impl<T, true, false>(a);
    } else {
      gh ? norm_bwd_impl<T, false, true>(a) : norm_bwd_impl<T, false, false>(a);
    }
  });
}

}  // namespace fusedformer::cpu::FF_ISA
