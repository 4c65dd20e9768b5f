// CPU attention forward: tiled, online softmax (FlashAttention style), accumulation in the compute
// type (float, or double for float64 inputs).
//
// Keys and values are packed once per key/value head into compute-type panels (K transposed, V
// padded to whole vectors), a bounded group of heads at a time; then every (batch, query head,
// block of BR queries) is an independent work item that streams over the key blocks with the
// running max and sum of its rows. Extra memory: the packed group plus a few tiles per thread;
// never L x S. Few query rows per key/value head (generation) take the decode path instead.
#include "attention_common.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

struct FwdPlan {
  int64_t E, Ev, Evp, nkb, nqb, group;
  int64_t kt_head, v_head;  // elements per packed head
};

// K^T panels (block kb at kt + kb * BC * E, panel kst = E) and V panels (block kb at
// vp + kb * BC * Evp, panel kst = BC) of one key/value head.
template <typename T, typename C>
void pack_kv_head(const AttnFwdArgs& a, const FwdPlan& pl, int64_t bkv, C* kt, C* vp) {
  const int64_t b = bkv / a.Hkv, h = bkv % a.Hkv;
  const T* k = static_cast<const T*>(a.k.data) + b * a.k.sb + h * a.k.sh;
  const T* v = static_cast<const T*>(a.v.data) + b * a.v.sb + h * a.v.sh;
  for (int64_t kb = 0; kb < pl.nkb; ++kb) {
    const int64_t j0 = kb * BC, n = std::min<int64_t>(BC, a.S - j0);
    pack_panels_t<T, C>(k + j0 * a.k.sl, a.k.sl, a.k.se, n, pl.E, kt + kb * BC * pl.E, pl.E, BC);
    pack_panels<T, C>(v + j0 * a.v.sl, a.v.sl, a.v.se, n, pl.Ev, C(1), vp + kb * BC * pl.Evp, BC, BC);
  }
}

template <typename T, MaskKind MK, typename C = compute_t<T>>
void fwd_item(const AttnFwdArgs& a, const FwdPlan& pl, int64_t b, int64_t h, int64_t qb, const C* kt, const C* vp,
              C* qs, C* sb, C* ob, C* mrow, C* lrow, const Dropout<C>& drop) {
  const int64_t E = pl.E, Evp = pl.Evp;
  const int64_t i0 = qb * BR, rows = std::min<int64_t>(BR, a.L - i0);
  const T* q = static_cast<const T*>(a.q.data) + b * a.q.sb + h * a.q.sh + i0 * a.q.sl;
  pack_rows<T, C>(q, a.q.sl, a.q.se, rows, E, C(a.scale) * kLog2e<C>, qs, E, rows);
  std::fill(mrow, mrow + rows, -kInf<C>);
  std::fill(lrow, lrow + rows, C(0));
  std::fill(ob, ob + rows * Evp, C(0));
  const void* mask = mask_at<MK, C>(a, b, h);
  int64_t nkb = pl.nkb;
  if (a.causal) nkb = std::min<int64_t>(nkb, ceil_div(i0 + rows, BC));  // keys j <= last query row
  const uint64_t bh = uint64_t(b * a.Hq + h);
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t j0 = kb * BC, valid = std::min<int64_t>(BC, a.S - j0);
    // a partial last block is computed over whole panels only (short sequences: up to ~2x less work)
    const int64_t width = valid == BC ? BC : round_up(valid, Tile<C>::NW);
    gemm<false>(rows, width, E, qs, E, 1, kt + kb * BC * E, E, sb, BC);
    const bool diag = a.causal && j0 + BC - 1 > i0;
    if (MK != MaskKind::None || diag || valid < width)
      mask_tile<MK>(sb, BC, rows, i0, j0, valid, mask, a.m_sl, a.m_ss, diag, width);
    for (int64_t r = 0; r < rows; ++r) {
      C* s = sb + r * BC;
      rescale_row(ob + r * Evp, Evp, softmax_row(s, mrow[r], lrow[r], width));
      if (drop.on) drop.apply(s, valid, bh, i0 + r, j0);
    }
    gemm<true>(rows, Evp, width, sb, BC, 1, vp + kb * BC * Evp, BC, ob, Evp);
  }
  // normalize, write out and the log-sum-exp (natural log; +inf for a fully masked row)
  T* out = static_cast<T*>(a.out) + ((b * a.Hq + h) * a.L + i0) * pl.Ev;
  C* lse = static_cast<C*>(a.lse) + (b * a.Hq + h) * a.L + i0;
  for (int64_t r = 0; r < rows; ++r) finish_row<T, C>(ob + r * Evp, mrow[r], lrow[r], pl.Ev, out + r * pl.Ev, lse + r);
}

template <typename T, MaskKind MK>
void attention_fwd_impl(const AttnFwdArgs& a) {
  using C = compute_t<T>;
  FwdPlan pl;
  pl.E = a.E;
  pl.Ev = a.Ev;
  pl.Evp = round_up(a.Ev, lanes_v<C>);
  pl.nkb = ceil_div(a.S, BC);
  pl.nqb = ceil_div(a.L, BR);
  pl.group = a.Hq / a.Hkv;
  pl.kt_head = pl.nkb * BC * pl.E;
  pl.v_head = pl.nkb * BC * pl.Evp;
  const int64_t BHkv = a.B * a.Hkv;
  // pack at most ~16 MB of keys/values at a time (at least one head)
  const int64_t head_bytes = (pl.kt_head + pl.v_head) * int64_t(sizeof(C));
  const int64_t G = std::max<int64_t>(1, std::min<int64_t>(BHkv, (int64_t(16) << 20) / head_bytes));
  Buf<C> kt(G * pl.kt_head), vp(G * pl.v_head);
  const Dropout<C> drop(a.dropout_p, a.seed);
  for (int64_t g0 = 0; g0 < BHkv; g0 += G) {
    const int64_t g1 = std::min(BHkv, g0 + G);
    parallel_for(g0, g1, 1, [&](int64_t s, int64_t e) {
      for (int64_t x = s; x < e; ++x)
        pack_kv_head<T, C>(a, pl, x, kt.get() + (x - g0) * pl.kt_head, vp.get() + (x - g0) * pl.v_head);
    });
    // items: (query head of the group, query block); causal: the longest (last) query blocks first
    const int64_t heads = (g1 - g0) * pl.group;
    run_items(heads * pl.nqb, [&](const auto& take) {
      Buf<C> qs(BR * pl.E), sb(BR * BC), ob(BR * pl.Evp), ml(2 * BR);
      for (int64_t it; (it = take()) >= 0;) {
        int64_t hq, qb;
        if (a.causal) {
          qb = pl.nqb - 1 - it / heads;
          hq = it % heads;
        } else {
          qb = it % pl.nqb;
          hq = it / pl.nqb;
        }
        const int64_t x = g0 + hq / pl.group;
        const int64_t b = x / a.Hkv, h = (x % a.Hkv) * pl.group + hq % pl.group;
        fwd_item<T, MK>(a, pl, b, h, qb, kt.get() + (x - g0) * pl.kt_head, vp.get() + (x - g0) * pl.v_head,
                        qs.get(), sb.get(), ob.get(), ml.get(), ml.get() + BR, drop);
      }
    });
  }
}

}  // namespace

void attention_fwd(const AttnFwdArgs& a) {
  if (attention_decode_applies(a)) {
    attention_decode(a);
    return;
  }
  dispatch_dtype(a.dtype, [&](auto tag) {
    dispatch_mask(a.mask_kind, [&](auto mk) { attention_fwd_impl<decltype(tag), decltype(mk)::value>(a); });
  });
}

}  // namespace fusedformer::cpu::FF_ISA
