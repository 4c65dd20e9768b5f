// linear for the CUDA dispatch key: cuBLAS through at::linear (the CPU key has its own kernel for
// few rows; on the GPU the library GEMM is the right tool), with the same argument checks.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/linear.h"

namespace fusedformer::cuda {
namespace {

at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear(input, weight, bias);
  return at::linear(input, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CUDA, m) { m.impl("linear", &linear); }

}  // namespace fusedformer::cuda
