// Argument checks and kernel arguments of the paged attention ops.
#include "common/paged_attention.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace fusedformer {

namespace {

constexpr const char* kAttnOp = "fusedformer.paged_attention";
constexpr const char* kWriteOp = "fusedformer.paged_cache_write";

// The key and value caches: (num_blocks, Hkv, block_size, E) each, of one shape, dtype and device.
void check_caches(const at::Tensor& key_cache, const at::Tensor& value_cache, const char* op) {
  check_float_dtype(key_cache, op, "key_cache");
  check_same_dtype(key_cache, "key_cache", value_cache, "value_cache", op);
  check_same_device(key_cache, "key_cache", value_cache, "value_cache", op);
  TORCH_CHECK_VALUE(key_cache.dim() == 4, op,
                    ": key_cache must have shape (num_blocks, num_kv_heads, block_size, head_dim), got ",
                    key_cache.sizes());
  TORCH_CHECK_VALUE(value_cache.sizes() == key_cache.sizes(), op, ": value_cache must have the shape of key_cache (",
                    key_cache.sizes(), "), got ", value_cache.sizes());
  check_nonempty(key_cache, op, "key_cache");
  TORCH_CHECK_VALUE(key_cache.size(3) <= kPagedMaxHeadDim, op, ": the head dim of key_cache must be at most ",
                    kPagedMaxHeadDim, ", got ", key_cache.size(3));
}

// A 1-D (or, with dims == 2, 2-D) int64 or int32 index tensor on `device`, as int64 contiguous.
at::Tensor index_tensor(const at::Tensor& t, const char* name, int64_t dims, const at::Device& device,
                        const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, ": ", name,
                   " must be int64 or int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dims, op, ": ", name, " must have ", dims, " dimension", dims == 1 ? "" : "s",
                    ", got shape ", t.sizes());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on the device of the caches (", device, "), got ",
              t.device());
  return t.to(at::kLong).contiguous();
}

}  // namespace

PagedProblem prepare_paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                                     const at::Tensor& value_cache, const at::Tensor& block_tables,
                                     const at::Tensor& seq_lens, const at::Tensor& query_start_loc) {
  const char* op = kAttnOp;
  check_float_dtype(query, op, "query");
  TORCH_CHECK_VALUE(query.dim() == 3, op, ": query must have shape (tokens, num_heads, head_dim), got ",
                    query.sizes());
  check_caches(key_cache, value_cache, op);
  check_same_dtype(query, "query", key_cache, "key_cache", op);
  check_same_device(query, "query", key_cache, "key_cache", op);
  PagedProblem p;
  p.T = query.size(0);
  p.Hq = query.size(1);
  p.E = query.size(2);
  p.num_blocks = key_cache.size(0);
  p.Hkv = key_cache.size(1);
  p.block_size = key_cache.size(2);
  TORCH_CHECK_VALUE(key_cache.size(3) == p.E, op, ": key_cache must have the head dim of query (", p.E, "), got ",
                    key_cache.size(3));
  TORCH_CHECK_VALUE(p.Hq > 0 && p.Hq % p.Hkv == 0, op, ": the number of query heads (", p.Hq,
                    ") must be a positive multiple of the number of key/value heads of key_cache (", p.Hkv, ")");
  const at::Device dev = query.device();
  p.seq_lens = index_tensor(seq_lens, "seq_lens", 1, dev, op);
  p.B = p.seq_lens.size(0);
  p.block_tables = index_tensor(block_tables, "block_tables", 2, dev, op);
  p.query_start = index_tensor(query_start_loc, "query_start_loc", 1, dev, op);
  TORCH_CHECK_VALUE(p.block_tables.size(0) == p.B, op, ": block_tables must have one row per sequence (", p.B,
                    " from seq_lens), got shape ", block_tables.sizes());
  TORCH_CHECK_VALUE(p.query_start.size(0) == p.B + 1, op,
                    ": query_start_loc must have one entry per sequence plus the total (", p.B + 1, "), got ",
                    p.query_start.size(0));
  p.max_q_len = -1;
  if (dev.is_cpu()) {
    const int64_t* qs = p.query_start.data_ptr<int64_t>();
    const int64_t* sl = p.seq_lens.data_ptr<int64_t>();
    const int64_t* bt = p.block_tables.data_ptr<int64_t>();
    const int64_t width = p.block_tables.size(1);
    TORCH_CHECK_VALUE(qs[0] == 0, op, ": query_start_loc must start at 0, got ", qs[0]);
    TORCH_CHECK_VALUE(qs[p.B] == p.T, op, ": query_start_loc must end at the number of query tokens (", p.T,
                      "), got ", qs[p.B]);
    p.max_q_len = 0;
    for (int64_t b = 0; b < p.B; ++b) {
      const int64_t L = qs[b + 1] - qs[b], S = sl[b];
      TORCH_CHECK_VALUE(L >= 0, op, ": query_start_loc must be nondecreasing, got ", qs[b], " then ", qs[b + 1],
                        " at index ", b + 1);
      TORCH_CHECK_VALUE(S >= 0 && S <= width * p.block_size, op, ": seq_lens[", b, "] = ", S,
                        " must be in [0, block_tables width (", width, ") x block_size (", p.block_size, ")]");
      TORCH_CHECK_VALUE(L <= S, op, ": sequence ", b, " has ", L, " query tokens (query_start_loc) but seq_lens[", b,
                        "] = ", S, ": the queries are the last tokens of the context");
      for (int64_t j = 0; j < (S + p.block_size - 1) / p.block_size; ++j) {
        const int64_t blk = bt[b * width + j];
        TORCH_CHECK_VALUE(blk >= 0 && blk < p.num_blocks, op, ": block_tables[", b, ", ", j, "] = ", blk,
                          " is not a block of key_cache (", p.num_blocks, " blocks)");
      }
      p.max_q_len = std::max(p.max_q_len, L);
    }
  }
  return p;
}

PagedAttnArgs paged_attention_args(const PagedProblem& p, const at::Tensor& query, const at::Tensor& key_cache,
                                   const at::Tensor& value_cache, const at::Tensor& out, double scale) {
  PagedAttnArgs a{};
  a.dtype = dtype_of(query);
  a.q = query.data_ptr();
  a.q_st = query.stride(0);
  a.q_sh = query.stride(1);
  a.q_se = query.stride(2);
  a.k_cache = key_cache.data_ptr();
  a.v_cache = value_cache.data_ptr();
  a.kc_sb = key_cache.stride(0);
  a.kc_sh = key_cache.stride(1);
  a.kc_sl = key_cache.stride(2);
  a.kc_se = key_cache.stride(3);
  a.vc_sb = value_cache.stride(0);
  a.vc_sh = value_cache.stride(1);
  a.vc_sl = value_cache.stride(2);
  a.vc_se = value_cache.stride(3);
  a.block_tables = p.block_tables.data_ptr<int64_t>();
  a.bt_stride = p.block_tables.size(1);
  a.seq_lens = p.seq_lens.data_ptr<int64_t>();
  a.query_start = p.query_start.data_ptr<int64_t>();
  a.out = out.data_ptr();
  a.B = p.B;
  a.T = p.T;
  a.Hq = p.Hq;
  a.Hkv = p.Hkv;
  a.E = p.E;
  a.block_size = p.block_size;
  a.num_blocks = p.num_blocks;
  a.max_q_len = p.max_q_len;
  a.scale = scale;
  return a;
}

CacheWriteProblem prepare_paged_cache_write(const at::Tensor& key, const at::Tensor& value,
                                            const at::Tensor& key_cache, const at::Tensor& value_cache,
                                            const at::Tensor& slot_mapping) {
  const char* op = kWriteOp;
  check_caches(key_cache, value_cache, op);
  check_same_dtype(key_cache, "key_cache", key, "key", op);
  check_same_dtype(key_cache, "key_cache", value, "value", op);
  check_same_device(key_cache, "key_cache", key, "key", op);
  check_same_device(key_cache, "key_cache", value, "value", op);
  CacheWriteProblem p;
  p.num_blocks = key_cache.size(0);
  p.Hkv = key_cache.size(1);
  p.block_size = key_cache.size(2);
  p.E = key_cache.size(3);
  TORCH_CHECK_VALUE(key.dim() == 3 && key.size(1) == p.Hkv && key.size(2) == p.E, op,
                    ": key must have shape (tokens, ", p.Hkv, ", ", p.E, ") to match key_cache, got ", key.sizes());
  TORCH_CHECK_VALUE(value.sizes() == key.sizes(), op, ": value must have the shape of key (", key.sizes(), "), got ",
                    value.sizes());
  p.T = key.size(0);
  TORCH_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong, op, ": slot_mapping must be int64, got ",
                   slot_mapping.scalar_type());
  p.slots = index_tensor(slot_mapping, "slot_mapping", 1, key_cache.device(), op);
  TORCH_CHECK_VALUE(p.slots.size(0) == p.T, op, ": slot_mapping must have one entry per token of key (", p.T,
                    "), got ", p.slots.size(0));
  if (p.slots.is_cpu()) {
    const int64_t* s = p.slots.data_ptr<int64_t>();
    const int64_t n = p.num_blocks * p.block_size;
    for (int64_t t = 0; t < p.T; ++t)
      TORCH_CHECK_VALUE(s[t] < n, op, ": slot_mapping[", t, "] = ", s[t], " is beyond the caches' ", n,
                        " slots (num_blocks x block_size)");
  }
  return p;
}

}  // namespace fusedformer
