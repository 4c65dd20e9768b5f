// Argument checks of fusedformer.gelu.
#include <c10/util/Exception.h>

#include "common/gelu.h"
#include "common/glue.h"

namespace fusedformer {
namespace {

bool is_tanh(const char* op, c10::string_view approximate) {
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh", op,
                    ": approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

}  // namespace

GeluProblem prepare_gelu(const at::Tensor& input, c10::string_view approximate) {
  const char* op = "fusedformer.gelu";
  GeluProblem p;
  p.tanh = is_tanh(op, approximate);
  check_float_dtype(input, op, "input");
  p.x = input.contiguous();
  return p;
}

GeluProblem prepare_gelu_bwd(const at::Tensor& grad, const at::Tensor& input, c10::string_view approximate) {
  const char* op = "fusedformer.gelu backward";
  GeluProblem p;
  p.tanh = is_tanh(op, approximate);
  check_float_dtype(input, op, "input");
  check_same_dtype(input, "input", grad, "grad", op);
  check_same_device(input, "input", grad, "grad", op);
  TORCH_CHECK_VALUE(grad.sizes() == input.sizes(), op, ": grad must have the input's shape ", input.sizes(),
                    ", got ", grad.sizes());
  p.x = input.contiguous();
  p.grad = grad.contiguous();
  return p;
}

}  // namespace fusedformer
