// Argument checks and kernel arguments of fusedformer.attention (and its varlen form), shared by
// the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "common/glue.h"
#include "fusedformer/kernel_types.h"

namespace fusedformer {

struct AttnProblem {
  at::Tensor q, k, v;  // (B, H, L|S, E|Ev) views, batch dims flattened (no copy where possible)
  at::Tensor mask;     // undefined or (B, Hq, L, S) expanded view; bool, or the compute type
  std::vector<int64_t> batch_shape;
  int64_t B, Hq, Hkv, L, S, E, Ev;
  std::vector<int64_t> out_shape;  // batch_shape + (Hq, L, Ev) (or (L, Ev) for rank-2 inputs)
  std::vector<int64_t> lse_shape;  // batch_shape + (Hq, L)
  uint64_t seed;
};
inline constexpr int64_t kMaxHeadDim = 256;
AttnProblem prepare_attention(const char* op, const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                              double dropout_p, const std::optional<at::Tensor>& seed);

// The forward's outputs: out (out_shape, the input dtype) and lse (lse_shape, the compute type).
struct AttnOutputs {
  at::Tensor out, lse;
};
AttnOutputs attention_outputs(const AttnProblem& p);

// The backward's inputs, checked and viewed as the kernels read them, and its outputs.
struct AttnBwdProblem {
  AttnProblem p;
  at::Tensor grad_out;    // (B, Hq, L, Ev) view
  at::Tensor out, lse;    // contiguous
  at::Tensor grad_q, grad_k, grad_v;  // the shapes of query, key, value
};
AttnBwdProblem prepare_attention_bwd(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
                                     const std::optional<at::Tensor>& attn_mask, double dropout_p,
                                     const std::optional<at::Tensor>& seed);

// The varlen op's inputs: query (T, Hq, E), key / value (T, Hkv, E|Ev) as a (1, H, T, E) problem,
// and cu_seqlens as int64 on the CPU (from 0 to T, nondecreasing).
struct VarlenProblem {
  AttnProblem p;
  at::Tensor cu_seqlens;
};
VarlenProblem prepare_attention_varlen(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                       const at::Tensor& cu_seqlens);

// A (B, H, L, E) tensor as the kernels address it.
inline AttnTensor attn_tensor(const at::Tensor& t) {
  return AttnTensor{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The kernel arguments of a problem, the output contiguous (B, Hq, L, Ev); out and lse are left
// for the caller. A 32-bit Index (CUDA) is checked to hold the sizes.
template <typename Index, typename Real>
void fill_attention_args(AttnFwdArgsOf<Index, Real>& a, const AttnProblem& p, double dropout_p, bool is_causal,
                         double scale) {
  if constexpr (sizeof(Index) < sizeof(int64_t)) {
    TORCH_CHECK_VALUE(p.L < (int64_t(1) << 31) && p.S < (int64_t(1) << 31) && p.B < 65536 && p.Hq < 65536,
                      "fusedformer.attention: sizes out of the CUDA kernels' range (B, H < 65536; L, S < 2^31)");
  }
  a = AttnFwdArgsOf<Index, Real>{};
  a.dtype = dtype_of(p.q);
  a.q = attn_tensor(p.q);
  a.k = attn_tensor(p.k);
  a.v = attn_tensor(p.v);
  a.B = Index(p.B);
  a.Hq = Index(p.Hq);
  a.Hkv = Index(p.Hkv);
  a.L = Index(p.L);
  a.S = Index(p.S);
  a.E = Index(p.E);
  a.Ev = Index(p.Ev);
  a.o_sl = p.Ev;
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
  a.dropout_p = static_cast<Real>(dropout_p);
  a.seed = p.seed;
}

// The same for the backward, from the problem's current q, k, v and grad_out (a backend may have
// replaced them by aligned copies); the backend's workspaces are left for the caller.
template <typename Index, typename Real>
void fill_attention_bwd_args(AttnBwdArgsOf<Index, Real>& a, const AttnBwdProblem& b, double dropout_p,
                             bool is_causal, double scale) {
  fill_attention_args(a.fwd, b.p, dropout_p, is_causal, scale);
  a.fwd.out = b.out.data_ptr();
  a.fwd.lse = b.lse.data_ptr();
  a.grad_out = attn_tensor(b.grad_out);
  a.grad_q = b.grad_q.data_ptr();
  a.grad_k = b.grad_k.data_ptr();
  a.grad_v = b.grad_v.data_ptr();
}

}  // namespace fusedformer
