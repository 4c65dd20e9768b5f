// gelu / gelu_bwd / gelu_ for the CPU dispatch key: gelu and gelu_bwd are common/gelu.h's, over the
// CPU kernels; gelu_ (in place) is the CPU's own.
#include <torch/library.h>

#include "common/gelu.h"
#include "common/glue.h"
#include "cpu/ops.h"
#include "fusedformer/cpu/kernels.h"

namespace fusedformer::cpu {
namespace {

struct Cpu {
  static void gelu(const GeluProblem& p, const at::Tensor& out, bool bwd) {
    GeluArgs a{};
    a.dtype = dtype_of(p.x);
    a.tanh = p.tanh;
    a.x = p.x.data_ptr();
    a.grad_y = bwd ? p.grad.data_ptr() : nullptr;
    a.out = out.data_ptr();
    a.n = p.x.numel();
    bwd ? kernels().gelu_bwd(a) : kernels().gelu_fwd(a);
  }
};

}  // namespace

// in place on a contiguous input (inference: the fresh output of a projection, which no one else reads)
void gelu_inplace(const at::Tensor& input, c10::string_view approximate) {
  const GeluProblem p = prepare_gelu(input, approximate);
  TORCH_CHECK_VALUE(input.is_contiguous(), "fusedformer.gelu_: input must be contiguous, got strides ",
                    input.strides());
  if (input.numel() > 0) Cpu::gelu(p, input, false);
}

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  GeluOps<Cpu>::register_ops(m);
  m.impl("gelu_", &gelu_inplace);
}

}  // namespace fusedformer::cpu
