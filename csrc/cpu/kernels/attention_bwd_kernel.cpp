// CPU attention backward (FlashAttention-2 order): for each block of keys, loop over the query
// blocks of every query head that reads it, recompute the probabilities from the saved
// log-sum-exp, and accumulate dV and dK for the block in float32 tiles and dQ in a float32 buffer.
//
// Work items are (batch, key/value head, range of key blocks). When there are fewer key/value heads
// than threads, the key blocks of a head are split over several items, each with its own dQ
// buffer, summed at the end in a fixed order (so the result does not depend on the thread count).
#include "attention_common.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

template <typename T, MaskKind MK>
void attention_bwd_impl(const AttnBwdArgs& ba) {
  const AttnFwdArgs& a = ba.fwd;
  const int64_t E = a.E, Ev = a.Ev, Ep = round_up(E, W), Evp = round_up(Ev, W);
  const int64_t group = a.Hq / a.Hkv;
  const int64_t nkb = ceil_div(a.S, BC), nqb = ceil_div(a.L, BR);
  const int64_t BHq = a.B * a.Hq, BHkv = a.B * a.Hkv;
  const int threads = num_threads();
  const int64_t nsplit = BHkv >= threads ? 1 : std::min<int64_t>(nkb, ceil_div(2 * threads, BHkv));

  // D = rowsum(dO * O) and the base-2 log-sum-exp, per query row
  FBuf dvec(BHq * a.L), lse2(BHq * a.L);
  const T* out = static_cast<const T*>(a.out);
  parallel_for(0, BHq, 1, [&](int64_t s, int64_t e) {
    for (int64_t x = s; x < e; ++x) {
      const int64_t b = x / a.Hq, h = x % a.Hq;
      const T* go = static_cast<const T*>(ba.grad_out.data) + b * ba.grad_out.sb + h * ba.grad_out.sh;
      const T* o = out + x * a.L * Ev;
      for (int64_t i = 0; i < a.L; ++i) {
        float d = 0.f;
        for (int64_t c = 0; c < Ev; ++c) d += to_float(go[i * ba.grad_out.sl + c * ba.grad_out.se]) * to_float(o[i * Ev + c]);
        dvec.get()[x * a.L + i] = d;
        lse2.get()[x * a.L + i] = static_cast<const float*>(a.lse)[x * a.L + i] * kLog2e;
      }
    }
  });

  const int64_t dq_size = BHq * a.L * Ep;
  FBuf dq(nsplit * dq_size);
  parallel_for(0, nsplit * dq_size, 1 << 16, [&](int64_t s, int64_t e) { std::fill(dq.get() + s, dq.get() + e, 0.f); });

  const Dropout drop(a.dropout_p, a.seed);
  const float scale2 = a.scale * kLog2e;
  parallel_for(0, BHkv * nsplit, 1, [&](int64_t s, int64_t e) {
    FBuf krow(BC * Ep), kt(E * BC), vt(Ev * BC), dk(BC * Ep), dv(BC * Evp), qb(BR * Ep), dob(BR * Evp),
        pb(BR * BC), dpb(BR * BC), pdb(drop.on ? BR * BC : 1);
    for (int64_t it = s; it < e; ++it) {
      const int64_t x = it / nsplit, split = it % nsplit;
      const int64_t b = x / a.Hkv, hkv = x % a.Hkv;
      const int64_t kb0 = nkb * split / nsplit, kb1 = nkb * (split + 1) / nsplit;
      const T* k = static_cast<const T*>(a.k.data) + b * a.k.sb + hkv * a.k.sh;
      const T* v = static_cast<const T*>(a.v.data) + b * a.v.sb + hkv * a.v.sh;
      float* dqs = dq.get() + split * dq_size;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int64_t j0 = kb * BC, valid = std::min<int64_t>(BC, a.S - j0);
        pack_rows(k + j0 * a.k.sl, a.k.sl, a.k.se, valid, E, 1.f, krow.get(), Ep, BC);
        pack_transposed(k + j0 * a.k.sl, a.k.sl, a.k.se, valid, E, kt.get(), BC);
        pack_transposed(v + j0 * a.v.sl, a.v.sl, a.v.se, valid, Ev, vt.get(), BC);
        std::fill(dk.get(), dk.get() + BC * Ep, 0.f);
        std::fill(dv.get(), dv.get() + BC * Evp, 0.f);
        for (int64_t hg = 0; hg < group; ++hg) {
          const int64_t h = hkv * group + hg;
          const int64_t xq = b * a.Hq + h;
          const T* q = static_cast<const T*>(a.q.data) + b * a.q.sb + h * a.q.sh;
          const T* go = static_cast<const T*>(ba.grad_out.data) + b * ba.grad_out.sb + h * ba.grad_out.sh;
          const void* mask = nullptr;
          if constexpr (MK != MaskKind::None) {
            const int64_t off = b * a.m_sb + h * a.m_sh;
            mask = MK == MaskKind::Float ? static_cast<const void*>(static_cast<const float*>(a.mask) + off)
                                         : static_cast<const void*>(static_cast<const uint8_t*>(a.mask) + off);
          }
          // with causal masking, query rows before j0 see none of these keys
          const int64_t qb_first = a.causal ? std::min<int64_t>(nqb, j0 / BR) : 0;
          for (int64_t qbi = qb_first; qbi < nqb; ++qbi) {
            const int64_t i0 = qbi * BR, rows = std::min<int64_t>(BR, a.L - i0);
            pack_rows(q + i0 * a.q.sl, a.q.sl, a.q.se, rows, E, scale2, qb.get(), Ep, rows);
            pack_rows(go + i0 * ba.grad_out.sl, ba.grad_out.sl, ba.grad_out.se, rows, Ev, 1.f, dob.get(), Evp, rows);
            const float* l2 = lse2.get() + xq * a.L + i0;
            const float* dd = dvec.get() + xq * a.L + i0;
            float* p = pb.get();
            float* dp = dpb.get();
            // P = exp2(S - lse2)
            gemm<false>(rows, BC, E, qb.get(), Ep, 1, kt.get(), BC, p, BC);
            const bool diag = a.causal && j0 + BC - 1 > i0;
            if (MK != MaskKind::None || diag || valid < BC)
              mask_tile<MK>(p, BC, rows, i0, j0, valid, mask, a.m_sl, a.m_ss, diag);
            for (int64_t r = 0; r < rows; ++r) {
              const vf vl = vset1(l2[r]);
              float* pr = p + r * BC;
              for (int64_t c = 0; c < BC; c += W) vstore(pr + c, vexp2(vload(pr + c) - vl));
            }
            // dP = dO V^T
            gemm<false>(rows, BC, Ev, dob.get(), Evp, 1, vt.get(), BC, dp, BC);
            if (drop.on) {
              // dV takes the dropped probabilities, and dP the same mask; dS below uses plain P
              float* pd = pdb.get();
              std::copy(p, p + rows * BC, pd);
              for (int64_t r = 0; r < rows; ++r) {
                drop.apply(pd + r * BC, valid, uint64_t(xq), i0 + r, j0);
                drop.apply(dp + r * BC, valid, uint64_t(xq), i0 + r, j0);
              }
              gemm<true>(valid, Evp, rows, pd, 1, BC, dob.get(), Evp, dv.get(), Evp);
            } else {
              gemm<true>(valid, Evp, rows, p, 1, BC, dob.get(), Evp, dv.get(), Evp);
            }
            // dS = P * (dP - D)   (into dp)
            for (int64_t r = 0; r < rows; ++r) {
              float* pr = p + r * BC;
              float* dpr = dp + r * BC;
              const vf vd = vset1(dd[r]);
              for (int64_t c = 0; c < BC; c += W) vstore(dpr + c, vload(pr + c) * (vload(dpr + c) - vd));
            }
            // dK += dS^T Qs (Qs carries scale * log2 e), dQ += dS K
            gemm<true>(valid, Ep, rows, dp, 1, BC, qb.get(), Ep, dk.get(), Ep);
            gemm<true>(rows, Ep, BC, dp, BC, 1, krow.get(), Ep, dqs + (xq * a.L + i0) * Ep, Ep);
          }
        }
        // write dK (undo log2 e) and dV for this key block
        T* gk = static_cast<T*>(ba.grad_k) + (x * a.S + j0) * E;
        T* gv = static_cast<T*>(ba.grad_v) + (x * a.S + j0) * Ev;
        const float kfix = 1.f / kLog2e;
        for (int64_t r = 0; r < valid; ++r) {
          for (int64_t c = 0; c < E; ++c) gk[r * E + c] = from_float<T>(dk.get()[r * Ep + c] * kfix);
          for (int64_t c = 0; c < Ev; ++c) gv[r * Ev + c] = from_float<T>(dv.get()[r * Evp + c]);
        }
      }
    }
  });

  // dQ = scale * sum over splits
  T* gq = static_cast<T*>(ba.grad_q);
  parallel_for(0, BHq * a.L, 64, [&](int64_t s, int64_t e) {
    for (int64_t row = s; row < e; ++row) {
      for (int64_t c = 0; c < E; ++c) {
        float acc = 0.f;
        for (int64_t sp = 0; sp < nsplit; ++sp) acc += dq.get()[sp * dq_size + row * Ep + c];
        gq[row * E + c] = from_float<T>(acc * a.scale);
      }
    }
  });
}

}  // namespace

void attention_bwd(const AttnBwdArgs& a) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
    switch (a.fwd.mask_kind) {
      case MaskKind::None:
        attention_bwd_impl<T, MaskKind::None>(a);
        break;
      case MaskKind::Bool:
        attention_bwd_impl<T, MaskKind::Bool>(a);
        break;
      case MaskKind::Float:
        attention_bwd_impl<T, MaskKind::Float>(a);
        break;
    }
  };
  // float64 is refused by the ATen glue until the kernels compute in double
  if (a.fwd.dtype == DType::Float32) run(float{});
  if (a.fwd.dtype == DType::BFloat16) run(bf16_t{});
  if (a.fwd.dtype == DType::Float16) run(f16_t{});
}

}  // namespace fusedformer::cpu::FF_ISA
