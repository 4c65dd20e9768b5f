// Argument checks and kernel arguments of the attention ops.
#include <c10/util/Exception.h>

#include "common/attention.h"

namespace fusedformer {

namespace {

// (batch..., keep...) -> (B, keep...), B = 1 when there are no batch dims
at::Tensor flatten_batch(const at::Tensor& t, int64_t keep_dims) {
  if (t.dim() == keep_dims) return t.unsqueeze(0);
  if (t.dim() == keep_dims + 1) return t;
  return t.flatten(0, t.dim() - keep_dims - 1);
}

// (..., H, L, E) -> (B, H, L, E); rank-2 inputs (L, E) get H = 1
at::Tensor as_bhle(const at::Tensor& t) {
  if (t.dim() == 2) return t.unsqueeze(0).unsqueeze(0);
  return flatten_batch(t, 3);
}

void check_attention_bwd(const AttnProblem& p, const at::Tensor& grad_out, const at::Tensor& out,
                         const at::Tensor& lse) {
  const char* op = "fusedformer.attention backward";
  check_same_dtype(p.q, "query", grad_out, "grad_out", op);
  check_same_dtype(p.q, "query", out, "out", op);
  check_same_device(p.q, "query", grad_out, "grad_out", op);
  check_same_device(p.q, "query", out, "out", op);
  check_same_device(p.q, "query", lse, "lse", op);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(p.out_shape), op, ": grad_out must have shape ",
                    p.out_shape, ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(p.out_shape), op, ": out must have shape ", p.out_shape,
                    ", got ", out.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(p.lse_shape) && lse.scalar_type() == compute_dtype(p.q), op,
                    ": lse must be ", compute_dtype(p.q), " of shape ", p.lse_shape, ", got ", lse.scalar_type(), " ",
                    lse.sizes());
}

at::Tensor check_cu_seqlens(const at::Tensor& cu_seqlens, int64_t tokens, const char* op) {
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, op,
                    ": cu_seqlens must be a 1-D tensor of sequence starts and the total (batch + 1 entries), got shape ",
                    cu_seqlens.sizes());
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kLong || cu_seqlens.scalar_type() == at::kInt, op,
                   ": cu_seqlens must be int64 or int32, got ", cu_seqlens.scalar_type());
  at::Tensor cu = cu_seqlens.to(at::kCPU, at::kLong).contiguous();
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t n = cu.numel();
  TORCH_CHECK_VALUE(c[0] == 0, op, ": cu_seqlens must start at 0, got ", c[0]);
  for (int64_t i = 1; i < n; ++i)
    TORCH_CHECK_VALUE(c[i] >= c[i - 1], op, ": cu_seqlens must be nondecreasing, got ", c[i - 1], " then ", c[i],
                      " at index ", i);
  TORCH_CHECK_VALUE(c[n - 1] == tokens, op, ": cu_seqlens must end at the number of tokens (", tokens, "), got ",
                    c[n - 1]);
  return cu;
}

}  // namespace

AttnProblem prepare_attention(const char* op, const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                              double dropout_p, const std::optional<at::Tensor>& seed) {
  check_float_dtype(query, op, "query");
  check_same_dtype(query, "query", key, "key", op);
  check_same_dtype(query, "query", value, "value", op);
  check_same_device(query, "query", key, "key", op);
  check_same_device(query, "query", value, "value", op);
  TORCH_CHECK_VALUE(query.dim() >= 2, op, ": query must have shape (..., H, L, E) with at least 2 dimensions, got ",
                    query.sizes());
  TORCH_CHECK_VALUE(key.dim() == query.dim() && value.dim() == query.dim(), op,
                    ": query, key and value must have the same number of dimensions, got ", query.dim(), ", ",
                    key.dim(), " and ", value.dim());
  const int64_t nd = query.dim();
  const int64_t nbatch = nd > 3 ? nd - 3 : 0;
  AttnProblem p;
  p.batch_shape.assign(query.sizes().begin(), query.sizes().begin() + nbatch);
  TORCH_CHECK_VALUE(key.sizes().slice(0, nbatch) == query.sizes().slice(0, nbatch) &&
                        value.sizes().slice(0, nbatch) == query.sizes().slice(0, nbatch),
                    op, ": key and value must have the batch dimensions of query ", query.sizes().slice(0, nbatch),
                    ", got key ", key.sizes(), " and value ", value.sizes());
  p.Hq = nd >= 3 ? query.size(-3) : 1;
  p.Hkv = nd >= 3 ? key.size(-3) : 1;
  TORCH_CHECK_VALUE(nd < 3 || value.size(-3) == p.Hkv, op, ": key and value must have the same number of heads, got ",
                    p.Hkv, " and ", value.size(-3));
  p.L = query.size(-2);
  p.S = key.size(-2);
  p.E = query.size(-1);
  p.Ev = value.size(-1);
  TORCH_CHECK_VALUE(value.size(-2) == p.S, op, ": key and value must have the same sequence length, got ", p.S,
                    " and ", value.size(-2));
  TORCH_CHECK_VALUE(key.size(-1) == p.E, op, ": key must have the head dim of query (", p.E, "), got ",
                    key.size(-1));
  check_nonempty(query, op, "query");
  check_nonempty(key, op, "key");
  check_nonempty(value, op, "value");
  TORCH_CHECK_VALUE(p.Hq % p.Hkv == 0, op, ": the number of query heads (", p.Hq,
                    ") must be a multiple of the number of key/value heads (", p.Hkv, ")");
  TORCH_CHECK_VALUE(p.E <= kMaxHeadDim, op, ": head dim of query/key must be at most ", kMaxHeadDim, ", got ", p.E);
  TORCH_CHECK_VALUE(p.Ev <= kMaxHeadDim, op, ": head dim of value must be at most ", kMaxHeadDim, ", got ", p.Ev);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);

  p.q = as_bhle(query);
  p.k = as_bhle(key);
  p.v = as_bhle(value);
  p.B = p.q.size(0);

  p.out_shape = query.sizes().vec();
  p.out_shape.back() = p.Ev;
  p.lse_shape.assign(query.sizes().begin(), query.sizes().end() - 1);

  if (attn_mask.has_value() && attn_mask->defined()) {
    check_same_device(query, "query", *attn_mask, "attn_mask", op);
    std::vector<int64_t> target(p.batch_shape);
    if (nd >= 3) target.push_back(p.Hq);
    target.push_back(p.L);
    target.push_back(p.S);
    at::Tensor m = broadcast_mask(*attn_mask, target, op, "attn_mask", compute_dtype(query));
    if (nd == 2) {
      m = m.unsqueeze(0).unsqueeze(0);
    } else {
      m = flatten_batch(m, 3);
    }
    p.mask = m;
  }
  p.seed = 0;
  if (dropout_p > 0.0) {
    TORCH_CHECK_VALUE(seed.has_value() && seed->defined() && seed->numel() == 1, op,
                      ": seed must be a one-element integer tensor when dropout_p > 0");
    TORCH_CHECK_TYPE(!at::isFloatingType(seed->scalar_type()) && seed->scalar_type() != at::kBool, op,
                     ": seed must be an integer tensor, got ", seed->scalar_type());
    p.seed = static_cast<uint64_t>(seed->item<int64_t>());
  }
  return p;
}

AttnOutputs attention_outputs(const AttnProblem& p) {
  return {at::empty(p.out_shape, p.q.options()), at::empty(p.lse_shape, p.q.options().dtype(compute_dtype(p.q)))};
}

AttnBwdProblem prepare_attention_bwd(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
                                     const std::optional<at::Tensor>& attn_mask, double dropout_p,
                                     const std::optional<at::Tensor>& seed) {
  AttnBwdProblem b;
  b.p = prepare_attention("fusedformer.attention backward", query, key, value, attn_mask, dropout_p, seed);
  check_attention_bwd(b.p, grad_out, out, lse);
  b.grad_out = as_bhle(grad_out);
  b.out = out.contiguous();
  b.lse = lse.contiguous();
  b.grad_q = at::empty(query.sizes(), b.p.q.options());
  b.grad_k = at::empty(key.sizes(), b.p.q.options());
  b.grad_v = at::empty(value.sizes(), b.p.q.options());
  return b;
}

VarlenProblem prepare_attention_varlen(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                       const at::Tensor& cu_seqlens) {
  constexpr const char* op = "fusedformer.attention_varlen";
  TORCH_CHECK_VALUE(query.dim() == 3 && key.dim() == 3 && value.dim() == 3, op,
                    ": query, key and value must have shape (tokens, heads, head_dim), got ", query.sizes(), ", ",
                    key.sizes(), " and ", value.sizes());
  TORCH_CHECK_VALUE(key.size(0) == query.size(0) && value.size(0) == query.size(0), op,
                    ": query, key and value must have the same number of tokens, got ", query.size(0), ", ",
                    key.size(0), " and ", value.size(0));
  VarlenProblem v;
  v.cu_seqlens = check_cu_seqlens(cu_seqlens, query.size(0), op);
  // (1, H, T, E) views: the shared checks, and the strides the kernel reads
  v.p = prepare_attention(op, query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), std::nullopt, 0.0,
                          std::nullopt);
  return v;
}

}  // namespace fusedformer
