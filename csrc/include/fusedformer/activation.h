// Argument checking of the activation ops, shared by the CPU and CUDA implementations (the
// activation counterpart of common.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

namespace fusedformer {

struct GeluProblem {
  at::Tensor x;     // contiguous input
  at::Tensor grad;  // contiguous, input's shape and dtype (backward only)
  bool tanh;        // approximate == "tanh"
};
// input floating (float32, bfloat16, float16, float64), any shape, empty included; approximate
// "none" or "tanh", anything else a ValueError naming it.
GeluProblem prepare_gelu(const at::Tensor& input, c10::string_view approximate);
// ... and grad of the input's shape, dtype and device.
GeluProblem prepare_gelu_bwd(const at::Tensor& grad, const at::Tensor& input, c10::string_view approximate);

}  // namespace fusedformer
