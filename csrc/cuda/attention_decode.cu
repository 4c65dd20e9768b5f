// Decode attention: a few query rows (one or a few new tokens, times the query heads that share a
// key/value head) against a long key/value cache. The work is memory bound: every key and value
// must be read once, so the keys are split into chunks spread over the whole GPU, each block reads
// its chunk of one key/value head once for all the rows of the group, and a second kernel merges
// the chunks' partial results (max, sum, unnormalized output) per row.
//
// Within a block, a team of G threads holds one key (16-byte vectors, up to 8 features per
// thread): the team's partial dot products are summed with shuffles; teams stride over the chunk,
// each with its own online softmax per row, and the teams are merged through shared memory.
#include "fusedformer/cuda/attention.h"
#include "fusedformer/philox.h"

#include <type_traits>

namespace fusedformer::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRowsMax = kDecodeMaxRows;
constexpr int kUnroll = 4;  // keys per team in flight

// D: the head dim bucket; a key of D elements is G threads x NV vectors x VEC elements
template <typename T, int D>
struct DecodeShape {
  static constexpr int VEC = 16 / int(sizeof(T));
  static constexpr int TPK = D / VEC;  // vectors per key
  static constexpr int G = TPK < 32 ? TPK : 32;
  static constexpr int NV = TPK / G;
  static constexpr int F = NV * VEC;  // features per thread
  static constexpr int TEAMS = kThreads / G;
};

template <typename C>
struct alignas(16) RowState {
  C m, l;
};

// RM: the rows bucket (R <= RM): the queries and accumulators of RM rows live in registers, so a
// smaller group keeps fewer registers and more blocks fit on a multiprocessor
template <typename T, int D, int RM>
__global__ void __launch_bounds__(kThreads) attn_decode_kernel(const AttnFwdParams p, int chunk, float* ws) {
  using C = compute_t<T>;
  using Sh = DecodeShape<T, D>;
  constexpr int G = Sh::G, NV = Sh::NV, VEC = Sh::VEC, F = Sh::F, TEAMS = Sh::TEAMS;
  const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int group = p.Hq / p.Hkv, R = group * p.L;
  const int team = threadIdx.x / G, tl = threadIdx.x % G;
  const int j0 = split * chunk, j1 = min(p.S, j0 + chunk);
  const C scale = C(p.scale);
  const bool dropout = p.dropout_p > 0.f;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const C drop_scale = dropout ? C(1) / C(1 - p.dropout_p) : C(1);

  // the rows' queries: row r = (query head hk * group + r / L, position r % L)
  C q[RM][F];
#pragma unroll
  for (int r = 0; r < RM; ++r) {
    if (r < R) {
      const int h = hk * group + r / p.L, i = r % p.L;
      const T* qr = static_cast<const T*>(p.q.data) + b * p.q.sb + h * p.q.sh + int64_t(i) * p.q.sl;
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        const int f0 = (v * G + tl) * VEC;
        Vec16<T> x;
        if (f0 < p.E) x = load16(qr + f0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) q[r][v * VEC + e] = f0 < p.E ? C(to_f(x.v[e])) * scale : C(0);
      }
    }
  }
  C acc[RM][F], m[RM], l[RM];
#pragma unroll
  for (int r = 0; r < RM; ++r) {
    m[r] = -c_inf<C>();
    l[r] = 0;
#pragma unroll
    for (int f = 0; f < F; ++f) acc[r][f] = 0;
  }
  const T* kb = static_cast<const T*>(p.k.data) + b * p.k.sb + hk * p.k.sh;
  const T* vb = static_cast<const T*>(p.v.data) + b * p.v.sb + hk * p.v.sh;

  // the trip count is the same for every team (they share warps: the shuffles need whole warps)
  for (int jb = j0 + team; jb - team < j1; jb += TEAMS * kUnroll) {
    // load kUnroll keys and values of this team before using any
    Vec16<T> kv[kUnroll][NV], vv[kUnroll][NV];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = jb + u * TEAMS;
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        const int f0 = (v * G + tl) * VEC;
        if (j < j1 && f0 < p.E) kv[u][v] = load16_stream(kb + int64_t(j) * p.k.sl + f0);
        if (j < j1 && f0 < p.Ev) vv[u][v] = load16_stream(vb + int64_t(j) * p.v.sl + f0);
      }
    }
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      if (r >= R) continue;
      const int h = hk * group + r / p.L, i = r % p.L;
      C s[kUnroll];
      C mx = -c_inf<C>();
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = jb + u * TEAMS;
        C d = 0;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
          const int f0 = (v * G + tl) * VEC;
          if (f0 < p.E) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) d += q[r][v * VEC + e] * C(to_f(kv[u][v].v[e]));
          }
        }
#pragma unroll
        for (int o = G / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        if (j >= j1 || (p.causal && j > i)) {
          d = -c_inf<C>();
        } else if (p.mask_kind != MaskKind::None) {
          const int64_t mo = int64_t(b) * p.m_sb + int64_t(h) * p.m_sh + int64_t(i) * p.m_sl + int64_t(j) * p.m_ss;
          if (p.mask_kind == MaskKind::Float) d += static_cast<const C*>(p.mask)[mo];
          else if (!static_cast<const uint8_t*>(p.mask)[mo]) d = -c_inf<C>();
        }
        s[u] = d;
        mx = c_max(mx, d);
      }
      const C m_new = c_max(m[r], mx);
      const C m_use = m_new == -c_inf<C>() ? C(0) : m_new;
      const C alpha = c_exp(m[r] - m_use);
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int f = 0; f < F; ++f) acc[r][f] *= alpha;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = jb + u * TEAMS;
        C pv = c_exp(s[u] - m_use);
        l[r] += pv;
        if (dropout && j < j1) {
          const uint64_t bh = uint64_t(b) * p.Hq + h;
          const bool keep = dropout_bits4(p.seed, bh, uint32_t(i), uint32_t(j) >> 2).v[j & 3] >= threshold;
          pv = keep ? pv * drop_scale : C(0);
        }
#pragma unroll
        for (int v = 0; v < NV; ++v) {
          const int f0 = (v * G + tl) * VEC;
          if (f0 < p.Ev && j < j1) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[r][v * VEC + e] += pv * C(to_f(vv[u][v].v[e]));
          }
        }
      }
    }
  }

  // merge the teams: shared [TEAMS][R] states and [TEAMS][R][D] outputs
  extern __shared__ __align__(16) unsigned char smem_raw[];
  RowState<C>* st = reinterpret_cast<RowState<C>*>(smem_raw);
  C* so = reinterpret_cast<C*>(st + TEAMS * RM);
#pragma unroll
  for (int r = 0; r < RM; ++r) {
    if (r >= R) continue;
    if (tl == 0) st[team * RM + r] = RowState<C>{m[r], l[r]};
#pragma unroll
    for (int v = 0; v < NV; ++v)
#pragma unroll
      for (int e = 0; e < VEC; ++e) so[(team * RM + r) * D + (v * G + tl) * VEC + e] = acc[r][v * VEC + e];
  }
  __syncthreads();
  // thread x merges feature x % D of rows x / D, x / D + kThreads / D, ...
  const int64_t splits = gridDim.x;
  for (int x = threadIdx.x; x < R * D; x += kThreads) {
    const int r = x / D, f = x % D;
    C mm = -c_inf<C>();
    for (int tm = 0; tm < TEAMS; ++tm) mm = c_max(mm, st[tm * RM + r].m);
    const C mu = mm == -c_inf<C>() ? C(0) : mm;
    C ll = 0, o = 0;
    for (int tm = 0; tm < TEAMS; ++tm) {
      const C w = c_exp(st[tm * RM + r].m - mu);
      ll += st[tm * RM + r].l * w;
      o += so[(tm * RM + r) * D + f] * w;
    }
    const int h = hk * group + r / p.L, i = r % p.L;
    const int64_t row = (int64_t(b) * p.Hq + h) * p.L + i;
    if (splits == 1) {
      const bool nan = ll != ll;
      const C inv = (ll > C(0) || nan) ? C(1) / ll : C(0);
      if (f < p.Ev) static_cast<T*>(p.out)[row * p.Ev + f] = from_c<T>(o * inv);
      if (f == 0) static_cast<C*>(p.lse)[row] = ll > C(0) ? mm + log(ll) : (nan ? ll : c_inf<C>());
    } else {
      // workspace row: [splits][B * Hq * L][Ev + 2] floats: max, sum, output
      float* w = ws + (int64_t(split) * p.B * p.Hq * p.L + row) * (p.Ev + 2);
      if (f == 0) {
        w[0] = float(mm);
        w[1] = float(ll);
      }
      if (f < p.Ev) w[2 + f] = float(o);
    }
  }
}

template <typename T>
__global__ void attn_decode_merge_kernel(const AttnFwdParams p, int splits, const float* ws) {
  using C = compute_t<T>;
  const int64_t rows = int64_t(p.B) * p.Hq * p.L;
  const int64_t row = blockIdx.x;
  const int64_t stride = rows * (p.Ev + 2);
  const float* w = ws + row * (p.Ev + 2);
  float mm = -c_inf<float>();
  for (int s = 0; s < splits; ++s) mm = fmaxf(mm, w[s * stride]);
  const float mu = mm == -c_inf<float>() ? 0.f : mm;
  float ll = 0.f;
  for (int s = 0; s < splits; ++s) ll += w[s * stride + 1] * __expf(w[s * stride] - mu);
  const bool nan = ll != ll;
  const float inv = (ll > 0.f || nan) ? 1.f / ll : 0.f;
  for (int f = threadIdx.x; f < p.Ev; f += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < splits; ++s) o += w[s * stride + 2 + f] * __expf(w[s * stride] - mu);
    static_cast<T*>(p.out)[row * p.Ev + f] = from_c<T>(C(o * inv));
  }
  if (threadIdx.x == 0) static_cast<C*>(p.lse)[row] = ll > 0.f ? C(mm + logf(ll)) : C(nan ? ll : c_inf<float>());
}

template <typename T, int D, int RM>
cudaError_t launch_decode_rows(const AttnFwdParams& p, int splits, float* ws, cudaStream_t stream) {
  using C = compute_t<T>;
  using Sh = DecodeShape<T, D>;
  const int chunk = int(ceil_div(p.S, splits));
  const size_t smem = size_t(Sh::TEAMS) * RM * (sizeof(RowState<C>) + D * sizeof(C));
  auto kernel = attn_decode_kernel<T, D, RM>;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(unsigned(splits), unsigned(p.Hkv), unsigned(p.B)), kThreads, smem, stream>>>(p, chunk, ws);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || splits == 1) return e;
  const int64_t rows = int64_t(p.B) * p.Hq * p.L;
  attn_decode_merge_kernel<T><<<unsigned(rows), 128, 0, stream>>>(p, splits, ws);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_decode(const AttnFwdParams& p, int splits, float* ws, cudaStream_t stream) {
  static_assert(kRowsMax == 8, "the row buckets below end at kDecodeMaxRows");
  if constexpr (std::is_same_v<T, double>) {  // tests only: one bucket
    return launch_decode_rows<T, D, kRowsMax>(p, splits, ws, stream);
  } else {
    const int R = (p.Hq / p.Hkv) * p.L;
    if (R <= 1) return launch_decode_rows<T, D, 1>(p, splits, ws, stream);
    if (R <= 2) return launch_decode_rows<T, D, 2>(p, splits, ws, stream);
    if (R <= 4) return launch_decode_rows<T, D, 4>(p, splits, ws, stream);
    return launch_decode_rows<T, D, kRowsMax>(p, splits, ws, stream);
  }
}

}  // namespace

bool decode_supported(const AttnFwdParams& p) {
  const int vec = p.dtype == DType::Float64 ? 2 : p.dtype == DType::Float32 ? 4 : 8;
  const int esize = 16 / vec;
  const int R = (p.Hq / p.Hkv) * p.L;
  if (R > kDecodeMaxRows || p.q.se != 1 || p.k.se != 1 || p.v.se != 1) return false;
  if (p.E % vec != 0 || p.Ev % vec != 0) return false;
  for (const AttnTensor* a : {&p.q, &p.k, &p.v})
    if (!aligned16(a->data) || (a->sl * esize) % 16 != 0 || (a->sh * esize) % 16 != 0 || (a->sb * esize) % 16 != 0)
      return false;
  return true;
}

int decode_splits(const AttnFwdParams& p, int sm_count) {
  // about eight blocks per multiprocessor (the reads of a block are a chain of dependent online-
  // softmax steps: many blocks keep enough loads in flight), each with at least 256 keys; float64
  // in one piece (the partial results are merged in float32)
  if (p.dtype == DType::Float64) return 1;
  const int64_t heads = int64_t(p.B) * p.Hkv;
  const int64_t want = ceil_div(8 * int64_t(sm_count), heads);
  const int64_t most = ceil_div(p.S, 256);
  const int64_t s = want < most ? want : most;
  return int(s < 1 ? 1 : s);
}

cudaError_t attention_fwd_decode(const AttnFwdParams& p, int splits, float* ws, cudaStream_t stream) {
  const int d = tc_head_dim_bucket(p.E, p.Ev);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    return d == 64 ? launch_decode<T, 64>(p, splits, ws, stream)
           : d == 128 ? launch_decode<T, 128>(p, splits, ws, stream)
                      : launch_decode<T, 256>(p, splits, ws, stream);
  };
  switch (p.dtype) {
    case DType::BFloat16:
      return run(bf16{});
    case DType::Float16:
      return run(f16{});
    case DType::Float64:
      return run(double{});
    default:
      return run(float{});
  }
}

}  // namespace fusedformer::cuda
