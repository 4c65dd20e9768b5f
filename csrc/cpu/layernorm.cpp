// layer_norm_* / rms_norm_* for the CPU dispatch key.
#include <torch/library.h>

#include "fusedformer/common.h"
#include "fusedformer/cpu/glue.h"

namespace fusedformer::cpu {
namespace {

struct NormOut {
  at::Tensor y, h, mean, rstd;
};

NormOut norm_fwd(bool rms, const at::Tensor& input, at::IntArrayRef normalized_shape,
                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                 const std::optional<at::Tensor>& residual) {
  NormProblem p = prepare_norm(rms ? "fusedformer.rms_norm" : "fusedformer.layer_norm", input, normalized_shape,
                               weight, bias, residual, eps);
  NormOut o;
  o.y = at::empty(input.sizes(), p.x.options());
  o.h = p.residual.defined() ? at::empty(input.sizes(), p.x.options()) : at::empty({0}, p.x.options());
  auto stat_opts = p.x.options().dtype(compute_dtype(p.x));
  o.mean = rms ? at::Tensor() : at::empty(p.stat_shape, stat_opts);
  o.rstd = at::empty(p.stat_shape, stat_opts);
  NormFwdArgs a{};
  a.dtype = dtype_of(p.x);
  a.rms = rms;
  a.x = p.x.data_ptr();
  a.residual = p.residual.defined() ? p.residual.data_ptr() : nullptr;
  a.y = o.y.data_ptr();
  a.h_out = p.residual.defined() ? o.h.data_ptr() : nullptr;
  a.weight = p.weight.defined() ? p.weight.data_ptr() : nullptr;
  a.bias = p.bias.defined() ? p.bias.data_ptr() : nullptr;
  a.mean = rms ? nullptr : o.mean.data_ptr();
  a.rstd = o.rstd.data_ptr();
  a.rows = p.rows;
  a.n = p.n;
  a.eps = eps;
  kernels().norm_fwd(a);
  return o;
}

struct NormGrads {
  at::Tensor gx, gw, gb;
};

NormGrads norm_bwd(bool rms, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h,
                   const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
                   const std::optional<at::Tensor>& weight, bool has_bias, at::IntArrayRef normalized_shape) {
  const char* op = rms ? "fusedformer.rms_norm backward" : "fusedformer.layer_norm backward";
  NormProblem p = prepare_norm(op, input, normalized_shape, weight, std::nullopt, std::nullopt, 0.0);
  check_same_dtype(input, "input", grad_out, "grad_out", op);
  TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes(), op, ": grad_out must have the input's shape ", input.sizes(),
                    ", got ", grad_out.sizes());
  at::Tensor gy = grad_out.contiguous();
  at::Tensor gh;
  if (grad_h.has_value() && grad_h->defined() && grad_h->numel() > 0) {
    check_same_dtype(input, "input", *grad_h, "grad_residual_out", op);
    TORCH_CHECK_VALUE(grad_h->sizes() == input.sizes(), op, ": grad_residual_out must have the input's shape ",
                      input.sizes(), ", got ", grad_h->sizes());
    gh = grad_h->contiguous();
  }
  const auto ct = compute_dtype(p.x);
  TORCH_CHECK_VALUE(rstd.numel() == p.rows && rstd.scalar_type() == ct, op, ": rstd must be ", ct,
                    " with one entry per row (", p.rows, "), got ", rstd.scalar_type(), " ", rstd.sizes());
  at::Tensor rs = rstd.contiguous();
  at::Tensor mu;
  if (!rms) {
    TORCH_CHECK_VALUE(mean.numel() == p.rows && mean.scalar_type() == ct, op, ": mean must be ", ct,
                      " with one entry per row (", p.rows, "), got ", mean.scalar_type(), " ", mean.sizes());
    mu = mean.contiguous();
  }
  NormGrads g;
  g.gx = at::empty(input.sizes(), p.x.options());
  auto fopts = p.x.options().dtype(ct);
  at::Tensor gw = p.weight.defined() ? at::empty({p.n}, fopts) : at::Tensor();
  at::Tensor gb = has_bias ? at::empty({p.n}, fopts) : at::Tensor();
  NormBwdArgs a{};
  a.dtype = dtype_of(p.x);
  a.rms = rms;
  a.grad_y = gy.data_ptr();
  a.grad_h = gh.defined() ? gh.data_ptr() : nullptr;
  a.x = p.x.data_ptr();
  a.mean = rms ? nullptr : mu.data_ptr();
  a.rstd = rs.data_ptr();
  a.weight = p.weight.defined() ? p.weight.data_ptr() : nullptr;
  a.grad_x = g.gx.data_ptr();
  a.grad_weight = gw.defined() ? gw.data_ptr() : nullptr;
  a.grad_bias = gb.defined() ? gb.data_ptr() : nullptr;
  a.rows = p.rows;
  a.n = p.n;
  kernels().norm_bwd(a);
  // absent gradients are distinct empty tensors (outputs of an op must not alias each other)
  g.gw = gw.defined() ? param_grad(gw, weight) : at::empty({0}, p.x.options());
  g.gb = gb.defined() ? gb.to(input.scalar_type()).view(normalized_shape) : at::empty({0}, p.x.options());
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& input, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& residual) {
  NormOut o = norm_fwd(false, input, normalized_shape, weight, bias, eps, residual);
  return {o.y, o.h, o.mean, o.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool has_bias,
    at::IntArrayRef normalized_shape) {
  NormGrads g = norm_bwd(false, grad_out, grad_h, input, mean, rstd, weight, has_bias, normalized_shape);
  return {g.gx, g.gw, g.gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& input,
                                                            at::IntArrayRef normalized_shape,
                                                            const std::optional<at::Tensor>& weight, double eps,
                                                            const std::optional<at::Tensor>& residual) {
  NormOut o = norm_fwd(true, input, normalized_shape, weight, std::nullopt, eps, residual);
  return {o.y, o.h, o.rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h,
                                                const at::Tensor& input, const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& weight,
                                                at::IntArrayRef normalized_shape) {
  NormGrads g = norm_bwd(true, grad_out, grad_h, input, at::Tensor(), rstd, weight, false, normalized_shape);
  return {g.gx, g.gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

}  // namespace fusedformer::cpu
