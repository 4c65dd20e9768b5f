// CPU attention forward: tiled, online softmax (FlashAttention style), accumulation in the compute
// type (float, or double for float64 inputs).
//
// Keys and values are packed once per key/value head into compute-type panels (K transposed, V
// padded to whole vectors), a bounded group of heads at a time; then every (batch, query head,
// block of BR queries) is an independent work item that streams over spans of kSpanKeys keys with
// the running max and sum of its rows. A span of several 64-key blocks amortizes each row's
// per-step work (its max and sum reductions, the rescaling of its output) over more keys. Extra
// memory: the packed group plus a few tiles per thread; never L x S. Few query rows per key/value
// head (generation) take the decode path instead.
#include "attention_common.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

// Keys per span (a multiple of BC).
constexpr int64_t kSpanKeys = 4 * BC;

struct FwdPlan {
  int64_t E, Ev, Evp, nspan, nqb, group;
  int64_t kt_head, v_head;  // elements per packed head
};

// K^T panels (key j's column at kt + j * E) and V panels (span sp at vp + sp * kSpanKeys * Evp, panel
// kst = kSpanKeys) of one key/value head; the keys of the last span zero-padded to a whole block.
template <typename T, typename C>
void pack_kv_head(const AttnFwdArgs& a, const FwdPlan& pl, int64_t bkv, C* kt, C* vp) {
  const int64_t b = bkv / a.Hkv, h = bkv % a.Hkv;
  const T* k = static_cast<const T*>(a.k.data) + b * a.k.sb + h * a.k.sh;
  const T* v = static_cast<const T*>(a.v.data) + b * a.v.sb + h * a.v.sh;
  for (int64_t sp = 0; sp < pl.nspan; ++sp) {
    const int64_t j0 = sp * kSpanKeys, n = std::min<int64_t>(kSpanKeys, a.S - j0), pad = round_up(n, BC);
    pack_panels_t<T, C>(k + j0 * a.k.sl, a.k.sl, a.k.se, n, pl.E, kt + j0 * pl.E, pl.E, pad);
    pack_panels<T, C>(v + j0 * a.v.sl, a.v.sl, a.v.se, n, pl.Ev, C(1), vp + sp * kSpanKeys * pl.Evp, kSpanKeys, pad);
  }
}

// Online softmax over a row of base-2 logits s[0, width) (width a multiple of the lane count, at
// most kSpanKeys): updates the running max m and sum l, turns s into probabilities (before dropout) and
// returns the factor the row's output must be scaled by.
template <typename C>
FF_INLINE C softmax_span_row(C* s, C& m, C& l, int64_t width) {
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  if (width <= BC) return softmax_row(s, m, l, width);
  V mx0 = vbroadcast<C>(-kInf<C>), mx1 = mx0;
  int64_t c = 0;
  for (; c + 2 * N <= width; c += 2 * N) {
    mx0 = vmax(mx0, vload(s + c));
    mx1 = vmax(mx1, vload(s + c + N));
  }
  if (c < width) mx0 = vmax(mx0, vload(s + c));
  const C m_new = std::max(m, hmax(vmax(mx0, mx1)));
  if (m_new == -kInf<C>) return masked_row(s, l, width);
  const V vm = vbroadcast<C>(m_new);
  V sum0 = V{}, sum1 = V{};
  for (c = 0; c + 2 * N <= width; c += 2 * N) {
    const V p0 = vexp2_nonpos(vload(s + c) - vm), p1 = vexp2_nonpos(vload(s + c + N) - vm);
    sum0 += p0;
    sum1 += p1;
    vstore(s + c, p0);
    vstore(s + c + N, p1);
  }
  if (c < width) {
    const V p0 = vexp2_nonpos(vload(s + c) - vm);
    sum0 += p0;
    vstore(s + c, p0);
  }
  const C alpha = m == m_new ? C(1) : std::exp2(m - m_new);
  l = l * alpha + hsum(sum0 + sum1);
  m = m_new;
  return alpha;
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
  // causal: no row of the block sees keys beyond its last row
  const int64_t keys = a.causal ? std::min<int64_t>(a.S, i0 + rows) : a.S;
  const uint64_t bh = uint64_t(b * a.Hq + h);
  for (int64_t j0 = 0; j0 < keys; j0 += kSpanKeys) {
    const int64_t valid = std::min<int64_t>(kSpanKeys, a.S - j0), span = std::min<int64_t>(kSpanKeys, keys - j0);
    // a partial last span is computed over whole panels only (short sequences: up to ~2x less work)
    const int64_t width = span == kSpanKeys ? kSpanKeys : round_up(span, Tile<C>::NW);
    gemm<false>(rows, width, E, qs, E, 1, kt + j0 * E, E, sb, kSpanKeys);
    const bool diag = a.causal && j0 + width - 1 > i0;
    if (MK != MaskKind::None || diag || valid < width)
      mask_tile<MK>(sb, kSpanKeys, rows, i0, j0, valid, mask, a.m_sl, a.m_ss, diag, width);
    for (int64_t r = 0; r < rows; ++r) {
      C* s = sb + r * kSpanKeys;
      rescale_row(ob + r * Evp, Evp, softmax_span_row(s, mrow[r], lrow[r], width));
      if (drop.on) drop.apply(s, std::min(valid, width), bh, i0 + r, j0);
    }
    gemm<true>(rows, Evp, width, sb, kSpanKeys, 1, vp + (j0 / kSpanKeys) * kSpanKeys * Evp, kSpanKeys, ob, Evp);
  }
  // normalize, write out and the log-sum-exp (natural log; +inf for a fully masked row)
  C* lse = static_cast<C*>(a.lse) + (b * a.Hq + h) * a.L + i0;
  for (int64_t r = 0; r < rows; ++r)
    finish_row<T, C>(ob + r * Evp, mrow[r], lrow[r], pl.Ev, out_row<T>(a, b, h, i0 + r), lse + r);
}

template <typename T, MaskKind MK>
void attention_fwd_impl(const AttnFwdArgs& a) {
  using C = compute_t<T>;
  FwdPlan pl;
  pl.E = a.E;
  pl.Ev = a.Ev;
  pl.Evp = round_up(a.Ev, lanes_v<C>);
  pl.nspan = ceil_div(a.S, kSpanKeys);
  pl.nqb = ceil_div(a.L, BR);
  pl.group = a.Hq / a.Hkv;
  pl.kt_head = round_up(a.S, BC) * pl.E;
  pl.v_head = pl.nspan * kSpanKeys * pl.Evp;
  const int64_t BHkv = a.B * a.Hkv;
  // pack ~2 MB of keys/values at a time (cache-sized, and an allocation that is reused rather than
  // mapped afresh on every call), but enough heads for a few items per thread
  const int64_t head_bytes = (pl.kt_head + pl.v_head) * int64_t(sizeof(C));
  const int64_t min_heads = ceil_div(4 * num_threads(), pl.group * pl.nqb);
  const int64_t G = std::min<int64_t>(BHkv, std::max<int64_t>({1, min_heads, (int64_t(2) << 20) / head_bytes}));
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
      Buf<C> qs(BR * pl.E), sb(BR * kSpanKeys), ob(BR * pl.Evp), ml(2 * BR);
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
