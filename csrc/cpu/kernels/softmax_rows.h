// The row passes of the CPU softmax, shared by the softmax kernels (softmax_kernel.cpp) and the
// cross-entropy kernel (cross_entropy_kernel.cpp), which takes a row's statistics and its softmax
// from the same passes. Included once per instruction set, like vec.h.
//
// A row's softmax is taken in up to three passes over a row that stays in cache: the max of the
// values v (pass_max), then e = 2^((v - max) * c) into a scratch row while summing (pass_exp), then
// e / sum into the output. Longer rows are taken in segments whose (max, sum) pairs are merged
// (Stats), then written by a pass that recomputes e (segment_write).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include "fusedformer/cpu/vec.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

constexpr double kLog2eD = 1.4426950408889634;
constexpr int64_t kRowInCache = 32768;  // longest row taken with a scratch row of its own length
constexpr int64_t kSegment = 8192;      // segment length of longer rows
constexpr int64_t kGrainElems = 16384;  // fewest elements per parallel task

// per-thread scratch of n compute values, 64-byte aligned
template <typename C>
struct Scratch {
  std::unique_ptr<C[]> raw;
  C* p;
  explicit Scratch(int64_t n) : raw(new C[n + 64 / sizeof(C)]) {
    p = reinterpret_cast<C*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) & ~uintptr_t(63));
  }
};

template <typename C>
constexpr C kInf = std::numeric_limits<C>::infinity();

// lanes from `cnt` on set to `fill`
template <typename V, typename C>
FF_INLINE V fill_from(V v, int cnt, C fill) {
  for (int i = cnt; i < int(sizeof(V) / sizeof(C)); ++i) v[i] = fill;
  return v;
}
// running max that skips NaN lanes of v
template <typename V>
FF_INLINE V max_skipnan(V acc, V v) {
  return v > acc ? v : acc;
}
// y[j0, j1) from a vector function fv(j) (full vectors) and a scalar function fs(j) (ragged ends).
// Streaming: plain stores up to the first kStreamAlign boundary, then streaming stores.
template <typename T, typename FV, typename FS>
FF_INLINE void write_range(T* y, int64_t j0, int64_t j1, bool stream, FV&& fv, FS&& fs) {
  constexpr int N = lanes_v<compute_t<T>>;
  int64_t j = j0;
  if (stream) {
    const int64_t h = std::min(j1, j0 + stream_head(y + j0));
    for (; j < h; ++j) y[j] = to_storage<T>(fs(j));
    for (; j + N <= j1; j += N) vstream(y + j, fv(j));
  } else {
    for (; j + N <= j1; j += N) vstore(y + j, fv(j));
  }
  for (; j < j1; ++j) y[j] = to_storage<T>(fs(j));
}

template <typename T>
void write_zeros(T* y, int64_t j0, int64_t j1, bool stream) {
  using C = compute_t<T>;
  write_range(y, j0, j1, stream, [](int64_t) { return vec_t<C>{}; }, [](int64_t) { return C(0); });
}

// ---------------------------------------------------------------------------------------------
// rows: where the values v whose softmax is taken come from.
//   Raw:      v = x (no mask, scale >= 0: the scale goes into the exponent's factor)
//   Scaled:   v = x * scale (no mask, scale < 0)
//   Add:      v = x * scale + mask[j]      AddConst: v = x * scale + mask[0] (mask broadcast along the row)
//   Keep:     v = mask[j] ? x * scale : -inf
enum class Src { Raw, Scaled, Add, AddConst, Keep };

template <typename T, Src S>
struct RowSrc {
  using C = compute_t<T>;
  using V = vec_t<C>;
  static constexpr int N = lanes_v<C>;
  const T* x;
  const C* madd;
  const uint8_t* mkeep;
  C scale, mconst;

  FF_INLINE V vec(int64_t j) const {
    if constexpr (S == Src::Raw) {
      return vload(x + j);
    } else {
      V z = vload(x + j) * scale;
      if constexpr (S == Src::Add) z += vload(madd + j);
      if constexpr (S == Src::AddConst) z += mconst;
      if constexpr (S == Src::Keep) {
        if constexpr (std::is_same_v<C, float>) {
          z = vload_keep(mkeep + j) ? z : vsplat<C>(-kInf<C>);
        } else {
          for (int i = 0; i < N; ++i) z[i] = mkeep[j + i] ? z[i] : -kInf<C>;
        }
      }
      return z;
    }
  }
  FF_INLINE C one(int64_t j) const {
    const C xv = to_float(x[j]);
    if constexpr (S == Src::Raw) return xv;
    if constexpr (S == Src::Scaled) return xv * scale;
    if constexpr (S == Src::Add) return xv * scale + madd[j];
    if constexpr (S == Src::AddConst) return xv * scale + mconst;
    if constexpr (S == Src::Keep) return mkeep[j] ? xv * scale : -kInf<C>;
  }
  // first cnt lanes from column j, the others -inf
  FF_INLINE V part(int64_t j, int cnt) const {
    V v = vsplat<C>(-kInf<C>);
    for (int i = 0; i < cnt; ++i) v[i] = one(j + i);
    return v;
  }
};

// max of v over [j0, j1), NaN skipped (-inf if none); modes other than Raw store v to buf[j - j0]
template <typename T, Src S, typename C = compute_t<T>>
C pass_max(const RowSrc<T, S>& src, C* buf, int64_t j0, int64_t j1) {
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  constexpr bool kStore = S != Src::Raw;
  V a0 = vsplat<C>(-kInf<C>), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = j0;
  for (; j + 4 * N <= j1; j += 4 * N) {
    const V v0 = src.vec(j), v1 = src.vec(j + N), v2 = src.vec(j + 2 * N), v3 = src.vec(j + 3 * N);
    if constexpr (kStore) {
      vstore(buf + (j - j0), v0);
      vstore(buf + (j - j0) + N, v1);
      vstore(buf + (j - j0) + 2 * N, v2);
      vstore(buf + (j - j0) + 3 * N, v3);
    }
    a0 = max_skipnan(a0, v0);
    a1 = max_skipnan(a1, v1);
    a2 = max_skipnan(a2, v2);
    a3 = max_skipnan(a3, v3);
  }
  for (; j + N <= j1; j += N) {
    const V v = src.vec(j);
    if constexpr (kStore) vstore(buf + (j - j0), v);
    a0 = max_skipnan(a0, v);
  }
  if (j < j1) {
    const int cnt = int(j1 - j);
    const V v = src.part(j, cnt);
    if constexpr (kStore) vstore_n(buf + (j - j0), v, cnt);
    a1 = max_skipnan(a1, v);
  }
  const V a = max_skipnan(max_skipnan(a0, a1), max_skipnan(a2, a3));
  C m = a[0];
  for (int i = 1; i < N; ++i) m = a[i] > m ? a[i] : m;
  return m;
}

// sum of e = 2^((v - ref) * c) over [j0, j1); with STORE, e goes to buf[j - j0]. v comes from buf
// (stored by pass_max) except in Raw mode.
template <bool STORE, typename T, Src S, typename C = compute_t<T>>
C pass_exp(const RowSrc<T, S>& src, C* buf, int64_t j0, int64_t j1, C ref, C c, const T* prefetch = nullptr) {
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  const V vr = vsplat<C>(ref), vc = vsplat<C>(c);
  auto val = [&](int64_t j) -> V {
    if constexpr (S == Src::Raw) {
      return src.vec(j);
    } else {
      return vload(buf + (j - j0));
    }
  };
  V s0 = V{}, s1 = V{};
  int64_t j = j0;
  for (; j + 2 * N <= j1; j += 2 * N) {
    if (prefetch) prefetch_l2<2 * N * sizeof(T)>(prefetch + j);
    const V e0 = vexp2_nonpos((val(j) - vr) * vc);
    const V e1 = vexp2_nonpos((val(j + N) - vr) * vc);
    if constexpr (STORE) {
      vstore(buf + (j - j0), e0);
      vstore(buf + (j - j0) + N, e1);
    }
    s0 += e0;
    s1 += e1;
  }
  for (; j + N <= j1; j += N) {
    const V e = vexp2_nonpos((val(j) - vr) * vc);
    if constexpr (STORE) vstore(buf + (j - j0), e);
    s0 += e;
  }
  if (j < j1) {
    const int cnt = int(j1 - j);
    V v;
    if constexpr (S == Src::Raw) {
      v = src.part(j, cnt);
    } else {
      v = vload_n(buf + (j - j0), cnt, C(0));
    }
    const V e = vexp2_nonpos(fill_from((v - vr) * vc, cnt, -kInf<C>));
    if constexpr (STORE) vstore_n(buf + (j - j0), e, cnt);
    s1 += e;
  }
  return hsum(s0 + s1);
}

template <typename C>
struct Stats {
  C ref, sum;  // ref: the max (-inf for none), sum: of 2^((v - ref') * c), ref' = ref or 0 for -inf
};
// the reference used for the exponent: a row without a finite max uses 0 (its e are 0, or NaN)
template <typename C>
FF_INLINE C usable_ref(C ref) {
  return ref > -kInf<C> ? ref : C(0);
}
template <typename C>
FF_INLINE C inverse_sum(C sum) {
  return sum == C(0) ? C(0) : C(1) / sum;  // fully masked: zeros; NaN stays NaN
}
// merge b into a (segments of one row)
template <typename C>
FF_INLINE void merge_stats(Stats<C>& a, Stats<C> b, C c) {
  const C r = std::max(a.ref, b.ref);
  auto rescaled = [&](const Stats<C>& s) {
    return s.ref == r ? s.sum : s.sum * vexp2_nonpos(vsplat<C>((s.ref - r) * c))[0];
  };
  a.sum = rescaled(a) + rescaled(b);
  a.ref = r;
}

template <typename T, Src S, typename C = compute_t<T>>
Stats<C> segment_stats(const RowSrc<T, S>& src, C* buf, int64_t j0, int64_t j1, C c) {
  const C ref = pass_max(src, buf, j0, j1);
  return {ref, pass_exp<false>(src, buf, j0, j1, usable_ref(ref), c)};
}

// y[j0, j1) = 2^((v - ref) * c) * inv, e recomputed from the source
template <typename T, Src S, typename C = compute_t<T>>
void segment_write(const RowSrc<T, S>& src, T* y, int64_t j0, int64_t j1, C ref, C c, C inv, bool stream) {
  using V = vec_t<C>;
  const V vr = vsplat<C>(ref), vc = vsplat<C>(c), vi = vsplat<C>(inv);
  write_range(
      y, j0, j1, stream, [&](int64_t j) { return vexp2_nonpos((src.vec(j) - vr) * vc) * vi; },
      [&](int64_t j) {
        V t = vsplat<C>(-kInf<C>);
        t[0] = (src.one(j) - ref) * c;
        return vexp2_nonpos(t)[0] * inv;
      });
}

}  // namespace
}  // namespace fusedformer::cpu::FF_ISA
