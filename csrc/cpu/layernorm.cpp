// layer_norm_* / rms_norm_* for the CPU dispatch key: the ops are common/layernorm.h's, over the
// CPU kernels below.
#include <torch/library.h>

#include "common/glue.h"
#include "common/layernorm.h"
#include "fusedformer/cpu/kernels.h"

namespace fusedformer::cpu {
namespace {

struct Cpu {
  static void norm_fwd(const at::Tensor&, const NormFwdArgs& a) { kernels().norm_fwd(a); }

  // the kernel sums the weight and bias gradients itself, into (n) buffers
  static std::pair<at::Tensor, at::Tensor> norm_bwd(const at::Tensor&, NormBwd& b) {
    const auto opts = b.p.x.options().dtype(compute_dtype(b.p.x));
    at::Tensor gw = b.want_weight ? at::empty({b.p.n}, opts) : at::Tensor();
    at::Tensor gb = b.want_bias ? at::empty({b.p.n}, opts) : at::Tensor();
    b.args.grad_weight = data_or_null(gw);
    b.args.grad_bias = data_or_null(gb);
    kernels().norm_bwd(b.args);
    return {gw, gb};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) { NormOps<Cpu>::register_ops(m); }

}  // namespace fusedformer::cpu
