// Argument checks of fusedformer.linear.
#include <c10/util/Exception.h>

#include "common/glue.h"
#include "common/linear.h"

namespace fusedformer {

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

}  // namespace fusedformer
