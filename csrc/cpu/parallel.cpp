// Threading for the CPU kernels through ATen's intra-op thread pool, so torch.set_num_threads applies.
#include <ATen/Parallel.h>

#include "fusedformer/cpu/kernels.h"

namespace fusedformer::cpu {

void parallel_for(int64_t begin, int64_t end, int64_t grain, void (*f)(void*, int64_t, int64_t), void* ctx) {
  if (begin >= end) return;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { f(ctx, b, e); });
}

int num_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

}  // namespace fusedformer::cpu
