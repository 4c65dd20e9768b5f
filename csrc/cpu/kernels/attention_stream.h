// Streaming a sequence of keys and values for a few query rows, shared by the decode kernel
// (attention_decode_kernel.cpp: a dense, possibly strided cache) and the paged kernel
// (paged_attention_kernel.cpp: keys read through a block table). The keys are visited in blocks of
// at most BC; each block updates the rows' online softmax state (running max m, sum l and the
// unnormalized output o). Splits of one sequence are merged by their log-sum-exp.
#pragma once

#include "attention_common.h"

namespace fusedformer::cpu::FF_ISA {

// s[j] = q . k_j for keys j < n, k_j = key_row(j) (Ep features, zero-padded like q); the scores of
// keys [n, round_up(n, lanes)) are unspecified.
template <typename C, typename KeyRow>
FF_INLINE void dot_keys(const C* q, const KeyRow& key_row, int64_t Ep, int64_t n, C* s) {
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  for (int64_t j0 = 0; j0 < n; j0 += N) {
    const C* kr[N];
    for (int t = 0; t < N; ++t) kr[t] = key_row(std::min<int64_t>(j0 + t, n - 1));
    V acc[N];
    for (int t = 0; t < N; ++t) acc[t] = V{};
    for (int64_t e = 0; e < Ep; e += N) {
      const V qv = vload(q + e);
      for (int t = 0; t < N; ++t) acc[t] += qv * vload(kr[t] + e);
    }
    vstore(s + j0, reduce_lanes<C>(acc));
  }
}

// n rows of cols features as compute-type rows with stride ld: in place when direct (storage is the
// compute type with contiguous features), else converted into buf (row stride ldp, zero-padded).
template <typename T, typename C>
FF_INLINE const C* block_rows(bool direct, const T* src, int64_t sl, int64_t se, int64_t n, int64_t cols, C* buf,
                              int64_t ldp, int64_t& ld) {
  if (direct) {
    ld = sl;
    return reinterpret_cast<const C*>(src);
  }
  pack_rows<T, C>(src, sl, se, n, cols, C(1), buf, ldp, n);
  ld = ldp;
  return buf;
}

// The running state of R query rows: qd (R x Ep, base-2 scaled queries), sb (R x BC scores),
// ob (R x Evp outputs), m and l (R each).
template <typename C>
struct StreamRows {
  int64_t R, Ep, Evp;
  C *qd, *sb, *ob, *m, *l;
  void reset() const {
    std::fill(m, m + R, -kInf<C>);
    std::fill(l, l + R, C(0));
    std::fill(ob, ob + R * Evp, C(0));
  }
};

// One block of n <= BC keys for every row: scores against key_row(j), then mask_row(r, s) turns row
// r's scores into base-2 logits (masking keys [n, BC) among others), the online softmax, after(r, p)
// on the probabilities (dropout), and o += P V. value_segments(seg) supplies V: it calls
// seg(j0, j1, v, ld) for consecutive ranges of keys covering [0, n), v the rows of keys j0..j1 - 1
// (Evp columns, rows ld apart), so that values spread over several cache blocks need no copy.
template <typename C, typename KeyRow, typename MaskRow, typename After, typename ValueSegments>
FF_INLINE void stream_block(const StreamRows<C>& st, const KeyRow& key_row, int64_t n, const MaskRow& mask_row,
                            const After& after, const ValueSegments& value_segments) {
  for (int64_t r = 0; r < st.R; ++r) dot_keys<C>(st.qd + r * st.Ep, key_row, st.Ep, n, st.sb + r * BC);
  for (int64_t r = 0; r < st.R; ++r) {
    C* s = st.sb + r * BC;
    mask_row(r, s);
    rescale_row(st.ob + r * st.Evp, st.Evp, softmax_block_row(s, st.m[r], st.l[r]));
    after(r, s);
  }
  value_segments([&](int64_t j0, int64_t j1, const C* vp, int64_t ldv) {
    gemm_rm<true>(st.R, st.Evp, j1 - j0, st.sb + j0, BC, 1, vp, ldv, st.ob, st.Evp);
  });
}

// The partial result of one split at p: per row m, l and the unnormalized output (Evp + 2 values).
template <typename C>
FF_INLINE void store_partial(const StreamRows<C>& st, C* p) {
  for (int64_t r = 0; r < st.R; ++r) {
    C* d = p + r * (st.Evp + 2);
    d[0] = st.m[r];
    d[1] = st.l[r];
    std::copy(st.ob + r * st.Evp, st.ob + (r + 1) * st.Evp, d + 2);
  }
}

// Merges the partials of one row, nsplit of them `stride` elements apart from p (each as
// store_partial writes it): acc[0, Ev) = sum_s 2^(m_s - M) o_s and l = sum_s 2^(m_s - M) l_s.
template <typename C>
FF_INLINE void merge_partials(const C* p, int64_t stride, int64_t nsplit, int64_t Ev, C* acc, C& M, C& l) {
  M = -kInf<C>;
  for (int64_t s = 0; s < nsplit; ++s) M = std::max(M, p[s * stride]);
  l = C(0);
  std::fill(acc, acc + Ev, C(0));
  if (M == -kInf<C>) return;
  for (int64_t s = 0; s < nsplit; ++s) {
    const C* q = p + s * stride;
    if (q[0] == -kInf<C>) continue;
    const C w = std::exp2(q[0] - M);
    l += w * q[1];
    for (int64_t c = 0; c < Ev; ++c) acc[c] += w * q[2 + c];
  }
}

}  // namespace fusedformer::cpu::FF_ISA
