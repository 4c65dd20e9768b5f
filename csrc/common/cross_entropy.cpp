// Argument checks and kernel arguments of fusedformer.cross_entropy_rows.
#include <c10/util/Exception.h>

#include "common/cross_entropy.h"
#include "common/glue.h"

namespace fusedformer {
namespace {

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

}  // namespace

CrossEntropy prepare_cross_entropy(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& scale,
                                   int64_t ignore_index, bool compute_grad) {
  check_cross_entropy(logits, target, scale, ignore_index);
  CrossEntropy c;
  c.x = logits.contiguous();
  c.target = target.contiguous();
  const auto acc = compute_dtype(c.x);
  c.scale = scale.reshape({1}).to(acc);
  c.loss = at::empty({c.x.size(0)}, c.x.options().dtype(acc));
  c.grad = compute_grad ? at::empty_like(c.x) : at::empty({0}, c.x.options());
  CrossEntropyArgs& a = c.args;
  a = CrossEntropyArgs{};
  a.dtype = dtype_of(c.x);
  a.x = c.x.data_ptr();
  a.target = c.target.const_data_ptr<int64_t>();
  a.loss = c.loss.data_ptr();
  a.grad = compute_grad ? c.grad.data_ptr() : nullptr;
  a.scale = c.scale.data_ptr();
  a.rows = c.x.size(0);
  a.n = c.x.size(1);
  a.ignore_index = ignore_index;
  return c;
}

}  // namespace fusedformer
