// CPU attention forward for few query rows per key/value head (generation: one or a few new
// tokens against a KV cache of S keys, often a strided view of a preallocated buffer).
//
// One work item is (batch, key/value head, range of keys): it takes all the query rows of the
// heads of its group together and reads every key and value row once, straight from storage when
// the layout allows (else converted a block at a time into a small buffer), so the op streams the
// cache at memory speed. When there are fewer heads than threads, the keys are split and the
// partial results merged by their log-sum-exp.
#include "attention_stream.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

// Query rows per key/value head (group size x L) up to which the decode path is taken.
constexpr int64_t kMaxRows = 8;
// Fewest keys per split.
constexpr int64_t kMinSplitKeys = 512;

struct DecodePlan {
  int64_t group, R, E, Ev, Ep, Evp, nkb, nsplit;
  bool k_direct, v_direct;  // read keys / values in place (compute type, contiguous features)
};

template <typename T, MaskKind MK, typename C = compute_t<T>>
void decode_item(const AttnFwdArgs& a, const DecodePlan& pl, int64_t x, int64_t split, const StreamRows<C>& st,
                 C* kbuf, C* vbuf, C* part, const Dropout<C>& drop) {
  const int64_t b = x / a.Hkv, hkv = x % a.Hkv, R = pl.R;
  // the query rows of the group: row r is (head hkv * group + r / L, position r % L)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = hkv * pl.group + r / a.L, i = r % a.L;
    const T* q = static_cast<const T*>(a.q.data) + b * a.q.sb + h * a.q.sh + i * a.q.sl;
    pack_rows<T, C>(q, 0, a.q.se, 1, pl.E, C(a.scale) * kLog2e<C>, st.qd + r * pl.Ep, pl.Ep, 1);
  }
  st.reset();
  const T* k = static_cast<const T*>(a.k.data) + b * a.k.sb + hkv * a.k.sh;
  const T* v = static_cast<const T*>(a.v.data) + b * a.v.sb + hkv * a.v.sh;
  int64_t kb0 = pl.nkb * split / pl.nsplit, kb1 = pl.nkb * (split + 1) / pl.nsplit;
  if (a.causal) kb1 = std::min<int64_t>(kb1, ceil_div(a.L, BC));  // no row sees keys beyond L - 1
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t j0 = kb * BC, n = std::min<int64_t>(BC, a.S - j0);
    int64_t ldk;
    const C* kp = block_rows<T, C>(pl.k_direct, k + j0 * a.k.sl, a.k.sl, a.k.se, n, pl.E, kbuf, pl.Ep, ldk);
    stream_block<C>(
        st, [&](int64_t j) { return kp + j * ldk; }, n,
        [&](int64_t r, C* s) {
          const int64_t h = hkv * pl.group + r / a.L, i = r % a.L;
          mask_tile<MK>(s, BC, 1, i, j0, n, mask_at<MK, C>(a, b, h), a.m_sl, a.m_ss, a.causal);
        },
        [&](int64_t r, C* s) {
          if (drop.on) drop.apply(s, n, uint64_t(b * a.Hq + hkv * pl.group + r / a.L), r % a.L, j0);
        },
        [&](const auto& seg) {
          int64_t ldv;
          const C* vp = block_rows<T, C>(pl.v_direct, v + j0 * a.v.sl, a.v.sl, a.v.se, n, pl.Ev, vbuf, pl.Evp, ldv);
          seg(0, n, vp, ldv);
        });
  }
  if (pl.nsplit > 1) {
    store_partial(st, part + (x * pl.nsplit + split) * R * (pl.Evp + 2));
    return;
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = hkv * pl.group + r / a.L, i = r % a.L;
    finish_row<T, C>(st.ob + r * pl.Evp, st.m[r], st.l[r], pl.Ev, out_row<T>(a, b, h, i),
                     static_cast<C*>(a.lse) + (b * a.Hq + h) * a.L + i);
  }
}

// Merge the splits of key/value head x: out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s.
template <typename T, typename C = compute_t<T>>
void merge_splits(const AttnFwdArgs& a, const DecodePlan& pl, int64_t x, const C* part, C* acc) {
  const int64_t b = x / a.Hkv, hkv = x % a.Hkv, ld = pl.Evp + 2;
  for (int64_t r = 0; r < pl.R; ++r) {
    const int64_t h = hkv * pl.group + r / a.L, i = r % a.L;
    C M, l;
    merge_partials(part + (x * pl.nsplit * pl.R + r) * ld, pl.R * ld, pl.nsplit, pl.Ev, acc, M, l);
    finish_row<T, C>(acc, M, l, pl.Ev, out_row<T>(a, b, h, i), static_cast<C*>(a.lse) + (b * a.Hq + h) * a.L + i);
  }
}

template <typename T, MaskKind MK>
void decode_impl(const AttnFwdArgs& a) {
  using C = compute_t<T>;
  constexpr int N = lanes_v<C>;
  DecodePlan pl;
  pl.group = a.Hq / a.Hkv;
  pl.R = pl.group * a.L;
  pl.E = a.E;
  pl.Ev = a.Ev;
  pl.Ep = round_up(a.E, N);
  pl.Evp = round_up(a.Ev, N);
  pl.nkb = ceil_div(a.S, BC);
  pl.k_direct = std::is_same_v<T, C> && a.k.se == 1 && a.E % N == 0;
  pl.v_direct = std::is_same_v<T, C> && a.v.se == 1 && a.Ev % N == 0;
  const int64_t BHkv = a.B * a.Hkv;
  const int64_t threads = num_threads();
  pl.nsplit = 1;
  if (BHkv < 2 * threads && !a.causal)
    pl.nsplit = std::max<int64_t>(1, std::min(ceil_div(2 * threads, BHkv), a.S / kMinSplitKeys));
  pl.nsplit = std::min(pl.nsplit, pl.nkb);
  Buf<C> part(pl.nsplit > 1 ? BHkv * pl.nsplit * pl.R * (pl.Evp + 2) : 1);
  const Dropout<C> drop(a.dropout_p, a.seed);
  run_items(BHkv * pl.nsplit, [&](const auto& take) {
    Buf<C> qd(pl.R * pl.Ep), sb(pl.R * BC), ob(pl.R * pl.Evp), kbuf(pl.k_direct ? 1 : BC * pl.Ep),
        vbuf(pl.v_direct ? 1 : BC * pl.Evp), ml(2 * pl.R);
    const StreamRows<C> st{pl.R, pl.Ep, pl.Evp, qd.get(), sb.get(), ob.get(), ml.get(), ml.get() + pl.R};
    for (int64_t it; (it = take()) >= 0;)
      decode_item<T, MK>(a, pl, it / pl.nsplit, it % pl.nsplit, st, kbuf.get(), vbuf.get(), part.get(), drop);
  });
  if (pl.nsplit > 1) {
    parallel_for(0, BHkv, 1, [&](int64_t s, int64_t e) {
      Buf<C> acc(pl.Ev);
      for (int64_t x = s; x < e; ++x) merge_splits<T>(a, pl, x, part.get(), acc.get());
    });
  }
}

}  // namespace

bool attention_decode_applies(const AttnFwdArgs& a) { return (a.Hq / a.Hkv) * a.L <= kMaxRows; }

void attention_decode(const AttnFwdArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    dispatch_mask(a.mask_kind, [&](auto mk) { decode_impl<decltype(tag), decltype(mk)::value>(a); });
  });
}

}  // namespace fusedformer::cpu::FF_ISA
