// CPU attention backward (FlashAttention-2 order): for each block of keys, loop over the query
// blocks of every query head that reads it, recompute the probabilities from the saved
// log-sum-exp, and accumulate dV and dK for the block in compute-type tiles and dQ in a
// compute-type buffer.
//
// Work items are (batch, key/value head, range of key blocks). An item that has all the key blocks
// of its head accumulates dQ of the head's queries in a buffer of its own and writes it at the end.
// When there are fewer key/value heads than threads, the key blocks of a head are split over
// several items, each with its own share of a dQ buffer, summed at the end in a fixed order (so the
// result does not depend on the thread count).
#include "attention_common.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

struct BwdPlan {
  int64_t E, Ev, Ep, Evp, group, nkb, nqb, nsplit, dq_size;
  bool local_dq;  // nsplit == 1: each item keeps dQ of its heads in its tiles
};

// Tiles of one worker.
template <typename C>
struct BwdTiles {
  Buf<C> kt, kp, vt, dk, dv, qs, qp, dob, dop, pb, dpb, pdb, dql;
  BwdTiles(const BwdPlan& pl, int64_t L, bool dropout)
      : kt(pl.E * BC),
        kp(BC * pl.Ep),
        vt(pl.Ev * BC),
        dk(BC * pl.Ep),
        dv(BC * pl.Evp),
        qs(BR * pl.E),
        qp(BR * pl.Ep),
        dob(BR * pl.Ev),
        dop(BR * pl.Evp),
        pb(BR * BC),
        dpb(BR * BC),
        pdb(dropout ? BR * BC : 1),
        dql(pl.local_dq ? pl.group * L * pl.Ep : 1) {}
};

template <typename T, MaskKind MK, typename C = compute_t<T>>
void bwd_item(const AttnBwdArgs& ba, const BwdPlan& pl, int64_t x, int64_t split, const C* dvec, const C* lse2,
              C* dq, BwdTiles<C>& t, const Dropout<C>& drop) {
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  const AttnFwdArgs& a = ba.fwd;
  const int64_t E = pl.E, Ev = pl.Ev, Ep = pl.Ep, Evp = pl.Evp;
  const int64_t b = x / a.Hkv, hkv = x % a.Hkv;
  const int64_t kb0 = pl.nkb * split / pl.nsplit, kb1 = pl.nkb * (split + 1) / pl.nsplit;
  const T* k = static_cast<const T*>(a.k.data) + b * a.k.sb + hkv * a.k.sh;
  const T* v = static_cast<const T*>(a.v.data) + b * a.v.sb + hkv * a.v.sh;
  const AttnTensor& g = ba.grad_out;
  const C scale = C(a.scale), scale2 = C(a.scale) * kLog2e<C>;
  C* dqs = dq + split * pl.dq_size;
  if (pl.local_dq) std::fill(t.dql.get(), t.dql.get() + pl.group * a.L * Ep, C(0));
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t j0 = kb * BC, valid = std::min<int64_t>(BC, a.S - j0);
    pack_panels_t<T, C>(k + j0 * a.k.sl, a.k.sl, a.k.se, valid, E, t.kt.get(), E, BC);
    pack_panels<T, C>(k + j0 * a.k.sl, a.k.sl, a.k.se, valid, E, C(1), t.kp.get(), BC, BC);
    pack_panels_t<T, C>(v + j0 * a.v.sl, a.v.sl, a.v.se, valid, Ev, t.vt.get(), Ev, BC);
    std::fill(t.dk.get(), t.dk.get() + BC * Ep, C(0));
    std::fill(t.dv.get(), t.dv.get() + BC * Evp, C(0));
    for (int64_t hg = 0; hg < pl.group; ++hg) {
      const int64_t h = hkv * pl.group + hg;
      const int64_t xq = b * a.Hq + h;
      const T* q = static_cast<const T*>(a.q.data) + b * a.q.sb + h * a.q.sh;
      const T* go = static_cast<const T*>(g.data) + b * g.sb + h * g.sh;
      const void* mask = mask_at<MK, C>(a, b, h);
      // with causal masking, query rows before j0 see none of these keys
      const int64_t qb_first = a.causal ? std::min<int64_t>(pl.nqb, j0 / BR) : 0;
      for (int64_t qb = qb_first; qb < pl.nqb; ++qb) {
        const int64_t i0 = qb * BR, rows = std::min<int64_t>(BR, a.L - i0);
        pack_rows<T, C>(q + i0 * a.q.sl, a.q.sl, a.q.se, rows, E, scale2, t.qs.get(), E, rows);
        pack_panels<T, C>(q + i0 * a.q.sl, a.q.sl, a.q.se, rows, E, scale, t.qp.get(), BR, rows);
        pack_rows<T, C>(go + i0 * g.sl, g.sl, g.se, rows, Ev, C(1), t.dob.get(), Ev, rows);
        pack_panels<T, C>(go + i0 * g.sl, g.sl, g.se, rows, Ev, C(1), t.dop.get(), BR, rows);
        const C* l2 = lse2 + xq * a.L + i0;
        const C* dd = dvec + xq * a.L + i0;
        C* p = t.pb.get();
        C* dp = t.dpb.get();
        // P = exp2(S - lse2)
        gemm<false>(rows, BC, E, t.qs.get(), E, 1, t.kt.get(), E, p, BC);
        const bool diag = a.causal && j0 + BC - 1 > i0;
        if (MK != MaskKind::None || diag || valid < BC)
          mask_tile<MK>(p, BC, rows, i0, j0, valid, mask, a.m_sl, a.m_ss, diag);
        for (int64_t r = 0; r < rows; ++r) {
          const V vl = vbroadcast<C>(l2[r]);
          C* pr = p + r * BC;
          for (int64_t c = 0; c < BC; c += N) vstore(pr + c, vexp2_nonpos(vload(pr + c) - vl));
        }
        // dP = dO V^T
        gemm<false>(rows, BC, Ev, t.dob.get(), Ev, 1, t.vt.get(), Ev, dp, BC);
        const C* pv = p;
        if (drop.on) {
          // dV takes the dropped probabilities, and dP the same mask; dS below uses plain P
          C* pd = t.pdb.get();
          std::copy(p, p + rows * BC, pd);
          for (int64_t r = 0; r < rows; ++r) {
            drop.apply(pd + r * BC, valid, uint64_t(xq), i0 + r, j0);
            drop.apply(dp + r * BC, valid, uint64_t(xq), i0 + r, j0);
          }
          pv = pd;
        }
        // dV += P^T dO
        gemm<true>(valid, Evp, rows, pv, 1, BC, t.dop.get(), BR, t.dv.get(), Evp);
        // dS = P * (dP - D)   (into dp)
        for (int64_t r = 0; r < rows; ++r) {
          const C* pr = p + r * BC;
          C* dpr = dp + r * BC;
          const V vd = vbroadcast<C>(dd[r]);
          for (int64_t c = 0; c < BC; c += N) vstore(dpr + c, vload(pr + c) * (vload(dpr + c) - vd));
        }
        // dK += dS^T (scale Q), dQ += dS K (scaled at the end)
        gemm<true>(valid, Ep, rows, dp, 1, BC, t.qp.get(), BR, t.dk.get(), Ep);
        C* dqr = pl.local_dq ? t.dql.get() + (hg * a.L + i0) * Ep : dqs + (xq * a.L + i0) * Ep;
        gemm<true>(rows, Ep, BC, dp, BC, 1, t.kp.get(), BC, dqr, Ep);
      }
    }
    // write dK and dV for this key block
    T* gk = static_cast<T*>(ba.grad_k) + (x * a.S + j0) * E;
    T* gv = static_cast<T*>(ba.grad_v) + (x * a.S + j0) * Ev;
    for (int64_t r = 0; r < valid; ++r) {
      for (int64_t c = 0; c < E; ++c) gk[r * E + c] = to_storage<T>(t.dk.get()[r * Ep + c]);
      for (int64_t c = 0; c < Ev; ++c) gv[r * Ev + c] = to_storage<T>(t.dv.get()[r * Evp + c]);
    }
  }
  if (pl.local_dq) {
    // dQ = scale * the item's sum, for the query heads of this key/value head
    T* gq = static_cast<T*>(ba.grad_q) + (b * a.Hq + hkv * pl.group) * a.L * E;
    for (int64_t r = 0; r < pl.group * a.L; ++r)
      for (int64_t c = 0; c < E; ++c) gq[r * E + c] = to_storage<T>(t.dql.get()[r * Ep + c] * scale);
  }
}

template <typename T, MaskKind MK>
void attention_bwd_impl(const AttnBwdArgs& ba) {
  using C = compute_t<T>;
  const AttnFwdArgs& a = ba.fwd;
  BwdPlan pl;
  pl.E = a.E;
  pl.Ev = a.Ev;
  pl.Ep = round_up(a.E, lanes_v<C>);
  pl.Evp = round_up(a.Ev, lanes_v<C>);
  pl.group = a.Hq / a.Hkv;
  pl.nkb = ceil_div(a.S, BC);
  pl.nqb = ceil_div(a.L, BR);
  const int64_t BHq = a.B * a.Hq, BHkv = a.B * a.Hkv;
  const int threads = num_threads();
  pl.nsplit = BHkv >= threads ? 1 : std::min<int64_t>(pl.nkb, ceil_div(2 * threads, BHkv));
  pl.local_dq = pl.nsplit == 1;
  pl.dq_size = pl.local_dq ? 0 : BHq * a.L * pl.Ep;

  // D = rowsum(dO * O) and the base-2 log-sum-exp, per query row
  Buf<C> dvec(BHq * a.L), lse2(BHq * a.L);
  const T* out = static_cast<const T*>(a.out);
  const AttnTensor& g = ba.grad_out;
  parallel_for(0, BHq, 1, [&](int64_t s, int64_t e) {
    for (int64_t x = s; x < e; ++x) {
      const int64_t b = x / a.Hq, h = x % a.Hq;
      const T* go = static_cast<const T*>(g.data) + b * g.sb + h * g.sh;
      const T* o = out + x * a.L * pl.Ev;
      const C* lse = static_cast<const C*>(a.lse) + x * a.L;
      for (int64_t i = 0; i < a.L; ++i) {
        C d = C(0);
        for (int64_t c = 0; c < pl.Ev; ++c) d += C(to_float(go[i * g.sl + c * g.se])) * C(to_float(o[i * pl.Ev + c]));
        dvec.get()[x * a.L + i] = d;
        lse2.get()[x * a.L + i] = lse[i] * kLog2e<C>;
      }
    }
  });

  Buf<C> dq(pl.local_dq ? 1 : pl.nsplit * pl.dq_size);
  parallel_for(0, pl.nsplit * pl.dq_size, 1 << 16,
               [&](int64_t s, int64_t e) { std::fill(dq.get() + s, dq.get() + e, C(0)); });

  const Dropout<C> drop(a.dropout_p, a.seed);
  run_items(BHkv * pl.nsplit, [&](const auto& take) {
    BwdTiles<C> t(pl, a.L, drop.on);
    for (int64_t it; (it = take()) >= 0;)
      bwd_item<T, MK>(ba, pl, it / pl.nsplit, it % pl.nsplit, dvec.get(), lse2.get(), dq.get(), t, drop);
  });

  if (pl.local_dq) return;
  // dQ = scale * sum over splits
  T* gq = static_cast<T*>(ba.grad_q);
  const C scale = C(a.scale);
  parallel_for(0, BHq * a.L, 64, [&](int64_t s, int64_t e) {
    for (int64_t row = s; row < e; ++row) {
      for (int64_t c = 0; c < pl.E; ++c) {
        C acc = C(0);
        for (int64_t sp = 0; sp < pl.nsplit; ++sp) acc += dq.get()[sp * pl.dq_size + row * pl.Ep + c];
        gq[row * pl.E + c] = to_storage<T>(acc * scale);
      }
    }
  });
}

}  // namespace

void attention_bwd(const AttnBwdArgs& a) {
  dispatch_dtype(a.fwd.dtype, [&](auto tag) {
    dispatch_mask(a.fwd.mask_kind, [&](auto mk) { attention_bwd_impl<decltype(tag), decltype(mk)::value>(a); });
  });
}

}  // namespace fusedformer::cpu::FF_ISA
