// Tensor-core attention (bf16 / fp16, sm_80+), FlashAttention-2 style: tiles of Q, K, V in
// shared memory (cp.async, swizzled), S = Q K^T and O += P V with mma.m16n8k16 in float32, an
// online softmax in base 2 whose running max and sum stay in registers, the log-sum-exp saved for
// the backward, which recomputes P from it.
//
// Head dims are padded to a bucket D (64, 128, 256): the columns past E / Ev load as zeros, and
// whole 16-column steps past them are skipped. GENERAL instantiations add the attention mask
// (bool or additive, any broadcast strides) and dropout (Philox, the same keep decision per
// (batch*head, query, key) as the CPU kernels); the causal rule is a run-time flag of both.
//
// Included by attention_{fwd,bwd}_hdim*.cu only, one head-dim bucket per translation unit.
#pragma once

#include "fusedformer/cuda/attention.h"
#include "fusedformer/cuda/mma.cuh"
#include "fusedformer/philox.h"

namespace fusedformer::cuda {

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float f_inf() { return __int_as_float(0x7f800000); }

// Per (batch, head): the mask slice and dropout state of the GENERAL kernels.
struct AttnExtras {
  MaskKind kind;
  const void* mask;  // at (b, h)
  int64_t sl, ss;
  uint64_t seed, bh;
  uint32_t threshold;
  float drop_scale;
  bool dropout;

  __device__ __forceinline__ AttnExtras(const AttnFwdParams& p, int b, int h) {
    kind = p.mask_kind;
    mask = mask_slice<float>(p, b, h);
    sl = p.m_sl;
    ss = p.m_ss;
    seed = p.seed;
    bh = uint64_t(b) * uint64_t(p.Hq) + uint64_t(h);
    dropout = p.dropout_p > 0.f;
    threshold = dropout_threshold(p.dropout_p);
    drop_scale = dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  }
  // base-2 logit x of (query i, key j), both in range, with the mask applied
  __device__ __forceinline__ float apply_mask(float x, int i, int j) const {
    if (kind == MaskKind::Float) {
      x += static_cast<const float*>(mask)[i * sl + j * ss] * kLog2e;
    } else if (kind == MaskKind::Bool) {
      if (!static_cast<const uint8_t*>(mask)[i * sl + j * ss]) x = -f_inf();
    }
    return x;
  }
  // keep decisions of keys j, j+1 (j even) of query i
  __device__ __forceinline__ void keep2(int i, int j, bool& k0, bool& k1) const {
    const Philox4 r = dropout_bits4(seed, bh, uint32_t(i), uint32_t(j) >> 2);
    const int lane = j & 3;  // 0 or 2
    k0 = (lane == 0 ? r.v[0] : r.v[2]) >= threshold;
    k1 = (lane == 0 ? r.v[1] : r.v[3]) >= threshold;
  }
};

// ---------------------------------------------------------------------------------------------
// forward

template <int D>
struct FwdCfg;
template <>
struct FwdCfg<64> {
  static constexpr int kWarps = 4, MT = 2, BN = 64;
};
template <>
struct FwdCfg<128> {
  static constexpr int kWarps = 4, MT = 2, BN = 64;
};
template <>
struct FwdCfg<256> {
  static constexpr int kWarps = 8, MT = 1, BN = 64;
};
template <int D>
struct FwdTraits : FwdCfg<D> {
  using Cfg = FwdCfg<D>;
  static constexpr int kThreads = Cfg::kWarps * 32;
  static constexpr int BM = Cfg::kWarps * Cfg::MT * 16;
  static constexpr int kSmem = (BM + 2 * Cfg::BN) * D * 2;
};

template <typename T, int D, bool GENERAL, bool EVEN>
__global__ void __launch_bounds__(FwdTraits<D>::kThreads) attn_fwd_tc_kernel(const AttnFwdParams p) {
  using Tr = FwdTraits<D>;
  constexpr int MT = Tr::MT, BN = Tr::BN, BM = Tr::BM, NT = Tr::kThreads;
  constexpr int NS = BN / 8, NO = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * D;
  T* sV = sK + BN * D;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.Hq / p.Hkv);
  const int mblock = p.causal ? int(gridDim.x) - 1 - int(blockIdx.x) : int(blockIdx.x);  // longest rows first
  const int m0 = mblock * BM;
  const int wrow = warp * MT * 16;
  const T* qg = static_cast<const T*>(p.q.data) + b * p.q.sb + h * p.q.sh + int64_t(m0) * p.q.sl;
  const T* kg = static_cast<const T*>(p.k.data) + b * p.k.sb + hk * p.k.sh;
  const T* vg = static_cast<const T*>(p.v.data) + b * p.v.sb + hk * p.v.sh;
  const int n_end = p.causal ? min(p.S, m0 + BM) : p.S;
  const int nblocks = int(ceil_div(n_end, BN));
  const int64_t bh = int64_t(b) * p.Hq + h;
  const float scale2 = float(p.scale) * kLog2e;
  [[maybe_unused]] const AttnExtras ex = GENERAL ? AttnExtras(p, b, h) : AttnExtras(p, 0, 0);

  load_tile_async<BM, D, NT>(sQ, qg, p.q.sl, p.L - m0, p.E);
  cp_async_commit();
  load_tile_async<BN, D, NT>(sK, kg, p.k.sl, p.S, p.E);
  cp_async_commit();

  float acc[MT][NO][4];
  float row_m[MT][2], row_l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int d = 0; d < NO; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][d][e] = 0.f;
    row_m[mt][0] = row_m[mt][1] = -f_inf();
    row_l[mt][0] = row_l[mt][1] = 0.f;
  }

  for (int nb = 0; nb < nblocks; ++nb) {
    const int n0 = nb * BN;
    cp_async_wait<0>();
    __syncthreads();  // K block nb (and Q) landed; every warp is done with the previous V block
    load_tile_async<BN, D, NT>(sV, vg + int64_t(n0) * p.v.sl, p.v.sl, p.S - n0, p.Ev);
    cp_async_commit();

    // S = Q K^T
    float s[MT][NS][4];
    zero_acc(s);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if (EVEN || kk * 16 < p.E) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) lds_a<BM, D>(a[mt], sQ, wrow + mt * 16, kk * 16, lane);
        mma_tile<false, BN, D, true>(s, a, sK, 0, kk * 16, 0, lane);
      }
    }

    // base-2 logits, masked; online softmax
    const bool edge = n0 + BN > p.S || (p.causal && n0 + BN - 1 > m0 + wrow);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int i = m0 + wrow + mt * 16 + g + hr * 8;
        float mx = -f_inf();
#pragma unroll
        for (int n = 0; n < NS; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = n0 + n * 8 + 2 * t + e;
            float x = s[mt][n][2 * hr + e] * scale2;
            if constexpr (GENERAL) {
              if (ex.kind != MaskKind::None && i < p.L && j < p.S) x = ex.apply_mask(x, i, j);
            }
            if (edge && (j >= p.S || (p.causal && j > i))) x = -f_inf();
            s[mt][n][2 * hr + e] = x;
            mx = fmaxf(mx, x);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_m[mt][hr], mx);
        const float m_use = m_new == -f_inf() ? 0.f : m_new;  // every key so far masked
        const float alpha = exp2f(row_m[mt][hr] - m_use);
        row_m[mt][hr] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < NS; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = exp2f(s[mt][n][2 * hr + e] - m_use);
            s[mt][n][2 * hr + e] = pv;
            sum += pv;
          }
        }
        row_l[mt][hr] = row_l[mt][hr] * alpha + sum;
#pragma unroll
        for (int d = 0; d < NO; ++d) {
          acc[mt][d][2 * hr] *= alpha;
          acc[mt][d][2 * hr + 1] *= alpha;
        }
        if constexpr (GENERAL) {
          if (ex.dropout) {
#pragma unroll
            for (int n = 0; n < NS; ++n) {
              bool k0, k1;
              ex.keep2(i, n0 + n * 8 + 2 * t, k0, k1);
              s[mt][n][2 * hr] = k0 ? s[mt][n][2 * hr] * ex.drop_scale : 0.f;
              s[mt][n][2 * hr + 1] = k1 ? s[mt][n][2 * hr + 1] * ex.drop_scale : 0.f;
            }
          }
        }
      }
    }
    uint32_t pa[MT][BN / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int kt = 0; kt < BN / 16; ++kt) c_to_a<T>(pa[mt][kt], s[mt][2 * kt], s[mt][2 * kt + 1]);

    __syncthreads();  // every warp is done with this K block
    if (nb + 1 < nblocks) {
      load_tile_async<BN, D, NT>(sK, kg + int64_t(n0 + BN) * p.k.sl, p.k.sl, p.S - n0 - BN, p.E);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // V block nb visible

    // O += P V
#pragma unroll
    for (int kt = 0; kt < BN / 16; ++kt) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        if (EVEN || dp * 16 < p.Ev) {
          uint32_t bb[4];
          lds_b_t<BN, D>(bb, sV, dp * 16, kt * 16, lane);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma16816<T>(acc[mt][2 * dp], pa[mt][kt], bb[0], bb[1]);
            mma16816<T>(acc[mt][2 * dp + 1], pa[mt][kt], bb[2], bb[3]);
          }
        }
      }
    }
  }

  // normalize; the log-sum-exp (+inf for a row whose keys are all masked, NaN stays NaN)
  float* lse = static_cast<float*>(p.lse) + bh * p.L;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = row_l[mt][hr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const bool nan = l != l;
      const float inv = (l > 0.f || nan) ? 1.f / l : 0.f;
#pragma unroll
      for (int d = 0; d < NO; ++d) {
        acc[mt][d][2 * hr] *= inv;
        acc[mt][d][2 * hr + 1] *= inv;
      }
      const int i = m0 + wrow + mt * 16 + g + hr * 8;
      if (t == 0 && i < p.L) lse[i] = l > 0.f ? (row_m[mt][hr] + __log2f(l)) * kLn2 : (nan ? l : f_inf());
    }
  }
  // stage the warp's rows of O in its rows of sQ (no other warp reads them), then coalesced stores
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int d = 0; d < NO; ++d)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
        sts_pair<BM, D>(sQ, wrow + mt * 16 + g + hr * 8, d * 8 + 2 * t, acc[mt][d][2 * hr], acc[mt][d][2 * hr + 1]);
  __syncwarp();
  T* og = static_cast<T*>(p.out) + (bh * p.L + m0) * p.Ev;
  constexpr int kRowChunks = D / 8;
  for (int c = lane; c < MT * 16 * kRowChunks; c += 32) {
    const int r = wrow + c / kRowChunks, col = (c % kRowChunks) * 8;
    if (m0 + r < p.L && col < p.Ev)
      store16(og + int64_t(r) * p.Ev + col, *reinterpret_cast<const Vec16<T>*>(sQ + STile<BM, D>::offset(r, col)));
  }
}

template <typename T, int D, bool GENERAL, bool EVEN>
cudaError_t launch_attn_fwd_tc(const AttnFwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<D>;
  auto kernel = attn_fwd_tc_kernel<T, D, GENERAL, EVEN>;
  if (Tr::kSmem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmem);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(unsigned(ceil_div(p.L, Tr::BM)), unsigned(p.Hq), unsigned(p.B));
  kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(p);
  return cudaGetLastError();
}

// the four variants of one element type: GENERAL (mask or dropout), EVEN (E = Ev = D: no partial
// 16-column steps to skip)
template <typename T, int D, typename P, typename L>
cudaError_t dispatch_variants(const P& p, const AttnFwdParams& f, L launch) {
  const bool general = f.mask_kind != MaskKind::None || f.dropout_p > 0.f;
  const bool even = f.E == D && f.Ev == D;
  if (general) return even ? launch.template operator()<T, D, true, true>(p) : launch.template operator()<T, D, true, false>(p);
  return even ? launch.template operator()<T, D, false, true>(p) : launch.template operator()<T, D, false, false>(p);
}

template <int D>
cudaError_t attention_fwd_tc_bucket(const AttnFwdParams& p, cudaStream_t stream) {
  auto launch = [&]<typename T, int DD, bool G, bool EV>(const AttnFwdParams& q) {
    return launch_attn_fwd_tc<T, DD, G, EV>(q, stream);
  };
  return p.dtype == DType::BFloat16 ? dispatch_variants<bf16, D>(p, p, launch) : dispatch_variants<f16, D>(p, p, launch);
}

// ---------------------------------------------------------------------------------------------
// backward
//
// One block per (key block of BN keys, key/value head, batch); it loops over every query head of
// its group and every query block (BM rows) that sees its keys, and keeps dK and dV of its keys in
// registers. Per query block:
//   A: S = Q K^T and dP = dO V^T (warps tile BM x BN), P = exp2(S - lse2), dS = P (dP - rowsum(dO O));
//      the dropped P and dS go to shared memory;
//   B: dV += P^T dO, dK += dS^T Q (warps tile BN x D);
//   C: dQ += dS K (warps tile BM x D), added to a float32 buffer with atomics; with dq_locks, the
//      key blocks add in their order (deterministic).

template <int D>
struct BwdCfg;
template <>
struct BwdCfg<64> {
  static constexpr int BM = 64, BN = 128;
  static constexpr int WAM = 2, WAN = 4, WBM = 4, WBN = 2, WCM = 2, WCN = 4;
};
template <>
struct BwdCfg<128> {
  static constexpr int BM = 64, BN = 128;
  static constexpr int WAM = 2, WAN = 4, WBM = 4, WBN = 2, WCM = 2, WCN = 4;
};
template <>
struct BwdCfg<256> {
  static constexpr int BM = 64, BN = 64;
  static constexpr int WAM = 2, WAN = 4, WBM = 2, WBN = 4, WCM = 2, WCN = 4;
};
template <int D>
struct BwdTraits : BwdCfg<D> {
  using Cfg = BwdCfg<D>;
  static constexpr int kWarps = 8, kThreads = 256;
  static_assert(Cfg::WAM * Cfg::WAN == kWarps && Cfg::WBM * Cfg::WBN == kWarps && Cfg::WCM * Cfg::WCN == kWarps);
  static constexpr int MTA = Cfg::BM / (16 * Cfg::WAM), NTA = Cfg::BN / (8 * Cfg::WAN);
  static constexpr int MTB = Cfg::BN / (16 * Cfg::WBM), NTB = D / (8 * Cfg::WBN);
  static constexpr int MTC = Cfg::BM / (16 * Cfg::WCM), NTC = D / (8 * Cfg::WCN);
  static_assert(NTA % 2 == 0 && NTB % 2 == 0 && NTC % 2 == 0, "n-tiles come in pairs (ldmatrix x4)");
  static constexpr int kSmem = (2 * Cfg::BN * D + 2 * Cfg::BM * D + 2 * Cfg::BM * Cfg::BN) * 2;
};
static_assert(BwdCfg<64>::BM == kTcBwdBlockM && BwdCfg<128>::BM == kTcBwdBlockM && BwdCfg<256>::BM == kTcBwdBlockM);

template <typename T, int D, bool GENERAL, bool EVEN>
__global__ void __launch_bounds__(256) attn_bwd_tc_kernel(const AttnBwdParams bp) {
  using Tr = BwdTraits<D>;
  constexpr int BM = Tr::BM, BN = Tr::BN, NT = Tr::kThreads;
  constexpr int MTA = Tr::MTA, NTA = Tr::NTA, MTB = Tr::MTB, NTB = Tr::NTB, MTC = Tr::MTC, NTC = Tr::NTC;
  const AttnFwdParams& p = bp.fwd;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BN * D;
  T* sQ = sV + BN * D;
  T* sdO = sQ + BM * D;
  T* sP = sdO + BM * D;
  T* sdS = sP + BM * BN;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nblk = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int n0 = nblk * BN;
  const int group = p.Hq / p.Hkv;
  const float scale2 = float(p.scale) * kLog2e;

  load_tile_async<BN, D, NT>(sK, static_cast<const T*>(p.k.data) + b * p.k.sb + hk * p.k.sh + int64_t(n0) * p.k.sl,
                             p.k.sl, p.S - n0, p.E);
  load_tile_async<BN, D, NT>(sV, static_cast<const T*>(p.v.data) + b * p.v.sb + hk * p.v.sh + int64_t(n0) * p.v.sl,
                             p.v.sl, p.S - n0, p.Ev);
  cp_async_commit();

  float dk[MTB][NTB][4], dv[MTB][NTB][4];
  zero_acc(dk);
  zero_acc(dv);

  const int nmb = int(ceil_div(p.L, BM));
  const int m_first = p.causal ? min(nmb, n0 / BM) : 0;  // query rows before n0 see none of these keys
  const int m_count = nmb - m_first;
  const int total = group * m_count;

  auto issue_q = [&](int it) {
    const int h = hk * group + it / m_count, m0 = (m_first + it % m_count) * BM;
    const T* q = static_cast<const T*>(p.q.data) + b * p.q.sb + h * p.q.sh + int64_t(m0) * p.q.sl;
    const T* go = static_cast<const T*>(bp.grad_out.data) + b * bp.grad_out.sb + h * bp.grad_out.sh +
                  int64_t(m0) * bp.grad_out.sl;
    load_tile_async<BM, D, NT>(sQ, q, p.q.sl, p.L - m0, p.E);
    load_tile_async<BM, D, NT>(sdO, go, bp.grad_out.sl, p.L - m0, p.Ev);
    cp_async_commit();
  };
  if (total > 0) issue_q(0);

  // warp tiles of the three phases
  const int wa_m = (warp / Tr::WAN) * MTA * 16, wa_n = (warp % Tr::WAN) * NTA * 8;
  const int wb_m = (warp / Tr::WBN) * MTB * 16, wb_n = (warp % Tr::WBN) * NTB * 8;
  const int wc_m = (warp / Tr::WCN) * MTC * 16, wc_n = (warp % Tr::WCN) * NTC * 8;

  for (int it = 0; it < total; ++it) {
    const int h = hk * group + it / m_count, mb = m_first + it % m_count, m0 = mb * BM;
    const int64_t bh = int64_t(b) * p.Hq + h;
    [[maybe_unused]] const AttnExtras ex = GENERAL ? AttnExtras(p, b, h) : AttnExtras(p, 0, 0);
    cp_async_wait<0>();
    __syncthreads();  // Q, dO of this block landed; every warp is done with the previous one

    // ---- A: S = Q K^T, dP = dO V^T
    float s[MTA][NTA][4], dp[MTA][NTA][4];
    zero_acc(s);
    zero_acc(dp);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if (EVEN || kk * 16 < p.E) {
        uint32_t a[MTA][4];
#pragma unroll
        for (int mt = 0; mt < MTA; ++mt) lds_a<BM, D>(a[mt], sQ, wa_m + mt * 16, kk * 16, lane);
        mma_tile<false, BN, D, true>(s, a, sK, wa_n, kk * 16, 0, lane);
      }
      if (EVEN || kk * 16 < p.Ev) {
        uint32_t a[MTA][4];
#pragma unroll
        for (int mt = 0; mt < MTA; ++mt) lds_a<BM, D>(a[mt], sdO, wa_m + mt * 16, kk * 16, lane);
        mma_tile<false, BN, D, true>(dp, a, sV, wa_n, kk * 16, 0, lane);
      }
    }
    // P, dS -> shared memory
    const float* lse2 = static_cast<const float*>(bp.lse2) + bh * p.L;
    const float* dvec = static_cast<const float*>(bp.dvec) + bh * p.L;
    const bool edge = n0 + BN > p.S || (p.causal && n0 + BN - 1 > m0);
#pragma unroll
    for (int mt = 0; mt < MTA; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int r = wa_m + mt * 16 + g + hr * 8, i = m0 + r;
        const float l2 = i < p.L ? lse2[i] : f_inf();  // rows past L: P = 0
        const float di = i < p.L ? dvec[i] : 0.f;
#pragma unroll
        for (int n = 0; n < NTA; ++n) {
          const int c = wa_n + n * 8 + 2 * t, j = n0 + c;
          float pv[2], dpv[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = s[mt][n][2 * hr + e] * scale2;
            if constexpr (GENERAL) {
              if (ex.kind != MaskKind::None && i < p.L && j + e < p.S) x = ex.apply_mask(x, i, j + e);
            }
            if (edge && (j + e >= p.S || (p.causal && j + e > i))) x = -f_inf();
            pv[e] = exp2f(x - l2);
            dpv[e] = dp[mt][n][2 * hr + e];
          }
          float z0 = pv[0], z1 = pv[1];
          if constexpr (GENERAL) {
            if (ex.dropout) {
              bool k0, k1;
              ex.keep2(i, j, k0, k1);
              z0 = k0 ? z0 * ex.drop_scale : 0.f;
              z1 = k1 ? z1 * ex.drop_scale : 0.f;
              dpv[0] = k0 ? dpv[0] * ex.drop_scale : 0.f;
              dpv[1] = k1 ? dpv[1] * ex.drop_scale : 0.f;
            }
          }
          sts_pair<BM, BN>(sP, r, c, z0, z1);
          sts_pair<BM, BN>(sdS, r, c, pv[0] * (dpv[0] - di), pv[1] * (dpv[1] - di));
        }
      }
    }
    __syncthreads();

    // ---- B: dV += P^T dO, dK += dS^T Q
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t a[MTB][4];
#pragma unroll
      for (int mt = 0; mt < MTB; ++mt) lds_a_t<BM, BN>(a[mt], sP, wb_m + mt * 16, kk * 16, lane);
      mma_tile<true, BM, D, EVEN>(dv, a, sdO, wb_n, kk * 16, p.Ev, lane);
#pragma unroll
      for (int mt = 0; mt < MTB; ++mt) lds_a_t<BM, BN>(a[mt], sdS, wb_m + mt * 16, kk * 16, lane);
      mma_tile<true, BM, D, EVEN>(dk, a, sQ, wb_n, kk * 16, p.E, lane);
    }
    __syncthreads();  // done with Q and dO: the next block's load overlaps phase C
    if (it + 1 < total) issue_q(it + 1);

    // ---- C: dQ += dS K
    float dq[MTC][NTC][4];
    zero_acc(dq);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[MTC][4];
#pragma unroll
      for (int mt = 0; mt < MTC; ++mt) lds_a<BM, BN>(a[mt], sdS, wc_m + mt * 16, kk * 16, lane);
      mma_tile<true, BN, D, EVEN>(dq, a, sK, wc_n, kk * 16, p.E, lane);
    }
    int* lock = bp.dq_locks ? bp.dq_locks + bh * nmb + mb : nullptr;
    if (lock) {
      if (tid == 0) {
        while (atomicAdd(lock, 0) != nblk) __nanosleep(64);
      }
      __syncthreads();
    }
    float* dqa = static_cast<float*>(bp.dq_accum) + bh * int64_t(p.L) * p.E;
#pragma unroll
    for (int mt = 0; mt < MTC; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int i = m0 + wc_m + mt * 16 + g + hr * 8;
        if (i >= p.L) continue;
#pragma unroll
        for (int n = 0; n < NTC; ++n) {
          const int c = wc_n + n * 8 + 2 * t;
          if (c < p.E) {  // E is a multiple of 8: c + 1 < E too
            atomicAdd(dqa + int64_t(i) * p.E + c, dq[mt][n][2 * hr]);
            atomicAdd(dqa + int64_t(i) * p.E + c + 1, dq[mt][n][2 * hr + 1]);
          }
        }
      }
    }
    if (lock) {
      __threadfence();
      __syncthreads();
      if (tid == 0) atomicExch(lock, nblk + 1);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with K and V: stage dK, dV there

  const float sc = float(p.scale);
#pragma unroll
  for (int mt = 0; mt < MTB; ++mt)
#pragma unroll
    for (int n = 0; n < NTB; ++n)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int r = wb_m + mt * 16 + g + hr * 8, c = wb_n + n * 8 + 2 * t;
        sts_pair<BN, D>(sK, r, c, dk[mt][n][2 * hr] * sc, dk[mt][n][2 * hr + 1] * sc);
        sts_pair<BN, D>(sV, r, c, dv[mt][n][2 * hr], dv[mt][n][2 * hr + 1]);
      }
  __syncthreads();
  const int64_t bkv = int64_t(b) * p.Hkv + hk;
  T* gk = static_cast<T*>(bp.grad_k) + (bkv * p.S + n0) * p.E;
  T* gv = static_cast<T*>(bp.grad_v) + (bkv * p.S + n0) * p.Ev;
  constexpr int kRowChunks = D / 8;
  for (int c = tid; c < BN * kRowChunks; c += NT) {
    const int r = c / kRowChunks, col = (c % kRowChunks) * 8;
    if (n0 + r >= p.S) continue;
    if (col < p.E) store16(gk + int64_t(r) * p.E + col, *reinterpret_cast<const Vec16<T>*>(sK + STile<BN, D>::offset(r, col)));
    if (col < p.Ev)
      store16(gv + int64_t(r) * p.Ev + col, *reinterpret_cast<const Vec16<T>*>(sV + STile<BN, D>::offset(r, col)));
  }
}

template <typename T, int D, bool GENERAL, bool EVEN>
cudaError_t launch_attn_bwd_tc(const AttnBwdParams& p, cudaStream_t stream) {
  using Tr = BwdTraits<D>;
  auto kernel = attn_bwd_tc_kernel<T, D, GENERAL, EVEN>;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmem);
  if (e != cudaSuccess) return e;
  const dim3 grid(unsigned(ceil_div(p.fwd.S, Tr::BN)), unsigned(p.fwd.Hkv), unsigned(p.fwd.B));
  kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <int D>
cudaError_t attention_bwd_tc_bucket(const AttnBwdParams& p, cudaStream_t stream) {
  auto launch = [&]<typename T, int DD, bool G, bool EV>(const AttnBwdParams& q) {
    return launch_attn_bwd_tc<T, DD, G, EV>(q, stream);
  };
  return p.fwd.dtype == DType::BFloat16 ? dispatch_variants<bf16, D>(p, p.fwd, launch)
                                        : dispatch_variants<f16, D>(p, p.fwd, launch);
}

}  // namespace fusedformer::cuda
