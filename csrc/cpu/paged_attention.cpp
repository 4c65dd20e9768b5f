// paged_attention / paged_cache_write for the CPU dispatch key.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "common/paged_attention.h"
#include "fusedformer/cpu/kernels.h"

namespace fusedformer::cpu {
namespace {

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale) {
  const PagedProblem p =
      prepare_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc);
  at::Tensor out = at::empty({p.T, p.Hq, p.E}, query.options());
  if (p.T == 0) return out;
  kernels().paged_attention(paged_attention_args(p, query, key_cache, value_cache, out, scale));
  return out;
}

// One (token, head) row of E elements from src (feature stride se) into the cache row dst (feature
// stride de): a copy of bytes when both are contiguous, else element by element.
template <typename T>
void copy_row(const T* src, int64_t se, T* dst, int64_t de, int64_t E) {
  if (se == 1 && de == 1) {
    std::memcpy(dst, src, E * sizeof(T));
    return;
  }
  for (int64_t e = 0; e < E; ++e) dst[e * de] = src[e * se];
}

void paged_cache_write(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                       const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  const CacheWriteProblem p = prepare_paged_cache_write(key, value, key_cache, value_cache, slot_mapping);
  if (p.T == 0) return;
  const int64_t* slots = p.slots.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key_cache.scalar_type(), "paged_cache_write", [&] {
    const scalar_t* k = key.const_data_ptr<scalar_t>();
    const scalar_t* v = value.const_data_ptr<scalar_t>();
    scalar_t* kc = key_cache.data_ptr<scalar_t>();
    scalar_t* vc = value_cache.data_ptr<scalar_t>();
    at::parallel_for(0, p.T, std::max<int64_t>(1, 4096 / (p.Hkv * p.E)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        if (slots[t] < 0) continue;  // padding
        const int64_t blk = slots[t] / p.block_size, off = slots[t] % p.block_size;
        for (int64_t h = 0; h < p.Hkv; ++h) {
          copy_row(k + t * key.stride(0) + h * key.stride(1), key.stride(2),
                   kc + blk * key_cache.stride(0) + h * key_cache.stride(1) + off * key_cache.stride(2),
                   key_cache.stride(3), p.E);
          copy_row(v + t * value.stride(0) + h * value.stride(1), value.stride(2),
                   vc + blk * value_cache.stride(0) + h * value_cache.stride(1) + off * value_cache.stride(2),
                   value_cache.stride(3), p.E);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("paged_cache_write", &paged_cache_write);
}

}  // namespace fusedformer::cpu
