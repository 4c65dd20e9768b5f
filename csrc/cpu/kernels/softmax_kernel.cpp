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

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Loads W logits z = x * scale (+ mask) starting at column j; `cnt` < W loads a partial vector whose
// missing lanes are -inf.
template <typename T, MaskKind MK>
FF_INLINE vf load_logits(const T* x, int64_t j, int cnt, float scale, const void* mask, int64_t mstride) {
  vf z = cnt == W ? vload(x + j) : vload_n(x + j, cnt, kNegInf);
  z = z * scale;
  if constexpr (MK == MaskKind::Float) {
    const float* m = static_cast<const float*>(mask);
    vf mv;
    if (mstride == 1 && cnt == W) {
      mv = vload(m + j);
    } else if (mstride == 0) {
      mv = vset1(m[0]);
    } else {
      mv = vzero();
      for (int i = 0; i < cnt; ++i) mv[i] = m[(j + i) * mstride];
    }
    z = z + mv;
  } else if constexpr (MK == MaskKind::Bool) {
    const uint8_t* m = static_cast<const uint8_t*>(mask);
    vi keep;
    if (mstride == 0) {
      keep = vi{} + (m[0] ? -1 : 0);
    } else {
      keep = vi{};
      for (int i = 0; i < cnt; ++i) keep[i] = m[(j + i) * mstride] ? -1 : 0;
    }
    z = keep ? z : vset1(kNegInf);
  }
  if (cnt < W) {
    vi lane = viota();
    z = lane < cnt ? z : vset1(kNegInf);
  }
  return z;
}

// One row. `limit` columns take part (the causal prefix); the rest of the row is written as zero.
// `buf` holds n floats of scratch (the output row itself when T is float).
template <typename T, MaskKind MK>
void softmax_row(const T* x, T* y, float* buf, int64_t n, int64_t limit, float scale, const void* mask,
                 int64_t mstride) {
  vf vmaxacc = vset1(kNegInf);
  vi nan_seen = vi{};
  int64_t j = 0;
  for (; j + W <= limit; j += W) {
    vf z = load_logits<T, MK>(x, j, W, scale, MK == MaskKind::None ? nullptr : mask, mstride);
    nan_seen |= (z != z);
    vmaxacc = vmax(vmaxacc, z);
    vstore(buf + j, z);
  }
  if (j < limit) {
    int cnt = static_cast<int>(limit - j);
    vf z = load_logits<T, MK>(x, j, cnt, scale, mask, mstride);
    nan_seen |= (z != z);
    vmaxacc = vmax(vmaxacc, z);
    for (int i = 0; i < cnt; ++i) buf[j + i] = z[i];
  }
  bool has_nan = false;
  for (int i = 0; i < W; ++i) has_nan |= nan_seen[i] != 0;
  const float mx = hmax(vmaxacc);
  if (has_nan || mx == kNegInf) {
    // NaN anywhere: the row is NaN, as in torch.softmax; all keys masked: zeros
    const float fill = has_nan ? std::numeric_limits<float>::quiet_NaN() : 0.f;
    for (int64_t c = 0; c < n; ++c) y[c] = from_float<T>(fill);
    return;
  }
  vf vsum = vzero();
  const vf vm = vset1(mx);
  j = 0;
  for (; j + W <= limit; j += W) {
    vf e = vexp(vload(buf + j) - vm);
    vsum += e;
    vstore(buf + j, e);
  }
  float tail = 0.f;
  if (j < limit) {
    int cnt = static_cast<int>(limit - j);
    vf z = vload_n(buf + j, cnt, kNegInf);
    vf e = vexp(z - vm);
    for (int i = 0; i < cnt; ++i) {
      buf[j + i] = e[i];
      tail += e[i];
    }
  }
  const float inv = 1.f / (hsum(vsum) + tail);
  const vf vinv = vset1(inv);
  j = 0;
  for (; j + W <= limit; j += W) vstore(y + j, vload(buf + j) * vinv);
  for (; j < limit; ++j) y[j] = from_float<T>(buf[j] * inv);
  for (j = limit; j < n; ++j) y[j] = from_float<T>(0.f);
}

template <typename T, MaskKind MK>
void softmax_fwd_impl(const SoftmaxFwdArgs& a) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t n = a.n;
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  parallel_for(0, a.rows, grain, [&](int64_t r0, int64_t r1) {
    std::unique_ptr<float[]> scratch;
    if constexpr (!std::is_same_v<T, float>) scratch.reset(new float[n]);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      T* yr = y + r * n;
      float* buf;
      if constexpr (std::is_same_v<T, float>) {
        buf = yr;
      } else {
        buf = scratch.get();
      }
      int64_t limit = n;
      if (a.causal) limit = std::min<int64_t>(n, r % a.causal_rows + 1);
      const void* m = nullptr;
      if constexpr (MK == MaskKind::Float) {
        m = static_cast<const float*>(a.mask) + a.mask_row.offset(r);
      } else if constexpr (MK == MaskKind::Bool) {
        m = static_cast<const uint8_t*>(a.mask) + a.mask_row.offset(r);
      }
      softmax_row<T, MK>(xr, yr, buf, n, limit, a.scale, m, a.mask_col_stride);
    }
  });
}

template <typename T>
void softmax_bwd_impl(const SoftmaxBwdArgs& a) {
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
      vf acc = vzero();
      int64_t j = 0;
      for (; j + W <= n; j += W) acc += vload(g + j) * vload(yr + j);
      float dot = hsum(acc);
      for (; j < n; ++j) dot += to_float(g[j]) * to_float(yr[j]);
      const vf vdot = vset1(dot);
      const float s = a.scale;
      j = 0;
      for (; j + W <= n; j += W) vstore(o + j, vload(yr + j) * (vload(g + j) - vdot) * s);
      for (; j < n; ++j) o[j] = from_float<T>(to_float(yr[j]) * (to_float(g[j]) - dot) * s);
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
