// attention_fwd / attention_bwd for the CUDA dispatch key.
//
// Path per call:
//   decode       few query rows (L * Hq / Hkv <= kDecodeMaxRows): split along the keys;
//   tensor cores bf16/fp16 with head dims multiples of 8 (inputs whose rows are not 16-byte
//                aligned are copied first);
//   SIMT         everything else (float32, float64, odd head dims), computed in the compute type.
// The backward takes the tensor-core kernels or the SIMT ones by the same rule. Under
// torch.use_deterministic_algorithms(True) the tensor-core backward adds the key blocks' dQ
// contributions in a fixed order (the SIMT backward always does).
#include <ATen/Context.h>
#include <torch/library.h>

#include "fusedformer/common.h"
#include "fusedformer/cuda/attention.h"
#include "fusedformer/cuda/glue.h"

namespace fusedformer::cuda {
namespace {

AttnTensorArg arg_of(const at::Tensor& t) {
  return AttnTensorArg{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// unit feature stride, rows (and heads, batches) 16-byte aligned
bool rows_aligned(const at::Tensor& t) {
  const int64_t es = t.element_size();
  return t.stride(3) == 1 && aligned16(t.data_ptr()) && (t.stride(2) * es) % 16 == 0 &&
         (t.stride(1) * es) % 16 == 0 && (t.stride(0) * es) % 16 == 0;
}

at::Tensor aligned_copy(const at::Tensor& t) {
  if (rows_aligned(t)) return t;
  at::Tensor c = t.contiguous();
  return rows_aligned(c) ? c : c.clone();
}

int max_smem_optin() {
  int dev = 0, v = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return v;
}

// whether the tensor-core kernels take this problem (after aligned_copy of q, k, v)
bool use_tensor_cores(const AttnProblem& p, bool backward) {
  const auto st = p.q.scalar_type();
  if (st != at::kBFloat16 && st != at::kHalf) return false;
  if (p.E % 8 != 0 || p.Ev % 8 != 0) return false;
  return attention_tc_smem(tc_head_dim_bucket(int(p.E), int(p.Ev)), backward) <= max_smem_optin();
}

AttnFwdParams make_params(const AttnProblem& p, double dropout_p, bool is_causal, double scale) {
  TORCH_CHECK_VALUE(p.L < (int64_t(1) << 31) && p.S < (int64_t(1) << 31) && p.B < 65536 && p.Hq < 65536,
                    "fusedformer.attention: sizes out of the CUDA kernels' range (B, H < 65536; L, S < 2^31)");
  AttnFwdParams a{};
  a.dtype = dtype_of(p.q);
  a.q = arg_of(p.q);
  a.k = arg_of(p.k);
  a.v = arg_of(p.v);
  a.B = int(p.B);
  a.Hq = int(p.Hq);
  a.Hkv = int(p.Hkv);
  a.L = int(p.L);
  a.S = int(p.S);
  a.E = int(p.E);
  a.Ev = int(p.Ev);
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
  a.dropout_p = static_cast<float>(dropout_p);
  a.seed = p.seed;
  return a;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                                                 double dropout_p, bool is_causal, double scale,
                                                 const std::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(query.device());
  AttnProblem p = prepare_attention("fusedformer.attention", query, key, value, attn_mask, dropout_p, seed);
  at::Tensor out = at::empty(p.out_shape, p.q.options());
  at::Tensor lse = at::empty(p.lse_shape, p.q.options().dtype(compute_dtype(p.q)));
  const cudaStream_t stream = current_stream();
  const int64_t rows = p.L * (p.Hq / p.Hkv);
  if (rows <= kDecodeMaxRows) {
    AttnFwdParams a = make_params(p, dropout_p, is_causal, scale);
    if (decode_supported(a)) {
      a.out = out.data_ptr();
      a.lse = lse.data_ptr();
      const int splits = decode_splits(a, sm_count());
      at::Tensor ws;
      if (splits > 1) ws = at::empty({int64_t(splits) * p.B * p.Hq * p.L * (p.Ev + 2)}, p.q.options().dtype(at::kFloat));
      C10_CUDA_CHECK(attention_fwd_decode(a, splits, splits > 1 ? ws.data_ptr<float>() : nullptr, stream));
      return {out, lse};
    }
  }
  const bool tc = use_tensor_cores(p, false);
  if (tc) {
    p.q = aligned_copy(p.q);
    p.k = aligned_copy(p.k);
    p.v = aligned_copy(p.v);
  }
  AttnFwdParams a = make_params(p, dropout_p, is_causal, scale);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  C10_CUDA_CHECK(tc ? attention_fwd_tc(a, stream) : attention_fwd_simt(a, stream));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, double dropout_p,
    bool is_causal, double scale, const std::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(query.device());
  AttnProblem p = prepare_attention("fusedformer.attention backward", query, key, value, attn_mask, dropout_p, seed);
  check_attention_bwd(p, grad_out, out, lse);
  const bool tc = use_tensor_cores(p, true);
  at::Tensor go = grad_out.dim() == 2 ? grad_out.unsqueeze(0).unsqueeze(0) : flatten_batch(grad_out, 3);
  if (tc) {
    p.q = aligned_copy(p.q);
    p.k = aligned_copy(p.k);
    p.v = aligned_copy(p.v);
    go = aligned_copy(go);
  }
  at::Tensor o = out.contiguous();
  at::Tensor l = lse.contiguous();
  at::Tensor gq = at::empty(query.sizes(), p.q.options());
  at::Tensor gk = at::empty(key.sizes(), p.q.options());
  at::Tensor gv = at::empty(value.sizes(), p.q.options());
  const auto ct = compute_dtype(p.q);
  at::Tensor dvec = at::empty({p.B, p.Hq, p.L}, p.q.options().dtype(ct));
  AttnBwdParams a{};
  a.fwd = make_params(p, dropout_p, is_causal, scale);
  a.fwd.out = o.data_ptr();
  a.fwd.lse = l.data_ptr();
  a.grad_out = arg_of(go);
  a.grad_q = gq.data_ptr();
  a.grad_k = gk.data_ptr();
  a.grad_v = gv.data_ptr();
  a.dvec = dvec.data_ptr();
  const cudaStream_t stream = current_stream();
  if (!tc) {
    C10_CUDA_CHECK(attention_bwd_prepare(a, stream));
    C10_CUDA_CHECK(attention_bwd_simt(a, stream));
    return {gq, gk, gv};
  }
  at::Tensor lse2 = at::empty({p.B, p.Hq, p.L}, p.q.options().dtype(at::kFloat));
  at::Tensor dq_accum = at::zeros({p.B, p.Hq, p.L, p.E}, p.q.options().dtype(at::kFloat));
  at::Tensor locks;
  if (at::globalContext().deterministicAlgorithms()) {
    locks = at::zeros({p.B, p.Hq, (p.L + kTcBwdBlockM - 1) / kTcBwdBlockM}, p.q.options().dtype(at::kInt));
    a.dq_locks = locks.data_ptr<int>();
  }
  a.lse2 = lse2.data_ptr();
  a.dq_accum = dq_accum.data_ptr();
  C10_CUDA_CHECK(attention_bwd_prepare(a, stream));
  C10_CUDA_CHECK(attention_bwd_tc(a, stream));
  gq.copy_(dq_accum.mul_(scale).view(query.sizes()));
  return {gq, gk, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace fusedformer::cuda
