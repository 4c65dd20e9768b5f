// softmax_fwd / softmax_bwd for the CPU dispatch key: the ops are common/softmax.h's, over the CPU
// kernels, which take the softmax dim where it lies (rows when it is the last dim, the
// (outer, n, inner) layout otherwise: no transpose).
#include <torch/library.h>

#include "common/softmax.h"
#include "fusedformer/cpu/kernels.h"

namespace fusedformer::cpu {
namespace {

struct Cpu {
  static constexpr bool kMoveDim = false;
  static constexpr bool kUnitMaskCols = true;
  static void softmax_fwd(const at::Tensor&, const SoftmaxFwdArgs& a) { kernels().softmax_fwd(a); }
  static void softmax_bwd(const at::Tensor&, const SoftmaxBwdArgs& a) { kernels().softmax_bwd(a); }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) { SoftmaxOps<Cpu>::register_ops(m); }

}  // namespace fusedformer::cpu
