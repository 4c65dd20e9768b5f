// Argument checks and kernel arguments of fusedformer.layer_norm and fusedformer.rms_norm, and the
// four ops themselves over a backend's launchers: each backend (csrc/cpu/layernorm.cpp,
// csrc/cuda/layernorm.cu) supplies only how its kernels run.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "fusedformer/kernel_types.h"

namespace fusedformer {

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

// The forward's checked inputs (which args points into), its outputs and its kernel arguments.
// Without a residual, h is an empty tensor; rms norm has no mean (undefined).
struct NormFwd {
  NormProblem p;
  at::Tensor y, h, mean, rstd;
  NormFwdArgs args;
};
NormFwd norm_fwd_args(bool rms, const at::Tensor& input, at::IntArrayRef normalized_shape,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                      const std::optional<at::Tensor>& residual);

// The inputs of a norm backward, checked: grad_out and grad_residual_out (undefined when absent or
// empty) contiguous with the input's shape and dtype, mean (layer norm) and rstd contiguous in the
// compute type with one entry per row; grad_x allocated. args has every field but grad_weight and
// grad_bias, which the backend points at buffers of its own (want_weight / want_bias say which).
struct NormBwd {
  NormProblem p;
  at::Tensor grad_y, grad_h, mean, rstd, grad_x;
  bool want_weight, want_bias;
  NormBwdArgs args;
};
NormBwd norm_bwd_args(bool rms, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h,
                      const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
                      const std::optional<at::Tensor>& weight, bool has_bias, at::IntArrayRef normalized_shape);
// The weight and bias gradients as the ops return them, from the compute-type sums gw / gb
// (undefined when not wanted): in the parameter's dtype and shape, and an absent one as an empty
// tensor of its own (two outputs of an op must not alias each other).
std::pair<at::Tensor, at::Tensor> norm_param_grads(const NormBwd& b, const at::Tensor& gw, const at::Tensor& gb,
                                                   const std::optional<at::Tensor>& weight,
                                                   at::IntArrayRef normalized_shape);

// layer_norm_{fwd,bwd} and rms_norm_{fwd,bwd} over a backend's launchers:
//   static void Backend::norm_fwd(const at::Tensor& input, const NormFwdArgs&);
//   static std::pair<at::Tensor, at::Tensor> Backend::norm_bwd(const at::Tensor& input, NormBwd&);
// norm_bwd runs the backward and returns the compute-type sums (grad_weight, grad_bias), each
// undefined when not wanted.
template <typename Backend>
struct NormOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
      const at::Tensor& input, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& residual) {
    NormFwd f = norm_fwd_args(false, input, normalized_shape, weight, bias, eps, residual);
    Backend::norm_fwd(input, f.args);
    return {f.y, f.h, f.mean, f.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& input,
                                                                     at::IntArrayRef normalized_shape,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     double eps,
                                                                     const std::optional<at::Tensor>& residual) {
    NormFwd f = norm_fwd_args(true, input, normalized_shape, weight, std::nullopt, eps, residual);
    Backend::norm_fwd(input, f.args);
    return {f.y, f.h, f.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
      const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h, const at::Tensor& input,
      const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool has_bias,
      at::IntArrayRef normalized_shape) {
    NormBwd b = norm_bwd_args(false, grad_out, grad_h, input, mean, rstd, weight, has_bias, normalized_shape);
    const auto [gw, gb] = Backend::norm_bwd(input, b);
    auto [grad_weight, grad_bias] = norm_param_grads(b, gw, gb, weight, normalized_shape);
    return {b.grad_x, grad_weight, grad_bias};
  }

  static std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_out,
                                                         const std::optional<at::Tensor>& grad_h,
                                                         const at::Tensor& input, const at::Tensor& rstd,
                                                         const std::optional<at::Tensor>& weight,
                                                         at::IntArrayRef normalized_shape) {
    NormBwd b = norm_bwd_args(true, grad_out, grad_h, input, at::Tensor(), rstd, weight, false, normalized_shape);
    const auto [gw, gb] = Backend::norm_bwd(input, b);
    return {b.grad_x, norm_param_grads(b, gw, gb, weight, normalized_shape).first};
  }

  static void register_ops(torch::Library& m) {
    m.impl("layer_norm_fwd", &layer_norm_fwd);
    m.impl("layer_norm_bwd", &layer_norm_bwd);
    m.impl("rms_norm_fwd", &rms_norm_fwd);
    m.impl("rms_norm_bwd", &rms_norm_bwd);
  }
};

}  // namespace fusedformer
