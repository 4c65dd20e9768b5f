// gelu / gelu_bwd for the CPU dispatch key.
#include <torch/library.h>

#include "fusedformer/activation.h"
#include "fusedformer/cpu/glue.h"

namespace fusedformer::cpu {
namespace {

at::Tensor run(const GeluProblem& p, bool bwd) {
  at::Tensor out = at::empty(p.x.sizes(), p.x.options());
  if (p.x.numel() == 0) return out;
  GeluArgs a{};
  a.dtype = dtype_of(p.x);
  a.tanh = p.tanh;
  a.x = p.x.data_ptr();
  a.grad_y = bwd ? p.grad.data_ptr() : nullptr;
  a.out = out.data_ptr();
  a.n = p.x.numel();
  bwd ? kernels().gelu_bwd(a) : kernels().gelu_fwd(a);
  return out;
}

at::Tensor gelu(const at::Tensor& input, c10::string_view approximate) {
  return run(prepare_gelu(input, approximate), false);
}

// in place on a contiguous input (inference: the fresh output of a projection, which no one else reads)
void gelu_inplace(const at::Tensor& input, c10::string_view approximate) {
  GeluProblem p = prepare_gelu(input, approximate);
  TORCH_CHECK_VALUE(input.is_contiguous(), "fusedformer.gelu_: input must be contiguous, got strides ",
                    input.strides());
  if (input.numel() == 0) return;
  GeluArgs a{};
  a.dtype = dtype_of(input);
  a.tanh = p.tanh;
  a.x = input.data_ptr();
  a.out = input.data_ptr();
  a.n = input.numel();
  kernels().gelu_fwd(a);
}

at::Tensor gelu_bwd(const at::Tensor& grad, const at::Tensor& input, c10::string_view approximate) {
  return run(prepare_gelu_bwd(grad, input, approximate), true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("gelu", &gelu);
  m.impl("gelu_", &gelu_inplace);
  m.impl("gelu_bwd", &gelu_bwd);
}

}  // namespace fusedformer::cpu
