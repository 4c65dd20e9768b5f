// CPU softmax kernels: y = softmax(x * scale + mask) over contiguous rows, and its backward.
// Compiled once per instruction set (see vec.h).
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include "fusedformer/cpu/vec.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

// Loads N logits z = x * scale (+ mask) starting at column j; `cnt` < N loads a partial vector whose
// missing lanes are -inf.
template <typename T, MaskKind MK, typename C = compute_t<T>>
FF_INLINE vec_t<C> load_logits(const T* x, int64_t j, int cnt, C scale, const void* mask, int64_t mstride) {
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  const C ninf = -std::numeric_limits<C>::infinity();
  V z = cnt == N ? vload(x + j) : vload_n(x + j, cnt, ninf);
  z = z * scale;
  if constexpr (MK == MaskKind::Float) {
    const C* m = static_cast<const C*>(mask);
    V mv;
    if (mstride == 1 && cnt == N) {
      mv = vload(m + j);
    } else if (mstride == 0) {
      mv = vsplat<C>(m[0]);
    } else {
      mv = V{};
      for (int i = 0; i < cnt; ++i) mv[i] = m[(j + i) * mstride];
    }
    z = z + mv;
  } else if constexpr (MK == MaskKind::Bool) {
    const uint8_t* m = static_cast<const uint8_t*>(mask);
    using M = decltype(z < z);
    M keep;
    if (mstride == 0) {
      keep = M{} + (m[0] ? -1 : 0);
    } else {
      keep = M{};
      for (int i = 0; i < cnt; ++i) keep[i] = m[(j + i) * mstride] ? -1 : 0;
    }
    z = keep ? z : vsplat<C>(ninf);
  }
  for (int i = cnt; i < N; ++i) z[i] = ninf;
  return z;
}

// One row. `limit` columns take part (the causal prefix); the rest of the row is written as zero.
// `buf` holds n compute values of scratch (the output row itself when T is the compute type).
template <typename T, MaskKind MK, typename C = compute_t<T>>
void softmax_row(const T* x, T* y, C* buf, int64_t n, int64_t limit, C scale, const void* mask, int64_t mstride) {
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  const C ninf = -std::numeric_limits<C>::infinity();
  V vmaxacc = vsplat<C>(ninf);
  decltype(V{} < V{}) nan_seen{};
  int64_t j = 0;
  for (; j + N <= limit; j += N) {
    V z = load_logits<T, MK>(x, j, N, scale, mask, mstride);
    nan_seen |= (z != z);
    vmaxacc = vmax(vmaxacc, z);
    vstore(buf + j, z);
  }
  if (j < limit) {
    int cnt = static_cast<int>(limit - j);
    V z = load_logits<T, MK>(x, j, cnt, scale, mask, mstride);
    nan_seen |= (z != z);
    vmaxacc = vmax(vmaxacc, z);
    for (int i = 0; i < cnt; ++i) buf[j + i] = z[i];
  }
  bool has_nan = false;
  for (int i = 0; i < N; ++i) has_nan |= nan_seen[i] != 0;
  const C mx = hmax(vmaxacc);
  if (has_nan || mx == ninf) {
    // NaN anywhere: the row is NaN, as in torch.softmax; all entries masked: zeros
    const C fill = has_nan ? std::numeric_limits<C>::quiet_NaN() : C(0);
    for (int64_t c = 0; c < n; ++c) y[c] = to_storage<T>(fill);
    return;
  }
  V vsum = V{};
  const V vm = vsplat<C>(mx);
  j = 0;
  for (; j + N <= limit; j += N) {
    V e = vexp(vload(buf + j) - vm);
    vsum += e;
    vstore(buf + j, e);
  }
  C tail = 0;
  if (j < limit) {
    int cnt = static_cast<int>(limit - j);
    V e = vexp(vload_n(buf + j, cnt, ninf) - vm);
    for (int i = 0; i < cnt; ++i) {
      buf[j + i] = e[i];
      tail += e[i];
    }
  }
  const C inv = C(1) / (hsum(vsum) + tail);
  const V vinv = vsplat<C>(inv);
  j = 0;
  for (; j + N <= limit; j += N) vstore(y + j, vload(buf + j) * vinv);
  for (; j < limit; ++j) y[j] = to_storage<T>(buf[j] * inv);
  for (j = limit; j < n; ++j) y[j] = to_storage<T>(C(0));
}

template <typename T, MaskKind MK>
void softmax_fwd_impl(const SoftmaxFwdArgs& a) {
  using C = compute_t<T>;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t n = a.n;
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  parallel_for(0, a.rows, grain, [&](int64_t r0, int64_t r1) {
    std::unique_ptr<C[]> scratch;
    if constexpr (!std::is_same_v<T, C>) scratch.reset(new C[n]);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      T* yr = y + r * n;
      C* buf;
      if constexpr (std::is_same_v<T, C>) {
        buf = yr;
      } else {
        buf = scratch.get();
      }
      int64_t limit = n;
      if (a.causal) limit = std::min<int64_t>(n, r % a.causal_rows + 1);
      const void* m = nullptr;
      if constexpr (MK == MaskKind::Float) {
        m = static_cast<const C*>(a.mask) + a.mask_row.offset(r);
      } else if constexpr (MK == MaskKind::Bool) {
        m = static_cast<const uint8_t*>(a.mask) + a.mask_row.offset(r);
      }
      softmax_row<T, MK>(xr, yr, buf, n, limit, C(a.scale), m, a.mask_col_stride);
    }
  });
}

template <typename T>
void softmax_bwd_impl(const SoftmaxBwdArgs& a) {
  using C = compute_t<T>;
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  const T* gy = static_cast<const T*>(a.grad_y);
  const T* y = static_cast<const T*>(a.y);
  T* gx = static_cast<T*>(a.grad_x);
  const int64_t n = a.n;
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  parallel_for(0, a.rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gy + r * n;
      const T* yr = y + r * n;
      T* o = gx + r * n;
      V acc = V{};
      int64_t j = 0;
      for (; j + N <= n; j += N) acc += vload(g + j) * vload(yr + j);
      C dot = hsum(acc);
      for (; j < n; ++j) dot += to_float(g[j]) * to_float(yr[j]);
      const V vdot = vsplat<C>(dot);
      const C s = a.scale;
      j = 0;
      for (; j + N <= n; j += N) vstore(o + j, vload(yr + j) * (vload(g + j) - vdot) * s);
      for (; j < n; ++j) o[j] = to_storage<T>(to_float(yr[j]) * (to_float(g[j]) - dot) * s);
    }
  });
}

}  // namespace

void softmax_fwd(const SoftmaxFwdArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    switch (a.mask_kind) {
      case MaskKind::None:
        softmax_fwd_impl<T, MaskKind::None>(a);
        break;
      case MaskKind::Bool:
        softmax_fwd_impl<T, MaskKind::Bool>(a);
        break;
      case MaskKind::Float:
        softmax_fwd_impl<T, MaskKind::Float>(a);
        break;
    }
  });
}

void softmax_bwd(const SoftmaxBwdArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) { softmax_bwd_impl<decltype(tag)>(a); });
}

}  // namespace fusedformer::cpu::FF_ISA
