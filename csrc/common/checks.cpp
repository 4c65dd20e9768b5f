// Argument checks shared by the CPU and CUDA ops: general helpers, softmax and the norms.
#include <c10/util/Exception.h>

#include "fusedformer/common.h"

namespace fusedformer {

void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, op, ": ", name,
                   " must be float32, bfloat16, float16 or float64, got ", st);
}

void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                      const char* op) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", b_name, " must have the dtype of ", a_name,
                   " (", a.scalar_type(), "), got ", b.scalar_type());
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", b_name, " must be on the device of ", a_name, " (",
              a.device(), "), got ", b.device());
}

void check_nonempty(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.numel() > 0, op, ": ", name, " must not be empty, got shape ", t.sizes());
}

at::Tensor broadcast_mask(const at::Tensor& mask, at::IntArrayRef target, const char* op, const char* name,
                          at::ScalarType compute) {
  auto st = mask.scalar_type();
  TORCH_CHECK_TYPE(st == at::kBool || at::isFloatingType(st), op, ": ", name,
                   " must be a bool tensor (True = keep) or a floating additive mask, got ", st);
  bool ok = mask.dim() <= static_cast<int64_t>(target.size());
  for (int64_t i = 1; ok && i <= mask.dim(); ++i) {
    int64_t ms = mask.size(-i), ts = target[target.size() - i];
    ok = ms == ts || ms == 1;
  }
  TORCH_CHECK_VALUE(ok, op, ": ", name, " of shape ", mask.sizes(), " does not broadcast to ", target);
  // convert before expanding, so a broadcast mask is never materialized
  at::Tensor m = (st == at::kBool || st == compute) ? mask : mask.to(compute);
  return m.expand(target);
}

void check_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "fusedformer.linear";
  check_float_dtype(input, op, "input");
  check_same_dtype(input, "input", weight, "weight", op);
  check_same_device(input, "input", weight, "weight", op);
  TORCH_CHECK_VALUE(input.dim() >= 1, op, ": input must have at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(input.size(-1) == weight.size(1), op, ": the last dim of input (", input.size(-1),
                    ") must equal in_features, weight.shape[1] (", weight.size(1), "); input ", input.sizes(),
                    ", weight ", weight.sizes());
  if (bias.has_value() && bias->defined()) {
    check_same_dtype(input, "input", *bias, "bias", op);
    check_same_device(input, "input", *bias, "bias", op);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                      ": bias must have shape (out_features,) = (", weight.size(0), ",), got ", bias->sizes());
  }
}

void check_cross_entropy(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& scale,
                         int64_t ignore_index) {
  const char* op = "fusedformer.cross_entropy_rows";
  check_float_dtype(logits, op, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1, op,
                    ": logits must be 2-D (rows, classes) with at least one class, got shape ", logits.sizes());
  check_same_device(logits, "logits", target, "target", op);
  check_same_device(logits, "logits", scale, "scale", op);
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong, op, ": target must be int64 class indices, got ",
                    target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0), op, ": target must have shape (",
                    logits.size(0), ",) (one class per row of logits), got ", target.sizes());
  TORCH_CHECK_VALUE(scale.numel() == 1 && scale.is_floating_point(), op,
                    ": scale must be a one-element floating-point tensor, got ", scale.scalar_type(), " of shape ",
                    scale.sizes());
  if (target.numel() == 0) return;
  const at::Tensor bad = ((target < 0) | (target >= logits.size(1))) & (target != ignore_index);
  if (bad.any().item<bool>()) {
    const int64_t v = target.masked_select(bad)[0].item<int64_t>();
    TORCH_CHECK_INDEX(false, op, ": target ", v, " is out of range for ", logits.size(1), " classes (ignore_index ",
                      ignore_index, ")");
  }
}

SoftmaxProblem prepare_softmax(const at::Tensor& x, int64_t dim, const std::optional<at::Tensor>& mask,
                               bool is_causal, bool move_dim) {
  const char* op = "fusedformer.softmax";
  check_float_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  check_nonempty(x, op, "x");
  TORCH_CHECK_INDEX(dim >= -x.dim() && dim < x.dim(), op, ": dim must be in [", -x.dim(), ", ", x.dim() - 1,
                    "] for an x of ", x.dim(), " dimensions, got ", dim);
  SoftmaxProblem p;
  p.dim = dim < 0 ? dim + x.dim() : dim;
  p.moved = move_dim && p.dim != x.dim() - 1;
  TORCH_CHECK_VALUE(!is_causal || x.dim() >= 2, op, ": is_causal needs an x of at least 2 dimensions, got ",
                    x.dim());
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    check_same_device(x, "x", *mask, "mask", op);
    m = broadcast_mask(*mask, x.sizes(), op, "mask", compute_dtype(x));
  }
  const bool causal_native = p.dim == x.dim() - 1 || (!move_dim && p.dim == x.dim() - 2);
  if (is_causal && !causal_native) {
    // causal masking refers to the caller's last two dims; with another softmax dim it is applied
    // as an explicit (broadcast) mask.
    int64_t L = x.size(-2), S = x.size(-1);
    auto keep = at::ones({L, S}, x.options().dtype(at::kBool)).tril();
    if (!m.defined()) {
      m = keep.expand(x.sizes());
    } else if (m.scalar_type() == at::kBool) {
      m = m.logical_and(keep);
    } else {
      m = m.masked_fill(keep.logical_not(), -std::numeric_limits<float>::infinity());
    }
    p.causal = false;
  } else {
    p.causal = is_causal;
  }
  if (p.moved) {
    p.x = x.movedim(p.dim, -1).contiguous();
    if (m.defined()) m = m.movedim(p.dim, -1);
  } else {
    p.x = x.contiguous();
  }
  p.mask = m;
  return p;
}

void check_softmax_bwd(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim) {
  const char* op = "fusedformer.softmax backward";
  check_float_dtype(y, op, "output");
  check_same_dtype(y, "output", grad_y, "grad_output", op);
  check_same_device(y, "output", grad_y, "grad_output", op);
  TORCH_CHECK_VALUE(grad_y.sizes() == y.sizes(), op, ": grad_output must have the output's shape ", y.sizes(),
                    ", got ", grad_y.sizes());
  TORCH_CHECK_INDEX(dim >= -y.dim() && dim < y.dim(), op, ": dim ", dim, " out of range for ", y.dim(),
                    " dimensions");
}

MaskRowDims coalesce_mask_rows(at::Tensor& mask, int max_dims) {
  MaskRowDims d;
  for (int64_t i = 0; i < mask.dim() - 1; ++i) {
    int64_t s = mask.size(i), st = mask.stride(i);
    if (s == 1) continue;
    if (!d.sizes.empty() && d.strides.back() == st * s) {
      d.sizes.back() *= s;
      d.strides.back() = st;
    } else {
      d.sizes.push_back(s);
      d.strides.push_back(st);
    }
  }
  if (static_cast<int>(d.sizes.size()) > max_dims) {
    mask = mask.contiguous();
    d.sizes = {mask.numel() / mask.size(-1)};
    d.strides = {mask.size(-1)};
  }
  return d;
}

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

NormBwdProblem prepare_norm_bwd(const char* op, bool rms, const at::Tensor& grad_out,
                                const std::optional<at::Tensor>& grad_h, const at::Tensor& input,
                                const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                                at::IntArrayRef normalized_shape) {
  NormBwdProblem b;
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
  return b;
}

at::Tensor param_grad(const at::Tensor& g, const std::optional<at::Tensor>& param) {
  if (!param.has_value() || !param->defined()) return g;
  return g.to(param->scalar_type()).view(param->sizes());
}

}  // namespace fusedformer
