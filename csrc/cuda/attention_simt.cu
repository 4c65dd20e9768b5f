// SIMT attention kernels for any dtype and layout: the float32 and float64 path (computed in the
// compute type, so float32 matches float64 closely and float64 passes gradcheck) and the fallback
// for shapes the tensor-core kernels do not take. Also the small kernels around the backward.
//
// Forward: a block takes 16 query rows (4 per warp) and streams over the keys in tiles of 32 held
// in shared memory: lane j scores key j of the tile for the warp's rows, an online softmax (natural
// log) keeps each row's max and sum, and lane e accumulates output features e, e + 32, ...
// Backward (deterministic, no atomics): one kernel for dK, dV per block of 16 keys (lanes take
// query rows, then features) over every query of the group's heads, one for dQ per block of 16
// query rows (the forward's loop with dS in place of P).
#include "fusedformer/cuda/attention.h"
#include "fusedformer/philox.h"

namespace fusedformer::cuda {
namespace {

constexpr int kRowsPerWarp = 4, kWarps = 4, kThreads = kWarps * 32;
constexpr int kRows = kRowsPerWarp * kWarps;  // query rows per block (forward, dQ)
constexpr int kKeyTile = 32;                  // keys per tile (forward, dQ)
constexpr int kKeys = 16;                     // keys per block (dK, dV): 4 per warp
constexpr int kQTile = 32;                    // query rows per tile (dK, dV): one per lane
constexpr int kMaxFeat = 256 / 32;            // features per lane

// odd row stride of the shared tiles: lanes reading one column of different rows hit different banks
__host__ __device__ inline int padded(int e) { return e | 1; }

template <typename T>
__device__ __forceinline__ const T* at_bhl(const AttnTensor& a, int b, int h, int64_t l) {
  return static_cast<const T*>(a.data) + b * a.sb + h * a.sh + l * a.sl;
}

// rows [0, rows) x [0, cols) of a (B, H, L, E)-strided tensor into a shared [rows_pad][ld] tile in C
template <typename T, typename C>
__device__ void load_rows(C* dst, int ld, const T* src, int64_t sl, int64_t se, int rows, int rows_pad, int cols) {
  for (int x = threadIdx.x; x < rows_pad * cols; x += blockDim.x) {
    const int r = x / cols, c = x % cols;
    dst[r * ld + c] = r < rows ? C(to_f(src[r * sl + c * se])) : C(0);
  }
}

template <typename C>
struct SimtMask {
  MaskKind kind;
  const void* mask;  // at (b, h)
  int64_t sl, ss;
  bool causal;
  int S;
  __device__ SimtMask(const AttnFwdParams& p, int b, int h) {
    kind = p.mask_kind;
    mask = mask_slice<C>(p, b, h);
    sl = p.m_sl;
    ss = p.m_ss;
    causal = p.causal;
    S = p.S;
  }
  // natural-log logit of (query i, key j), -inf where masked
  __device__ C logit(C s, int i, int j) const {
    if (j >= S || (causal && j > i)) return -c_inf<C>();
    if (kind == MaskKind::Float) s += static_cast<const C*>(mask)[i * sl + j * ss];
    if (kind == MaskKind::Bool && !static_cast<const uint8_t*>(mask)[i * sl + j * ss]) s = -c_inf<C>();
    return s;
  }
};

struct SimtDropout {
  bool on;
  uint32_t threshold;
  float scale;
  uint64_t seed;
  __device__ SimtDropout(const AttnFwdParams& p)
      : on(p.dropout_p > 0.f), threshold(dropout_threshold(p.dropout_p)),
        scale(p.dropout_p > 0.f ? 1.f / (1.f - p.dropout_p) : 1.f), seed(p.seed) {}
  __device__ bool keep(uint64_t bh, int i, int j) const {
    return dropout_bits4(seed, bh, uint32_t(i), uint32_t(j) >> 2).v[j & 3] >= threshold;
  }
};

// Forward (DQ = false) or the dQ pass of the backward (DQ = true), which recomputes P from the
// saved lse and accumulates dS K instead of P V.
template <typename T, bool DQ>
__global__ void __launch_bounds__(kThreads) attn_rows_simt_kernel(const AttnBwdParams bp) {
  using C = compute_t<T>;
  const AttnFwdParams& p = bp.fwd;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int E = p.E, Ev = p.Ev, ldk = padded(E), ldv = padded(Ev);
  C* sK = reinterpret_cast<C*>(smem_raw);  // [kKeyTile][ldk]
  C* sV = sK + kKeyTile * ldk;             // [kKeyTile][ldv]
  C* sQ = sV + kKeyTile * ldv;             // [kRows][E]
  C* sdO = sQ + kRows * E;                 // [kRows][Ev] (dQ pass)

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int h = blockIdx.y, b = blockIdx.z, hk = h / (p.Hq / p.Hkv);
  const int m0 = blockIdx.x * kRows;
  const uint64_t bh = uint64_t(b) * p.Hq + h;
  const SimtMask<C> mk(p, b, h);
  const SimtDropout drop(p);
  const C scale = C(p.scale);

  load_rows<T>(sQ, E, at_bhl<T>(p.q, b, h, m0), p.q.sl, p.q.se, min(kRows, p.L - m0), kRows, E);
  if constexpr (DQ) load_rows<T>(sdO, Ev, at_bhl<T>(bp.grad_out, b, h, m0), bp.grad_out.sl, bp.grad_out.se,
                                 min(kRows, p.L - m0), kRows, Ev);

  C acc[kRowsPerWarp][kMaxFeat];
  C row_m[kRowsPerWarp], row_l[kRowsPerWarp], lse[kRowsPerWarp], dval[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int u = 0; u < kMaxFeat; ++u) acc[r][u] = 0;
    row_m[r] = -c_inf<C>();
    row_l[r] = 0;
    const int i = m0 + warp * kRowsPerWarp + r;
    if constexpr (DQ) {
      lse[r] = i < p.L ? static_cast<const C*>(p.lse)[bh * p.L + i] : c_inf<C>();
      dval[r] = i < p.L ? static_cast<const C*>(bp.dvec)[bh * p.L + i] : C(0);
    }
  }
  const int n_end = p.causal ? min(p.S, m0 + kRows) : p.S;
  for (int n0 = 0; n0 < n_end; n0 += kKeyTile) {
    const int nk = min(kKeyTile, p.S - n0);
    __syncthreads();  // previous tile consumed
    load_rows<T>(sK, ldk, at_bhl<T>(p.k, b, hk, n0), p.k.sl, p.k.se, nk, kKeyTile, E);
    load_rows<T>(sV, ldv, at_bhl<T>(p.v, b, hk, n0), p.v.sl, p.v.se, nk, kKeyTile, Ev);
    __syncthreads();
    const int j = n0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int lr = warp * kRowsPerWarp + r, i = m0 + lr;
      // lane j: the score of key j, then p (and dS in the dQ pass)
      C s = 0;
      for (int e = 0; e < E; ++e) s += sQ[lr * E + e] * sK[lane * ldk + e];
      const C x = i < p.L ? mk.logit(s * scale, i, j) : -c_inf<C>();
      C pj;
      if constexpr (DQ) {
        pj = c_exp(x - lse[r]);  // 0 where masked or for a fully masked row (lse = +inf)
        C dp = 0;
        for (int e = 0; e < Ev; ++e) dp += sdO[lr * Ev + e] * sV[lane * ldv + e];
        if (drop.on && j < p.S) dp = drop.keep(bh, i, j) ? dp * C(drop.scale) : C(0);
        pj = pj * (dp - dval[r]);  // dS
      } else {
        const C mx = warp_max(x);
        const C m_new = c_max(row_m[r], mx);
        const C m_use = m_new == -c_inf<C>() ? C(0) : m_new;
        const C alpha = c_exp(row_m[r] - m_use);
        pj = c_exp(x - m_use);
        row_l[r] = row_l[r] * alpha + warp_sum(pj);
        row_m[r] = m_new;
#pragma unroll
        for (int u = 0; u < kMaxFeat; ++u) acc[r][u] *= alpha;
        if (drop.on && j < p.S && !drop.keep(bh, i, j)) pj = 0;
        pj *= C(drop.scale);
      }
      // lane e: acc[e] += sum_j pj * V[j][e] (forward) or dS_j * K[j][e] (dQ)
      const C* src = DQ ? sK : sV;
      const int ld = DQ ? ldk : ldv, F = DQ ? E : Ev;
      for (int jj = 0; jj < nk; ++jj) {
        const C w = __shfl_sync(0xffffffffu, pj, jj);
#pragma unroll
        for (int u = 0; u < kMaxFeat; ++u) {
          const int e = lane + 32 * u;
          if (e < F) acc[r][u] += w * src[jj * ld + e];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = m0 + warp * kRowsPerWarp + r;
    if (i >= p.L) continue;
    if constexpr (DQ) {
      T* dq = static_cast<T*>(bp.grad_q) + (bh * p.L + i) * E;
#pragma unroll
      for (int u = 0; u < kMaxFeat; ++u)
        if (lane + 32 * u < E) dq[lane + 32 * u] = from_c<T>(acc[r][u] * scale);
    } else {
      const C l = row_l[r];
      const bool nan = l != l;
      const C inv = (l > C(0) || nan) ? C(1) / l : C(0);
      T* out = static_cast<T*>(p.out) + (bh * p.L + i) * Ev;
#pragma unroll
      for (int u = 0; u < kMaxFeat; ++u)
        if (lane + 32 * u < Ev) out[lane + 32 * u] = from_c<T>(acc[r][u] * inv);
      if (lane == 0) static_cast<C*>(p.lse)[bh * p.L + i] = l > C(0) ? row_m[r] + log(l) : (nan ? l : c_inf<C>());
    }
  }
}

// dK, dV of kKeys keys (4 per warp) over every query row of every query head of the group.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_dkdv_simt_kernel(const AttnBwdParams bp) {
  using C = compute_t<T>;
  const AttnFwdParams& p = bp.fwd;
  constexpr int KPW = kKeys / kWarps;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int E = p.E, Ev = p.Ev, ldq = padded(E), ldo = padded(Ev);
  C* sK = reinterpret_cast<C*>(smem_raw);  // [kKeys][E]
  C* sV = sK + kKeys * E;                  // [kKeys][Ev]
  C* sQ = sV + kKeys * Ev;                 // [kQTile][ldq]
  C* sdO = sQ + kQTile * ldq;              // [kQTile][ldo]
  C* sZ = sdO + kQTile * ldo;              // [kKeys][kQTile]: dropped P
  C* sdS = sZ + kKeys * kQTile;            // [kKeys][kQTile]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int hk = blockIdx.y, b = blockIdx.z, n0 = blockIdx.x * kKeys;
  const int group = p.Hq / p.Hkv;
  const SimtDropout drop(p);
  const C scale = C(p.scale);
  load_rows<T>(sK, E, at_bhl<T>(p.k, b, hk, n0), p.k.sl, p.k.se, min(kKeys, p.S - n0), kKeys, E);
  load_rows<T>(sV, Ev, at_bhl<T>(p.v, b, hk, n0), p.v.sl, p.v.se, min(kKeys, p.S - n0), kKeys, Ev);

  C dk[KPW][kMaxFeat], dv[KPW][kMaxFeat];
#pragma unroll
  for (int k = 0; k < KPW; ++k)
#pragma unroll
    for (int u = 0; u < kMaxFeat; ++u) dk[k][u] = dv[k][u] = 0;

  const int m_first = p.causal ? (n0 / kQTile) * kQTile : 0;
  for (int hg = 0; hg < group; ++hg) {
    const int h = hk * group + hg;
    const uint64_t bh = uint64_t(b) * p.Hq + h;
    const SimtMask<C> mk(p, b, h);
    for (int m0 = m_first; m0 < p.L; m0 += kQTile) {
      __syncthreads();
      load_rows<T>(sQ, ldq, at_bhl<T>(p.q, b, h, m0), p.q.sl, p.q.se, min(kQTile, p.L - m0), kQTile, E);
      load_rows<T>(sdO, ldo, at_bhl<T>(bp.grad_out, b, h, m0), bp.grad_out.sl, bp.grad_out.se,
                   min(kQTile, p.L - m0), kQTile, Ev);
      __syncthreads();
      // lane = query row i: P, dS of the warp's keys
      const int i = m0 + lane;
      const bool row_ok = i < p.L;
      const C l = row_ok ? static_cast<const C*>(p.lse)[bh * p.L + i] : c_inf<C>();
      const C di = row_ok ? static_cast<const C*>(bp.dvec)[bh * p.L + i] : C(0);
#pragma unroll
      for (int k = 0; k < KPW; ++k) {
        const int kl = warp * KPW + k, j = n0 + kl;
        C s = 0, dp = 0;
        for (int e = 0; e < E; ++e) s += sQ[lane * ldq + e] * sK[kl * E + e];
        for (int e = 0; e < Ev; ++e) dp += sdO[lane * ldo + e] * sV[kl * Ev + e];
        const C x = row_ok ? mk.logit(s * scale, i, j) : -c_inf<C>();
        const C pv = c_exp(x - l);
        C z = pv;
        if (drop.on && row_ok && j < p.S) {
          const bool keep = drop.keep(bh, i, j);
          z = keep ? pv * C(drop.scale) : C(0);
          dp = keep ? dp * C(drop.scale) : C(0);
        }
        sZ[kl * kQTile + lane] = z;
        sdS[kl * kQTile + lane] = pv * (dp - di);
      }
      __syncwarp();
      // lane = feature: dV += Z^T dO, dK += dS^T Q over the tile's rows
      const int rows = min(kQTile, p.L - m0);
      for (int r = 0; r < rows; ++r) {
#pragma unroll
        for (int k = 0; k < KPW; ++k) {
          const int kl = warp * KPW + k;
          const C z = sZ[kl * kQTile + r], ds = sdS[kl * kQTile + r];
#pragma unroll
          for (int u = 0; u < kMaxFeat; ++u) {
            const int e = lane + 32 * u;
            if (e < Ev) dv[k][u] += z * sdO[r * ldo + e];
            if (e < E) dk[k][u] += ds * sQ[r * ldq + e];
          }
        }
      }
    }
  }
  const int64_t bkv = int64_t(b) * p.Hkv + hk;
#pragma unroll
  for (int k = 0; k < KPW; ++k) {
    const int j = n0 + warp * KPW + k;
    if (j >= p.S) continue;
    T* gk = static_cast<T*>(bp.grad_k) + (bkv * p.S + j) * E;
    T* gv = static_cast<T*>(bp.grad_v) + (bkv * p.S + j) * Ev;
#pragma unroll
    for (int u = 0; u < kMaxFeat; ++u) {
      const int e = lane + 32 * u;
      if (e < E) gk[e] = from_c<T>(dk[k][u] * scale);
      if (e < Ev) gv[e] = from_c<T>(dv[k][u]);
    }
  }
}

template <typename T>
__global__ void attn_bwd_prepare_kernel(const AttnBwdParams bp) {
  using C = compute_t<T>;
  const AttnFwdParams& p = bp.fwd;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int64_t rows = int64_t(p.B) * p.Hq * p.L;
  if (row >= rows) return;
  const int i = int(row % p.L);
  const int h = int((row / p.L) % p.Hq), b = int(row / (int64_t(p.L) * p.Hq));
  const T* go = at_bhl<T>(bp.grad_out, b, h, i);
  const T* o = static_cast<const T*>(p.out) + row * p.Ev;
  C d = 0;
  for (int e = lane; e < p.Ev; e += 32) d += C(to_f(go[e * bp.grad_out.se])) * C(to_f(o[e]));
  d = warp_sum(d);
  if (lane == 0) {
    static_cast<C*>(const_cast<void*>(bp.dvec))[row] = d;
    if (bp.lse2) static_cast<float*>(const_cast<void*>(bp.lse2))[row] = float(static_cast<const C*>(p.lse)[row]) * 1.4426950408889634f;
  }
}

template <typename K>
cudaError_t launch_with_smem(K kernel, dim3 grid, size_t smem, cudaStream_t stream, const AttnBwdParams& bp) {
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, kThreads, smem, stream>>>(bp);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_fwd_simt(const AttnFwdParams& p, cudaStream_t stream) {
  AttnBwdParams bp{};
  bp.fwd = p;
  cudaError_t err = cudaSuccess;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    const size_t smem = (size_t(kKeyTile) * (padded(p.E) + padded(p.Ev)) + size_t(kRows) * p.E) * sizeof(C);
    const dim3 grid(unsigned(ceil_div(p.L, kRows)), unsigned(p.Hq), unsigned(p.B));
    err = launch_with_smem(attn_rows_simt_kernel<T, false>, grid, smem, stream, bp);
  });
  return err;
}

cudaError_t attention_bwd_simt(const AttnBwdParams& bp, cudaStream_t stream) {
  const AttnFwdParams& p = bp.fwd;
  cudaError_t err = cudaSuccess;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    const size_t smem_dq =
        (size_t(kKeyTile) * (padded(p.E) + padded(p.Ev)) + size_t(kRows) * (p.E + p.Ev)) * sizeof(C);
    err = launch_with_smem(attn_rows_simt_kernel<T, true>,
                           dim3(unsigned(ceil_div(p.L, kRows)), unsigned(p.Hq), unsigned(p.B)), smem_dq, stream, bp);
    if (err != cudaSuccess) return;
    const size_t smem_kv = (size_t(kKeys) * (p.E + p.Ev) + size_t(kQTile) * (padded(p.E) + padded(p.Ev)) +
                            2 * size_t(kKeys) * kQTile) * sizeof(C);
    err = launch_with_smem(attn_dkdv_simt_kernel<T>, dim3(unsigned(ceil_div(p.S, kKeys)), unsigned(p.Hkv), unsigned(p.B)),
                           smem_kv, stream, bp);
  });
  return err;
}

cudaError_t attention_bwd_prepare(const AttnBwdParams& bp, cudaStream_t stream) {
  const AttnFwdParams& p = bp.fwd;
  const int64_t rows = int64_t(p.B) * p.Hq * p.L;
  constexpr int kPrepThreads = 256;
  const unsigned grid = unsigned(ceil_div(rows, kPrepThreads / 32));
  cudaError_t err = cudaSuccess;
  dispatch_dtype(p.dtype, [&](auto tag) {
    attn_bwd_prepare_kernel<decltype(tag)><<<grid, kPrepThreads, 0, stream>>>(bp);
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace fusedformer::cuda
