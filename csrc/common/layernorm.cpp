// Argument checks and kernel arguments of fusedformer.layer_norm and fusedformer.rms_norm.
#include <c10/util/Exception.h>

#include "common/glue.h"
#include "common/layernorm.h"

namespace fusedformer {

NormProblem prepare_norm(const char* op, const at::Tensor& input, at::IntArrayRef normalized_shape,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, double eps) {
  check_float_dtype(input, op, "input");
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK_VALUE(k >= 1, op, ": normalized_shape must name at least one dimension, got ", normalized_shape);
  TORCH_CHECK_VALUE(input.dim() >= k && input.sizes().slice(input.dim() - k) == normalized_shape, op,
                    ": normalized_shape ", normalized_shape, " must match the trailing dimensions of input, got ",
                    input.sizes());
  check_nonempty(input, op, "input");
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  NormProblem p;
  p.n = c10::multiply_integers(normalized_shape);
  p.rows = input.numel() / p.n;
  p.stat_shape.assign(input.sizes().begin(), input.sizes().end() - k);
  p.x = input.contiguous();
  auto param = [&](const std::optional<at::Tensor>& t, const char* name) -> at::Tensor {
    if (!t.has_value() || !t->defined()) return {};
    check_float_dtype(*t, op, name);
    check_same_device(input, "input", *t, name, op);
    TORCH_CHECK_VALUE(t->sizes() == normalized_shape, op, ": ", name, " must have shape ", normalized_shape,
                      " (normalized_shape), got ", t->sizes());
    return t->to(compute_dtype(input)).contiguous();
  };
  p.weight = param(weight, "weight");
  p.bias = param(bias, "bias");
  if (residual.has_value() && residual->defined()) {
    check_same_dtype(input, "input", *residual, "residual", op);
    check_same_device(input, "input", *residual, "residual", op);
    TORCH_CHECK_VALUE(residual->sizes() == input.sizes(), op, ": residual must have the input's shape ",
                      input.sizes(), ", got ", residual->sizes());
    p.residual = residual->contiguous();
  }
  return p;
}

NormFwd norm_fwd_args(bool rms, const at::Tensor& input, at::IntArrayRef normalized_shape,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                      const std::optional<at::Tensor>& residual) {
  NormFwd f;
  f.p = prepare_norm(rms ? "fusedformer.rms_norm" : "fusedformer.layer_norm", input, normalized_shape, weight, bias,
                     residual, eps);
  const NormProblem& p = f.p;
  f.y = at::empty(input.sizes(), p.x.options());
  f.h = p.residual.defined() ? at::empty(input.sizes(), p.x.options()) : at::empty({0}, p.x.options());
  const auto stat_opts = p.x.options().dtype(compute_dtype(p.x));
  if (!rms) f.mean = at::empty(p.stat_shape, stat_opts);
  f.rstd = at::empty(p.stat_shape, stat_opts);
  NormFwdArgs& a = f.args;
  a = NormFwdArgs{};
  a.dtype = dtype_of(p.x);
  a.rms = rms;
  a.x = p.x.data_ptr();
  a.residual = data_or_null(p.residual);
  a.y = f.y.data_ptr();
  a.h_out = p.residual.defined() ? f.h.data_ptr() : nullptr;
  a.weight = data_or_null(p.weight);
  a.bias = data_or_null(p.bias);
  a.mean = data_or_null(f.mean);
  a.rstd = f.rstd.data_ptr();
  a.rows = p.rows;
  a.n = p.n;
  a.eps = eps;
  return f;
}

NormBwd norm_bwd_args(bool rms, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h,
                      const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
                      const std::optional<at::Tensor>& weight, bool has_bias, at::IntArrayRef normalized_shape) {
  const char* op = rms ? "fusedformer.rms_norm backward" : "fusedformer.layer_norm backward";
  NormBwd b;
  b.p = prepare_norm(op, input, normalized_shape, weight, std::nullopt, std::nullopt, 0.0);
  check_same_dtype(input, "input", grad_out, "grad_out", op);
  check_same_device(input, "input", grad_out, "grad_out", op);
  TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes(), op, ": grad_out must have the input's shape ", input.sizes(),
                    ", got ", grad_out.sizes());
  b.grad_y = grad_out.contiguous();
  if (grad_h.has_value() && grad_h->defined() && grad_h->numel() > 0) {
    check_same_dtype(input, "input", *grad_h, "grad_residual_out", op);
    check_same_device(input, "input", *grad_h, "grad_residual_out", op);
    TORCH_CHECK_VALUE(grad_h->sizes() == input.sizes(), op, ": grad_residual_out must have the input's shape ",
                      input.sizes(), ", got ", grad_h->sizes());
    b.grad_h = grad_h->contiguous();
  }
  const auto ct = compute_dtype(b.p.x);
  TORCH_CHECK_VALUE(rstd.numel() == b.p.rows && rstd.scalar_type() == ct, op, ": rstd must be ", ct,
                    " with one entry per row (", b.p.rows, "), got ", rstd.scalar_type(), " ", rstd.sizes());
  check_same_device(input, "input", rstd, "rstd", op);
  b.rstd = rstd.contiguous();
  if (!rms) {
    TORCH_CHECK_VALUE(mean.numel() == b.p.rows && mean.scalar_type() == ct, op, ": mean must be ", ct,
                      " with one entry per row (", b.p.rows, "), got ", mean.scalar_type(), " ", mean.sizes());
    check_same_device(input, "input", mean, "mean", op);
    b.mean = mean.contiguous();
  }
  b.grad_x = at::empty(input.sizes(), b.p.x.options());
  b.want_weight = b.p.weight.defined();
  b.want_bias = has_bias;
  NormBwdArgs& a = b.args;
  a = NormBwdArgs{};
  a.dtype = dtype_of(b.p.x);
  a.rms = rms;
  a.grad_y = b.grad_y.data_ptr();
  a.grad_h = data_or_null(b.grad_h);
  a.x = b.p.x.data_ptr();
  a.mean = data_or_null(b.mean);
  a.rstd = b.rstd.data_ptr();
  a.weight = data_or_null(b.p.weight);
  a.grad_x = b.grad_x.data_ptr();
  a.rows = b.p.rows;
  a.n = b.p.n;
  return b;
}

std::pair<at::Tensor, at::Tensor> norm_param_grads(const NormBwd& b, const at::Tensor& gw, const at::Tensor& gb,
                                                   const std::optional<at::Tensor>& weight,
                                                   at::IntArrayRef normalized_shape) {
  const auto opts = b.p.x.options();
  at::Tensor w = gw.defined() ? gw.to(weight->scalar_type()).view(weight->sizes()) : at::empty({0}, opts);
  at::Tensor bias = gb.defined() ? gb.to(opts.dtype()).view(normalized_shape) : at::empty({0}, opts);
  return {w, bias};
}

}  // namespace fusedformer
