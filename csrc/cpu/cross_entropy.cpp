// cross_entropy_rows for the CPU dispatch key: the op is common/cross_entropy.h's, over the CPU kernel.
#include <torch/library.h>

#include "common/cross_entropy.h"
#include "fusedformer/cpu/kernels.h"

namespace fusedformer::cpu {
namespace {

struct Cpu {
  static void cross_entropy(const at::Tensor&, const CrossEntropyArgs& a) { kernels().cross_entropy(a); }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) { CrossEntropyOps<Cpu>::register_ops(m); }

}  // namespace fusedformer::cpu
