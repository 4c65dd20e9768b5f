// paged_attention / paged_cache_write for the CUDA dispatch key.
//
// Attention: one block per (query token, key/value head, split of the keys, chunk of the group's
// query heads). A token finds its sequence by a binary search of query_start, so the grid needs no
// host-side knowledge of the lengths (reading them would synchronize the stream). Each of the
// block's warps takes one key at a time, its lanes holding strided features of the key, value and
// the group's queries, and keeps an online softmax per query head; the warps are merged through
// shared memory. Decode (one token per sequence) is thus one block per (sequence, key/value head)
// and split; the queries of a prefill chunk each get their own blocks, whose reads of the shared
// blocks are served by the L2 cache. When the grid would not fill the device, the keys are split
// (flash-decoding) and a second kernel merges the splits by their log-sum-exp.
//
// Block ids outside the cache and slots beyond it are skipped rather than read or written: the
// values of the index tensors are not checked on this device (see common/paged_attention.h).
#include <torch/library.h>

#include <algorithm>

#include "common/paged_attention.h"
#include "fusedformer/cuda/device.h"

namespace fusedformer::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 8;      // query heads per block
constexpr int kMaxSplits = 64;

__device__ __forceinline__ int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }

// the sequence of query token t: the last b with query_start[b] <= t
__device__ __forceinline__ int64_t sequence_of(const int64_t* qs, int64_t B, int64_t t) {
  int64_t lo = 0, hi = B - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (qs[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// NF features per lane: feature f of a row is held by lane f % 32 in slot f / 32 (E <= 32 NF).
template <typename T, int NF>
__global__ void __launch_bounds__(kThreads) paged_attn_kernel(const PagedAttnArgs a, int splits, float* ws) {
  using C = compute_t<T>;
  const int64_t t = blockIdx.x, hk = blockIdx.y;
  const int split = int(blockIdx.z) % splits, hchunk = int(blockIdx.z) / splits;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = sequence_of(a.query_start, a.B, t);
  const int64_t q0 = a.query_start[b], L = a.query_start[b + 1] - q0;
  const int64_t S = imin(a.seq_lens[b], a.bt_stride * a.block_size);
  const int64_t last = imin(S, S - L + (t - q0) + 1);  // causal: the keys up to its own position
  const int64_t keys = last > 0 ? last : 0;
  const int64_t chunk = ceil_div(keys, splits);
  const int64_t j0 = split * chunk, j1 = imin(keys, j0 + chunk);
  const int group = int(a.Hq / a.Hkv);
  const int hbase = int(hk) * group + hchunk * kRows;
  const int R = min(kRows, group - hchunk * kRows);
  const int E = int(a.E);

  C q[kRows][NF], acc[kRows][NF], m[kRows], l[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -c_inf<C>();
    l[r] = C(0);
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      const int f = k * 32 + lane;
      acc[r][k] = C(0);
      q[r][k] = r < R && f < E ? C(to_f(static_cast<const T*>(a.q)[t * a.q_st + (hbase + r) * a.q_sh + f * a.q_se])) *
                                     C(a.scale)
                               : C(0);
    }
  }
  const int64_t* table = a.block_tables + b * a.bt_stride;
  const T* kc = static_cast<const T*>(a.k_cache) + hk * a.kc_sh;
  const T* vc = static_cast<const T*>(a.v_cache) + hk * a.vc_sh;
  for (int64_t j = j0 + warp; j < j1; j += kWarps) {
    const int64_t blk = table[j / a.block_size], off = j % a.block_size;
    if (blk < 0 || blk >= a.num_blocks) continue;  // the same for the whole warp
    const T* kr = kc + blk * a.kc_sb + off * a.kc_sl;
    const T* vr = vc + blk * a.vc_sb + off * a.vc_sl;
    C kf[NF], vf[NF];
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      const int f = k * 32 + lane;
      kf[k] = f < E ? C(to_f(kr[f * a.kc_se])) : C(0);
      vf[k] = f < E ? C(to_f(vr[f * a.vc_se])) : C(0);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= R) continue;
      C d = C(0);
#pragma unroll
      for (int k = 0; k < NF; ++k) d += q[r][k] * kf[k];
      d = warp_sum(d);
      const C m_new = c_max(m[r], d);
      const C alpha = c_exp(m[r] - m_new), p = c_exp(d - m_new);
      l[r] = l[r] * alpha + p;
      m[r] = m_new;
#pragma unroll
      for (int k = 0; k < NF; ++k) acc[r][k] = acc[r][k] * alpha + p * vf[k];
    }
  }

  // merge the warps, one row at a time: [kWarps] (m, l) and [kWarps][32 NF] outputs
  __shared__ C sm[kWarps], sl[kWarps];
  __shared__ C so[kWarps][32 * NF];
  for (int r = 0; r < R; ++r) {
    if (lane == 0) {
      sm[warp] = m[r];
      sl[warp] = l[r];
    }
#pragma unroll
    for (int k = 0; k < NF; ++k) so[warp][k * 32 + lane] = acc[r][k];
    __syncthreads();
    C mm = -c_inf<C>();
    for (int w = 0; w < kWarps; ++w) mm = c_max(mm, sm[w]);
    const C mu = mm == -c_inf<C>() ? C(0) : mm;
    C ll = C(0);
    for (int w = 0; w < kWarps; ++w) ll += sl[w] * c_exp(sm[w] - mu);
    const int64_t row = t * a.Hq + hbase + r;
    for (int f = threadIdx.x; f < E; f += kThreads) {
      C o = C(0);
      for (int w = 0; w < kWarps; ++w) o += so[w][f] * c_exp(sm[w] - mu);
      if (splits == 1) {
        const C inv = ll != C(0) ? C(1) / ll : C(0);
        static_cast<T*>(a.out)[row * E + f] = from_c<T>(o * inv);
      } else {
        // workspace [splits][T * Hq][E + 2]: max, sum, unnormalized output
        float* w = ws + (int64_t(split) * a.T * a.Hq + row) * (E + 2);
        if (f == 0) {
          w[0] = float(mm);
          w[1] = float(ll);
        }
        w[2 + f] = float(o);
      }
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void paged_merge_kernel(const PagedAttnArgs a, int splits, const float* ws) {
  const int64_t row = blockIdx.x, rows = a.T * a.Hq, E = a.E;
  const int64_t stride = rows * (E + 2);
  const float* w = ws + row * (E + 2);
  float mm = -c_inf<float>();
  for (int s = 0; s < splits; ++s) mm = fmaxf(mm, w[s * stride]);
  const float mu = mm == -c_inf<float>() ? 0.f : mm;
  float ll = 0.f;
  for (int s = 0; s < splits; ++s) ll += w[s * stride + 1] * __expf(w[s * stride] - mu);
  const float inv = ll != 0.f ? 1.f / ll : 0.f;
  for (int64_t f = threadIdx.x; f < E; f += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < splits; ++s) o += w[s * stride + 2 + f] * __expf(w[s * stride] - mu);
    static_cast<T*>(a.out)[row * E + f] = from_c<T>(compute_t<T>(o * inv));
  }
}

template <typename T, int NF>
void launch_paged(const PagedAttnArgs& a, int splits, float* ws, cudaStream_t stream) {
  const int64_t hchunks = ceil_div(a.Hq / a.Hkv, kRows);
  paged_attn_kernel<T, NF><<<dim3(unsigned(a.T), unsigned(a.Hkv), unsigned(hchunks * splits)), kThreads, 0,
                             stream>>>(a, splits, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    paged_merge_kernel<T><<<unsigned(a.T * a.Hq), 128, 0, stream>>>(a, splits, ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Row t * Hkv + h of the key and value rows into the caches, a thread per feature.
template <typename T>
__global__ void paged_cache_write_kernel(const T* key, const T* value, T* kc, T* vc, const int64_t* slots,
                                         int64_t Hkv, int64_t E, int64_t block_size, int64_t nslots, int64_t k_st,
                                         int64_t k_sh, int64_t k_se, int64_t v_st, int64_t v_sh, int64_t v_se,
                                         int64_t kc_sb, int64_t kc_sh, int64_t kc_sl, int64_t kc_se, int64_t vc_sb,
                                         int64_t vc_sh, int64_t vc_sl, int64_t vc_se) {
  const int64_t t = blockIdx.x / Hkv, h = blockIdx.x % Hkv;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= nslots) return;  // padding (or out of range: nothing written)
  const int64_t blk = slot / block_size, off = slot % block_size;
  for (int64_t f = threadIdx.x; f < E; f += blockDim.x) {
    kc[blk * kc_sb + h * kc_sh + off * kc_sl + f * kc_se] = key[t * k_st + h * k_sh + f * k_se];
    vc[blk * vc_sb + h * vc_sh + off * vc_sl + f * vc_se] = value[t * v_st + h * v_sh + f * v_se];
  }
}

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale) {
  const PagedProblem p =
      prepare_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc);
  TORCH_CHECK_VALUE(p.T < (int64_t(1) << 31) && p.Hkv < 65536 && p.Hq < 65536, "fusedformer.paged_attention: ",
                    "sizes out of the CUDA kernel's range (tokens < 2^31, heads < 65536)");
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = at::empty({p.T, p.Hq, p.E}, query.options());
  if (p.T == 0) return out;
  const PagedAttnArgs a = paged_attention_args(p, query, key_cache, value_cache, out, scale);
  // split the keys when the blocks would not fill the device (about eight per multiprocessor, each
  // with at least 256 keys of the longest context); float64 in one piece (the partials are merged
  // in float32)
  const int64_t blocks = p.T * p.Hkv * ceil_div(p.Hq / p.Hkv, kRows);
  const int64_t max_keys = p.block_tables.size(1) * p.block_size;  // the table's width bounds every context
  int splits = 1;
  if (query.scalar_type() != at::kDouble && blocks < 8 * sm_count())
    splits = int(std::min<int64_t>({kMaxSplits, ceil_div(8 * sm_count(), blocks), ceil_div(max_keys, 256)}));
  splits = std::max(splits, 1);
  at::Tensor ws;
  if (splits > 1) ws = at::empty({splits * p.T * p.Hq * (p.E + 2)}, query.options().dtype(at::kFloat));
  float* w = splits > 1 ? ws.data_ptr<float>() : nullptr;
  const cudaStream_t stream = current_stream();
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.E <= 64) launch_paged<T, 2>(a, splits, w, stream);
    else if (p.E <= 128) launch_paged<T, 4>(a, splits, w, stream);
    else launch_paged<T, 8>(a, splits, w, stream);
  });
  return out;
}

void paged_cache_write(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                       const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  const CacheWriteProblem p = prepare_paged_cache_write(key, value, key_cache, value_cache, slot_mapping);
  if (p.T == 0) return;
  const c10::cuda::CUDAGuard guard(key_cache.device());
  const cudaStream_t stream = current_stream();
  dispatch_dtype(dtype_of(key_cache), [&](auto tag) {
    using T = decltype(tag);
    const int threads = int(std::min<int64_t>(256, ceil_div(p.E, 32) * 32));
    paged_cache_write_kernel<T><<<unsigned(p.T * p.Hkv), threads, 0, stream>>>(
        static_cast<const T*>(key.data_ptr()), static_cast<const T*>(value.data_ptr()),
        static_cast<T*>(key_cache.data_ptr()), static_cast<T*>(value_cache.data_ptr()),
        p.slots.data_ptr<int64_t>(), p.Hkv, p.E, p.block_size, p.num_blocks * p.block_size, key.stride(0),
        key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2), key_cache.stride(0),
        key_cache.stride(1), key_cache.stride(2), key_cache.stride(3), value_cache.stride(0), value_cache.stride(1),
        value_cache.stride(2), value_cache.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CUDA, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("paged_cache_write", &paged_cache_write);
}

}  // namespace fusedformer::cuda
