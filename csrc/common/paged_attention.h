// Argument checks and kernel arguments of fusedformer.paged_attention and
// fusedformer.paged_cache_write, shared by the CPU and CUDA implementations.
//
// The shapes, dtypes and devices are checked on every device. The values of the index tensors
// (sequence lengths, query starts, block ids, slots) are checked when they are on the CPU; on CUDA
// reading them would synchronize the stream, so the kernels there skip out-of-range block ids and
// slots instead.
#pragma once

#include <ATen/ATen.h>

#include "common/glue.h"
#include "fusedformer/kernel_types.h"

namespace fusedformer {

inline constexpr int64_t kPagedMaxHeadDim = 256;

struct PagedProblem {
  at::Tensor block_tables, seq_lens, query_start;  // int64, contiguous, on the query's device
  int64_t B, T, Hq, Hkv, E, block_size, num_blocks;
  int64_t max_q_len;  // on the CPU only (-1 on other devices)
};
PagedProblem prepare_paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                                     const at::Tensor& value_cache, const at::Tensor& block_tables,
                                     const at::Tensor& seq_lens, const at::Tensor& query_start_loc);

// The kernel arguments; out is (T, Hq, E) contiguous in the query's dtype.
PagedAttnArgs paged_attention_args(const PagedProblem& p, const at::Tensor& query, const at::Tensor& key_cache,
                                   const at::Tensor& value_cache, const at::Tensor& out, double scale);

struct CacheWriteProblem {
  at::Tensor slots;  // int64, contiguous, on the caches' device
  int64_t T, Hkv, E, block_size, num_blocks;
};
CacheWriteProblem prepare_paged_cache_write(const at::Tensor& key, const at::Tensor& value,
                                            const at::Tensor& key_cache, const at::Tensor& value_cache,
                                            const at::Tensor& slot_mapping);

}  // namespace fusedformer
