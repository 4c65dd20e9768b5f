// CPU cross-entropy rows (the loss of linear_cross_entropy): the row passes of the softmax
// (softmax_rows.h) give lse = max + ln(sum); the gradient row is the softmax scaled, written like a
// softmax output. Compiled once per instruction set (see vec.h).
#include "softmax_rows.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

template <typename T>
void cross_entropy_rows(const CrossEntropyArgs& a) {
  using C = compute_t<T>;
  using V = vec_t<C>;
  const T* x = static_cast<const T*>(a.x);
  T* grad = static_cast<T*>(a.grad);
  C* loss = static_cast<C*>(a.loss);
  const int64_t n = a.n;
  const C c = C(kLog2eD), scale = *static_cast<const C*>(a.scale);
  const bool in_cache = n <= kRowInCache;
  parallel_for(0, a.rows, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    Scratch<C> buf(in_cache ? n : kSegment);
    for (int64_t r = r0; r < r1; ++r) {
      const RowSrc<T, Src::Raw> src{x + r * n, nullptr, nullptr, C(1), C(0)};
      const int64_t t = a.target[r];
      const bool keep = t != a.ignore_index;
      C ref, sum;
      if (in_cache) {  // e stays in buf for the gradient
        ref = usable_ref(pass_max(src, buf.p, 0, n));
        sum = pass_exp<true>(src, buf.p, 0, n, ref, c);
      } else {
        Stats<C> st{-kInf<C>, C(0)};
        for (int64_t j0 = 0; j0 < n; j0 += kSegment)
          merge_stats(st, segment_stats(src, buf.p, j0, std::min(n, j0 + kSegment), c), c);
        ref = usable_ref(st.ref);
        sum = st.sum;
      }
      const C lse = ref + std::log(sum);
      loss[r] = keep ? lse - C(to_float(x[r * n + t])) : C(0);
      if (!grad) continue;
      T* g = grad + r * n;
      if (!keep) {
        write_zeros(g, 0, n, false);
        continue;
      }
      const C k = inverse_sum(sum) * scale;
      if (in_cache) {
        const V vk = vsplat<C>(k);
        write_range(g, 0, n, false, [&](int64_t j) { return vload(buf.p + j) * vk; },
                    [&](int64_t j) { return buf.p[j] * k; });
      } else {
        segment_write(src, g, 0, n, ref, c, k, false);
      }
      g[t] = to_storage<T>(std::exp(C(to_float(x[r * n + t])) - lse) * scale - scale);
    }
  });
}

}  // namespace

void cross_entropy(const CrossEntropyArgs& a) {
  if (a.rows == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) { cross_entropy_rows<decltype(tag)>(a); });
}

}  // namespace fusedformer::cpu::FF_ISA
