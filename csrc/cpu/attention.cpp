// attention_fwd / attention_bwd for the CPU dispatch key.
#include <torch/library.h>

#include "fusedformer/common.h"
#include "fusedformer/cpu/glue.h"

namespace fusedformer::cpu {
namespace {

AttnTensor view_of(const at::Tensor& t) {
  return AttnTensor{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

AttnFwdArgs make_args(const AttnProblem& p, double dropout_p, bool is_causal, double scale) {
  AttnFwdArgs a{};
  a.dtype = dtype_of(p.q);
  a.q = view_of(p.q);
  a.k = view_of(p.k);
  a.v = view_of(p.v);
  a.B = p.B;
  a.Hq = p.Hq;
  a.Hkv = p.Hkv;
  a.L = p.L;
  a.S = p.S;
  a.E = p.E;
  a.Ev = p.Ev;
  a.o_sl = p.Ev;  // contiguous (B, Hq, L, Ev)
  a.o_sh = p.L * p.Ev;
  a.o_sb = p.Hq * p.L * p.Ev;
  a.mask_kind = mask_kind_of(p.mask);
  if (p.mask.defined()) {
    a.mask = p.mask.data_ptr();
    a.m_sb = p.mask.stride(0);
    a.m_sh = p.mask.stride(1);
    a.m_sl = p.mask.stride(2);
    a.m_ss = p.mask.stride(3);
  }
  a.causal = is_causal;
  a.scale = scale;
  a.dropout_p = dropout_p;
  a.seed = p.seed;
  return a;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                                                 double dropout_p, bool is_causal, double scale,
                                                 const std::optional<at::Tensor>& seed) {
  AttnProblem p = prepare_attention("fusedformer.attention", query, key, value, attn_mask, dropout_p, seed);
  at::Tensor out = at::empty(p.out_shape, p.q.options());
  at::Tensor lse = at::empty(p.lse_shape, p.q.options().dtype(compute_dtype(p.q)));
  AttnFwdArgs a = make_args(p, dropout_p, is_causal, scale);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  kernels().attention_fwd(a);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, double dropout_p,
    bool is_causal, double scale, const std::optional<at::Tensor>& seed) {
  AttnProblem p = prepare_attention("fusedformer.attention backward", query, key, value, attn_mask, dropout_p, seed);
  check_attention_bwd(p, grad_out, out, lse);
  at::Tensor o = out.contiguous();
  at::Tensor l = lse.contiguous();
  at::Tensor go = grad_out.dim() == 2 ? grad_out.unsqueeze(0).unsqueeze(0) : flatten_batch(grad_out, 3);
  at::Tensor gq = at::empty(query.sizes(), p.q.options());
  at::Tensor gk = at::empty(key.sizes(), p.q.options());
  at::Tensor gv = at::empty(value.sizes(), p.q.options());
  AttnBwdArgs a{};
  a.fwd = make_args(p, dropout_p, is_causal, scale);
  a.fwd.out = o.data_ptr();
  a.fwd.lse = l.data_ptr();
  a.grad_out = view_of(go);
  a.grad_q = gq.data_ptr();
  a.grad_k = gk.data_ptr();
  a.grad_v = gv.data_ptr();
  kernels().attention_bwd(a);
  return {gq, gk, gv};
}

// Packed sequences: query (T, Hq, E), key / value (T, Hkv, E|Ev), sequence b the rows
// [cu_seqlens[b], cu_seqlens[b + 1]), attending only within itself. Each sequence is a batch of one of
// the dense kernel (the forward or the decode path), reading its rows in place and writing its rows
// of the (T, Hq, Ev) output.
at::Tensor attention_varlen_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                const at::Tensor& cu_seqlens, bool is_causal, double scale) {
  constexpr const char* op = "fusedformer.attention_varlen";
  TORCH_CHECK_VALUE(query.dim() == 3 && key.dim() == 3 && value.dim() == 3, op,
                    ": query, key and value must have shape (tokens, heads, head_dim), got ", query.sizes(), ", ",
                    key.sizes(), " and ", value.sizes());
  TORCH_CHECK_VALUE(key.size(0) == query.size(0) && value.size(0) == query.size(0), op,
                    ": query, key and value must have the same number of tokens, got ", query.size(0), ", ",
                    key.size(0), " and ", value.size(0));
  const int64_t T = query.size(0);
  const at::Tensor cu = check_cu_seqlens(cu_seqlens, T, op);
  // (1, H, T, E) views: the shared checks, and the strides the kernel reads
  AttnProblem p = prepare_attention(op, query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                    std::nullopt, 0.0, std::nullopt);
  at::Tensor out = at::empty({T, p.Hq, p.Ev}, p.q.options());
  at::Tensor lse = at::empty({p.Hq * T}, p.q.options().dtype(compute_dtype(p.q)));
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t size = p.q.element_size(), lse_size = lse.element_size();
  for (int64_t b = 0; b + 1 < cu.numel(); ++b) {
    const int64_t t0 = c[b], n = c[b + 1] - c[b];
    if (n == 0) continue;
    AttnFwdArgs a = make_args(p, 0.0, is_causal, scale);
    a.L = a.S = n;
    a.q.data = static_cast<const char*>(a.q.data) + t0 * a.q.sl * size;
    a.k.data = static_cast<const char*>(a.k.data) + t0 * a.k.sl * size;
    a.v.data = static_cast<const char*>(a.v.data) + t0 * a.v.sl * size;
    a.out = static_cast<char*>(out.data_ptr()) + t0 * p.Hq * p.Ev * size;
    a.o_sb = 0;
    a.o_sh = p.Ev;
    a.o_sl = p.Hq * p.Ev;
    a.lse = static_cast<char*>(lse.data_ptr()) + t0 * p.Hq * lse_size;  // (Hq, n) of this sequence
    kernels().attention_fwd(a);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd);
}

}  // namespace fusedformer::cpu
