// softmax_fwd / softmax_bwd for the CUDA dispatch key: the ops are common/softmax.h's, over the CUDA
// launchers below. The kernels take rows: a softmax dim that is not the last is moved last (and
// back) by the shared glue.
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "common/softmax.h"
#include "fusedformer/cuda/device.h"
#include "softmax_kernels.cuh"

namespace fusedformer::cuda {
namespace {

constexpr int kFwdMaxVecs = 8;  // vectors per thread the register-resident kernels hold
constexpr int kBwdMaxVecs = 4;

template <typename T, MaskKind MK>
void launch_softmax_fwd(const SoftmaxFwdArgs& p, cudaStream_t stream) {
  const int vec = vec_width<T>(p.n, {p.x, p.y});
  const RowPlan plan = plan_rows(p.rows, p.n, vec, kFwdMaxVecs);
  if (plan.team == 0) {
    softmax_fwd_long_kernel<T, MK><<<p.rows, kLongRowThreads, 0, stream>>>(p);
  } else if (vec == 1) {
    softmax_fwd_rows_kernel<T, MK, 1, kFwdMaxVecs><<<plan.grid, plan.block, 0, stream>>>(p, plan.team, plan.nv);
  } else {
    constexpr int V = 16 / int(sizeof(T));
    softmax_fwd_rows_kernel<T, MK, V, kFwdMaxVecs><<<plan.grid, plan.block, 0, stream>>>(p, plan.team, plan.nv);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_softmax_bwd(const SoftmaxBwdArgs& p, cudaStream_t stream) {
  const int vec = vec_width<T>(p.n, {p.grad_y, p.y, p.grad_x});
  const RowPlan plan = plan_rows(p.rows, p.n, vec, kBwdMaxVecs);
  if (plan.team == 0) {
    softmax_bwd_long_kernel<T><<<p.rows, kLongRowThreads, 0, stream>>>(p);
  } else if (vec == 1) {
    softmax_bwd_rows_kernel<T, 1, kBwdMaxVecs><<<plan.grid, plan.block, 0, stream>>>(p, plan.team, plan.nv);
  } else {
    constexpr int V = 16 / int(sizeof(T));
    softmax_bwd_rows_kernel<T, V, kBwdMaxVecs><<<plan.grid, plan.block, 0, stream>>>(p, plan.team, plan.nv);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct Cuda {
  static constexpr bool kMoveDim = true;
  static constexpr bool kUnitMaskCols = false;

  static void softmax_fwd(const at::Tensor& x, const SoftmaxFwdArgs& a) {
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = current_stream();
    dispatch_dtype(a.dtype, [&](auto tag) {
      using T = decltype(tag);
      dispatch_mask(a.mask_kind, [&](auto k) { launch_softmax_fwd<T, decltype(k)::value>(a, stream); });
    });
  }

  static void softmax_bwd(const at::Tensor& y, const SoftmaxBwdArgs& a) {
    const c10::cuda::CUDAGuard guard(y.device());
    const cudaStream_t stream = current_stream();
    dispatch_dtype(a.dtype, [&](auto tag) { launch_softmax_bwd<decltype(tag)>(a, stream); });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CUDA, m) { SoftmaxOps<Cuda>::register_ops(m); }

}  // namespace fusedformer::cuda
