// CPU attention forward: tiled, online softmax (FlashAttention style), float32 accumulation.
//
// Keys and values are packed once per key/value head into float32 blocks (K transposed, V padded
// to whole vectors), heads a bounded group at a time; then every (batch, head, block of BR
// queries) is an independent work item that streams over the key blocks with the running max and
// sum of its rows. Extra memory: the packed group plus a few tiles per thread; never L x S.
#include "attention_common.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

struct FwdPlan {
  int64_t E, Ev, Evp, nkb, Spad, group;
  int64_t kt_head, v_head;  // floats per packed head
};

template <typename T>
void pack_kv_head(const AttnFwdArgs& a, const FwdPlan& pl, int64_t bkv, float* kt, float* vp) {
  const int64_t b = bkv / a.Hkv, h = bkv % a.Hkv;
  const T* k = static_cast<const T*>(a.k.data) + b * a.k.sb + h * a.k.sh;
  const T* v = static_cast<const T*>(a.v.data) + b * a.v.sb + h * a.v.sh;
  for (int64_t kb = 0; kb < pl.nkb; ++kb) {
    const int64_t j0 = kb * BC, n = std::min<int64_t>(BC, a.S - j0);
    pack_transposed(k + j0 * a.k.sl, a.k.sl, a.k.se, n, pl.E, kt + kb * pl.E * BC, BC);
    pack_rows(v + j0 * a.v.sl, a.v.sl, a.v.se, n, pl.Ev, 1.f, vp + kb * BC * pl.Evp, pl.Evp, BC);
  }
}

template <typename T, MaskKind MK>
void fwd_item(const AttnFwdArgs& a, const FwdPlan& pl, int64_t b, int64_t h, int64_t qb, const float* kt,
              const float* vp, float* qs, float* sb, float* ob, float* mrow, float* lrow, const Dropout& drop) {
  const int64_t E = pl.E, Evp = pl.Evp;
  const int64_t i0 = qb * BR, rows = std::min<int64_t>(BR, a.L - i0);
  const T* q = static_cast<const T*>(a.q.data) + b * a.q.sb + h * a.q.sh + i0 * a.q.sl;
  pack_rows(q, a.q.sl, a.q.se, rows, E, a.scale * kLog2e, qs, E, rows);
  for (int64_t r = 0; r < rows; ++r) {
    mrow[r] = -kInf;
    lrow[r] = 0.f;
  }
  std::fill(ob, ob + rows * Evp, 0.f);
  const void* mask = nullptr;
  if constexpr (MK != MaskKind::None) {
    const int64_t off = b * a.m_sb + h * a.m_sh;
    mask = MK == MaskKind::Float ? static_cast<const void*>(static_cast<const float*>(a.mask) + off)
                                 : static_cast<const void*>(static_cast<const uint8_t*>(a.mask) + off);
  }
  int64_t nkb = pl.nkb;
  if (a.causal) nkb = std::min<int64_t>(nkb, ceil_div(i0 + rows, BC));  // keys j <= last query row
  const uint64_t bh = uint64_t(b * a.Hq + h);
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t j0 = kb * BC, valid = std::min<int64_t>(BC, a.S - j0);
    gemm<false>(rows, BC, E, qs, E, 1, kt + kb * E * BC, BC, sb, BC);
    const bool diag = a.causal && j0 + BC - 1 > i0;
    if (MK != MaskKind::None || diag || valid < BC)
      mask_tile<MK>(sb, BC, rows, i0, j0, valid, mask, a.m_sl, a.m_ss, diag);
    for (int64_t r = 0; r < rows; ++r) {
      float* s = sb + r * BC;
      vf mx = vset1(-kInf);
      decltype(mx != mx) nan_seen{};  // vmax and std::max drop NaN: track it, so a NaN row stays NaN
      for (int64_t c = 0; c < BC; c += W) {
        const vf sv = vload(s + c);
        mx = vmax(mx, sv);
        nan_seen |= (sv != sv);
      }
      bool has_nan = mrow[r] != mrow[r];
      for (int i = 0; i < W; ++i) has_nan |= nan_seen[i] != 0;
      const float m_new = has_nan ? std::numeric_limits<float>::quiet_NaN() : std::max(mrow[r], hmax(mx));
      if (m_new == -kInf) {  // every key so far masked
        std::fill(s, s + BC, 0.f);
        continue;
      }
      const vf vm = vset1(m_new);
      vf sum = vzero();
      for (int64_t c = 0; c < BC; c += W) {
        vf p = vexp2(vload(s + c) - vm);
        sum += p;
        vstore(s + c, p);
      }
      const float alpha = std::exp2(mrow[r] - m_new);
      lrow[r] = lrow[r] * alpha + hsum(sum);
      mrow[r] = m_new;
      if (alpha != 1.f) {
        float* o = ob + r * Evp;
        const vf va = vset1(alpha);
        for (int64_t c = 0; c < Evp; c += W) vstore(o + c, vload(o + c) * va);
      }
      if (drop.on) drop.apply(s, valid, bh, i0 + r, j0);
    }
    gemm<true>(rows, Evp, BC, sb, BC, 1, vp + kb * BC * Evp, Evp, ob, Evp);
  }
  // normalize, write out and the log-sum-exp
  T* out = static_cast<T*>(a.out) + ((b * a.Hq + h) * a.L + i0) * pl.Ev;
  float* lse = static_cast<float*>(a.lse) + (b * a.Hq + h) * a.L + i0;
  for (int64_t r = 0; r < rows; ++r) {
    const float l = lrow[r];
    // l == 0: every key masked (zeros, lse +inf); l NaN: a NaN logit (NaN row and lse)
    const float inv = l > 0.f ? 1.f / l : (l == 0.f ? 0.f : l);
    lse[r] = l > 0.f ? (mrow[r] + std::log2(l)) * kLn2 : (l == 0.f ? kInf : l);
    const float* o = ob + r * Evp;
    T* dst = out + r * pl.Ev;
    const vf vi_ = vset1(inv);
    int64_t c = 0;
    for (; c + W <= pl.Ev; c += W) vstore(dst + c, vload(o + c) * vi_);
    for (; c < pl.Ev; ++c) dst[c] = from_float<T>(o[c] * inv);
  }
}

template <typename T, MaskKind MK>
void attention_fwd_impl(const AttnFwdArgs& a) {
  FwdPlan pl;
  pl.E = a.E;
  pl.Ev = a.Ev;
  pl.Evp = round_up(a.Ev, W);
  pl.nkb = ceil_div(a.S, BC);
  pl.Spad = pl.nkb * BC;
  pl.group = a.Hq / a.Hkv;
  pl.kt_head = pl.Spad * pl.E;
  pl.v_head = pl.Spad * pl.Evp;
  const int64_t BHkv = a.B * a.Hkv;
  const int64_t nqb = ceil_div(a.L, BR);
  // pack at most ~16 MB of keys/values at a time (at least one head)
  const int64_t head_bytes = (pl.kt_head + pl.v_head) * int64_t(sizeof(float));
  const int64_t G = std::max<int64_t>(1, std::min<int64_t>(BHkv, (int64_t(16) << 20) / head_bytes));
  FBuf kt(G * pl.kt_head), vp(G * pl.v_head);
  const Dropout drop(a.dropout_p, a.seed);
  for (int64_t g0 = 0; g0 < BHkv; g0 += G) {
    const int64_t g1 = std::min(BHkv, g0 + G);
    parallel_for(g0, g1, 1, [&](int64_t s, int64_t e) {
      for (int64_t x = s; x < e; ++x)
        pack_kv_head<T>(a, pl, x, kt.get() + (x - g0) * pl.kt_head, vp.get() + (x - g0) * pl.v_head);
    });
    // work items: (kv head in group, query head of its group, query block)
    const int64_t items = (g1 - g0) * pl.group * nqb;
    parallel_for(0, items, 1, [&](int64_t s, int64_t e) {
      FBuf qs(BR * pl.E), sb(BR * BC), ob(BR * pl.Evp), ml(2 * BR);
      for (int64_t it = s; it < e; ++it) {
        const int64_t qb = it % nqb;
        const int64_t hg = (it / nqb) % pl.group;
        const int64_t x = g0 + it / (nqb * pl.group);
        const int64_t b = x / a.Hkv, hkv = x % a.Hkv;
        fwd_item<T, MK>(a, pl, b, hkv * pl.group + hg, qb, kt.get() + (x - g0) * pl.kt_head,
                        vp.get() + (x - g0) * pl.v_head, qs.get(), sb.get(), ob.get(), ml.get(), ml.get() + BR,
                        drop);
      }
    });
  }
}

}  // namespace

void attention_fwd(const AttnFwdArgs& a) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
    switch (a.mask_kind) {
      case MaskKind::None:
        attention_fwd_impl<T, MaskKind::None>(a);
        break;
      case MaskKind::Bool:
        attention_fwd_impl<T, MaskKind::Bool>(a);
        break;
      case MaskKind::Float:
        attention_fwd_impl<T, MaskKind::Float>(a);
        break;
    }
  };
  // float64 is refused by the ATen glue until the kernels compute in double
  if (a.dtype == DType::Float32) run(float{});
  if (a.dtype == DType::BFloat16) run(bf16_t{});
  if (a.dtype == DType::Float16) run(f16_t{});
}

}  // namespace fusedformer::cpu::FF_ISA
