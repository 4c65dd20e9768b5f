// Argument checking and shape logic shared by the CPU and CUDA implementations of every op.
// Each check raises a Python exception (through TORCH_CHECK*) whose message names the argument,
// what was expected and what was given.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace fusedformer {

// float32, bfloat16 or float16; anything else is a TypeError naming `name`.
void check_float_dtype(const at::Tensor& t, const char* op, const char* name);
void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                      const char* op);
void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const char* op);
void check_nonempty(const at::Tensor& t, const char* op, const char* name);
// float64 for float64 tensors, float32 otherwise: the type kernels compute, accumulate and keep
// statistics, additive masks and norm parameters in.
inline at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
// `mask` (bool or floating) must broadcast to `target`; returns it expanded to `target`, bool or
// (additive) converted to `compute`.
at::Tensor broadcast_mask(const at::Tensor& mask, at::IntArrayRef target, const char* op, const char* name,
                          at::ScalarType compute);

// ---------------------------------------------------------------------------------------------
// linear: input (..., K), weight (N, K), bias (N) or none, one dtype and device

void check_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
// cross_entropy_rows: logits (rows, n >= 1) float, target (rows,) int64 with every entry in [0, n) or
// ignore_index, scale one element; all on one device. Reading target costs a device sync on CUDA.
void check_cross_entropy(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& scale,
                         int64_t ignore_index);

// ---------------------------------------------------------------------------------------------
// softmax

struct SoftmaxProblem {
  at::Tensor x;     // contiguous, the softmax dim moved last (unless move_dim is false)
  at::Tensor mask;  // undefined, or expanded to x's (moved) shape
  int64_t dim;      // wrapped dim of the caller's tensor
  bool moved;       // dim was not the last one and was moved: the result must be moved back
  // causal applies to the last two dims of x: only when the softmax dim is last, or (move_dim
  // false) the second to last; for other dims it is folded into `mask`
  bool causal;
};
SoftmaxProblem prepare_softmax(const at::Tensor& x, int64_t dim, const std::optional<at::Tensor>& mask,
                               bool is_causal, bool move_dim = true);
void check_softmax_bwd(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim);
// Row dims (all but the last) of a mask expanded to the softmax input, size-1 dims dropped and
// runs that are contiguous with each other merged: at most max_dims (size, stride) pairs, so that
// a row's mask offset is sum((r / prod(later sizes)) % size * stride). A mask whose rows need more
// pairs is replaced by a contiguous copy, described by one pair.
struct MaskRowDims {
  std::vector<int64_t> sizes, strides;
};
MaskRowDims coalesce_mask_rows(at::Tensor& mask, int max_dims);

// ---------------------------------------------------------------------------------------------
// layer_norm / rms_norm

struct NormProblem {
  at::Tensor x;         // contiguous
  at::Tensor residual;  // contiguous or undefined
  at::Tensor weight;    // compute type, contiguous (n), or undefined
  at::Tensor bias;      // compute type, contiguous (n), or undefined
  int64_t rows, n;
  std::vector<int64_t> stat_shape;  // input.shape[:-len(normalized_shape)]
};
NormProblem prepare_norm(const char* op, const at::Tensor& input, at::IntArrayRef normalized_shape,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, double eps);
// The inputs of a norm backward, checked: grad_out and grad_residual_out (undefined when absent or
// empty) contiguous with the input's shape and dtype, mean (layer norm) and rstd contiguous in the
// compute type with one entry per row.
struct NormBwdProblem {
  NormProblem p;
  at::Tensor grad_y, grad_h, mean, rstd;
};
NormBwdProblem prepare_norm_bwd(const char* op, bool rms, const at::Tensor& grad_out,
                                const std::optional<at::Tensor>& grad_h, const at::Tensor& input,
                                const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                                at::IntArrayRef normalized_shape);
// grad_weight / grad_bias are computed in the compute type; this casts them to the parameter's dtype.
at::Tensor param_grad(const at::Tensor& g, const std::optional<at::Tensor>& param);

// ---------------------------------------------------------------------------------------------
// attention

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
// (B, H, L, E)-shaped view of a tensor laid out like `like_shape` (used for grad_out / out / lse)
at::Tensor flatten_batch(const at::Tensor& t, int64_t keep_dims);
void check_attention_bwd(const AttnProblem& p, const at::Tensor& grad_out, const at::Tensor& out,
                         const at::Tensor& lse);
// cu_seqlens of the varlen op as int64 on the CPU: 1-D, from 0 to `tokens`, nondecreasing.
at::Tensor check_cu_seqlens(const at::Tensor& cu_seqlens, int64_t tokens, const char* op);

}  // namespace fusedformer
