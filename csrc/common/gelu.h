// Argument checks of fusedformer.gelu, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

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

// gelu / gelu_bwd over a backend's launcher, which writes gelu(p.x) (or, with bwd,
// p.grad * gelu'(p.x)) to `out`, of p.x's shape and dtype and not empty:
//   static void Backend::gelu(const GeluProblem& p, const at::Tensor& out, bool bwd);
template <typename Backend>
struct GeluOps {
  static at::Tensor gelu(const at::Tensor& input, c10::string_view approximate) {
    return run(prepare_gelu(input, approximate), false);
  }

  static at::Tensor gelu_bwd(const at::Tensor& grad, const at::Tensor& input, c10::string_view approximate) {
    return run(prepare_gelu_bwd(grad, input, approximate), true);
  }

  static void register_ops(torch::Library& m) {
    m.impl("gelu", &gelu);
    m.impl("gelu_bwd", &gelu_bwd);
  }

 private:
  static at::Tensor run(const GeluProblem& p, bool bwd) {
    at::Tensor out = at::empty(p.x.sizes(), p.x.options());
    if (p.x.numel() > 0) Backend::gelu(p, out, bwd);
    return out;
  }
};

}  // namespace fusedformer
