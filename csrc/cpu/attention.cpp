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

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace fusedformer::cpu
