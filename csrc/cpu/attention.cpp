// attention_fwd / attention_bwd / attention_varlen_fwd for the CPU dispatch key.
#include <torch/library.h>

#include "common/attention.h"
#include "cpu/ops.h"
#include "fusedformer/cpu/kernels.h"

namespace fusedformer::cpu {

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                                                 double dropout_p, bool is_causal, double scale,
                                                 const std::optional<at::Tensor>& seed) {
  const AttnProblem p = prepare_attention("fusedformer.attention", query, key, value, attn_mask, dropout_p, seed);
  const AttnOutputs o = attention_outputs(p);
  AttnFwdArgs a;
  fill_attention_args(a, p, dropout_p, is_causal, scale);
  a.out = o.out.data_ptr();
  a.lse = o.lse.data_ptr();
  kernels().attention_fwd(a);
  return {o.out, o.lse};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, double dropout_p,
    bool is_causal, double scale, const std::optional<at::Tensor>& seed) {
  const AttnBwdProblem b = prepare_attention_bwd(grad_out, query, key, value, out, lse, attn_mask, dropout_p, seed);
  AttnBwdArgs a;
  fill_attention_bwd_args(a, b, dropout_p, is_causal, scale);
  kernels().attention_bwd(a);
  return {b.grad_q, b.grad_k, b.grad_v};
}

// Packed sequences: query (T, Hq, E), key / value (T, Hkv, E|Ev), sequence b the rows
// [cu_seqlens[b], cu_seqlens[b + 1]), attending only within itself. Each sequence is a batch of one of
// the dense kernel (the forward or the decode path), reading its rows in place and writing its rows
// of the (T, Hq, Ev) output.
at::Tensor attention_varlen_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                const at::Tensor& cu_seqlens, bool is_causal, double scale) {
  const VarlenProblem v = prepare_attention_varlen(query, key, value, cu_seqlens);
  const AttnProblem& p = v.p;
  const int64_t T = query.size(0);
  at::Tensor out = at::empty({T, p.Hq, p.Ev}, p.q.options());
  at::Tensor lse = at::empty({p.Hq * T}, p.q.options().dtype(compute_dtype(p.q)));
  const int64_t* c = v.cu_seqlens.data_ptr<int64_t>();
  const int64_t size = p.q.element_size(), lse_size = lse.element_size();
  AttnFwdArgs all;
  fill_attention_args(all, p, 0.0, is_causal, scale);
  for (int64_t b = 0; b + 1 < v.cu_seqlens.numel(); ++b) {
    const int64_t t0 = c[b], n = c[b + 1] - c[b];
    if (n == 0) continue;
    AttnFwdArgs a = all;
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
