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

#include "common/attention.h"
#include "fusedformer/cuda/attention.h"
#include "fusedformer/cuda/device.h"

namespace fusedformer::cuda {
namespace {

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

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                                                 double dropout_p, bool is_causal, double scale,
                                                 const std::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(query.device());
  AttnProblem p = prepare_attention("fusedformer.attention", query, key, value, attn_mask, dropout_p, seed);
  const AttnOutputs o = attention_outputs(p);
  const cudaStream_t stream = current_stream();
  const int64_t rows = p.L * (p.Hq / p.Hkv);
  AttnFwdParams a;
  if (rows <= kDecodeMaxRows) {
    fill_attention_args(a, p, dropout_p, is_causal, scale);
    if (decode_supported(a)) {
      a.out = o.out.data_ptr();
      a.lse = o.lse.data_ptr();
      const int splits = decode_splits(a, sm_count());
      at::Tensor ws;
      if (splits > 1) ws = at::empty({int64_t(splits) * p.B * p.Hq * p.L * (p.Ev + 2)}, p.q.options().dtype(at::kFloat));
      C10_CUDA_CHECK(attention_fwd_decode(a, splits, splits > 1 ? ws.data_ptr<float>() : nullptr, stream));
      return {o.out, o.lse};
    }
  }
  const bool tc = use_tensor_cores(p, false);
  if (tc) {
    p.q = aligned_copy(p.q);
    p.k = aligned_copy(p.k);
    p.v = aligned_copy(p.v);
  }
  fill_attention_args(a, p, dropout_p, is_causal, scale);
  a.out = o.out.data_ptr();
  a.lse = o.lse.data_ptr();
  C10_CUDA_CHECK(tc ? attention_fwd_tc(a, stream) : attention_fwd_simt(a, stream));
  return {o.out, o.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, double dropout_p,
    bool is_causal, double scale, const std::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(query.device());
  AttnBwdProblem b = prepare_attention_bwd(grad_out, query, key, value, out, lse, attn_mask, dropout_p, seed);
  AttnProblem& p = b.p;
  const bool tc = use_tensor_cores(p, true);
  if (tc) {
    p.q = aligned_copy(p.q);
    p.k = aligned_copy(p.k);
    p.v = aligned_copy(p.v);
    b.grad_out = aligned_copy(b.grad_out);
  }
  at::Tensor dvec = at::empty({p.B, p.Hq, p.L}, p.q.options().dtype(compute_dtype(p.q)));
  AttnBwdParams a{};
  fill_attention_bwd_args(a, b, dropout_p, is_causal, scale);
  a.dvec = dvec.data_ptr();
  const cudaStream_t stream = current_stream();
  if (!tc) {
    C10_CUDA_CHECK(attention_bwd_prepare(a, stream));
    C10_CUDA_CHECK(attention_bwd_simt(a, stream));
    return {b.grad_q, b.grad_k, b.grad_v};
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
  b.grad_q.copy_(dq_accum.mul_(scale).view(query.sizes()));
  return {b.grad_q, b.grad_k, b.grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace fusedformer::cuda
