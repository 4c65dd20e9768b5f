// softmax_fwd / softmax_bwd and cross_entropy_rows for the CUDA dispatch key.
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "fusedformer/common.h"
#include "fusedformer/cuda/glue.h"
#include "softmax_kernels.cuh"

namespace fusedformer::cuda {
namespace {

constexpr int kFwdMaxVecs = 8;  // vectors per thread the register-resident kernels hold
constexpr int kBwdMaxVecs = 4;
constexpr int kLongBlock = 1024;

template <typename T, MaskKind MK>
void launch_softmax_fwd(const SoftmaxFwdParams& p, cudaStream_t stream) {
  const int vec = vec_width<T>(p.n, {p.x, p.y});
  const RowPlan plan = plan_rows(p.rows, p.n, vec, kFwdMaxVecs);
  if (plan.team == 0) {
    softmax_fwd_long_kernel<T, MK><<<p.rows, kLongBlock, 0, stream>>>(p);
  } else if (vec == 1) {
    softmax_fwd_rows_kernel<T, MK, 1, kFwdMaxVecs><<<plan.grid, plan.block, 0, stream>>>(p, plan.team, plan.nv);
  } else {
    constexpr int V = 16 / int(sizeof(T));
    softmax_fwd_rows_kernel<T, MK, V, kFwdMaxVecs><<<plan.grid, plan.block, 0, stream>>>(p, plan.team, plan.nv);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_softmax_bwd(const SoftmaxBwdParams& p, cudaStream_t stream) {
  const int vec = vec_width<T>(p.n, {p.grad_y, p.y, p.grad_x});
  const RowPlan plan = plan_rows(p.rows, p.n, vec, kBwdMaxVecs);
  if (plan.team == 0) {
    softmax_bwd_long_kernel<T><<<p.rows, kLongBlock, 0, stream>>>(p);
  } else if (vec == 1) {
    softmax_bwd_rows_kernel<T, 1, kBwdMaxVecs><<<plan.grid, plan.block, 0, stream>>>(p, plan.team, plan.nv);
  } else {
    constexpr int V = 16 / int(sizeof(T));
    softmax_bwd_rows_kernel<T, V, kBwdMaxVecs><<<plan.grid, plan.block, 0, stream>>>(p, plan.team, plan.nv);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor softmax_fwd(const at::Tensor& x, int64_t dim, double scale, const std::optional<at::Tensor>& mask,
                       bool is_causal) {
  const c10::cuda::CUDAGuard guard(x.device());
  SoftmaxProblem pr = prepare_softmax(x, dim, mask, is_causal);
  at::Tensor y = at::empty_like(pr.x);
  SoftmaxFwdParams p{};
  p.x = pr.x.data_ptr();
  p.y = y.data_ptr();
  p.n = pr.x.size(-1);
  p.rows = pr.x.numel() / p.n;
  p.scale = scale;
  const MaskKind mk = mask_kind_of(pr.mask);
  if (pr.mask.defined()) {
    MaskRowDims d = coalesce_mask_rows(pr.mask, kMaxMaskRowDims);
    p.mask_rows.ndim = static_cast<int>(d.sizes.size());
    for (size_t i = 0; i < d.sizes.size(); ++i) {
      p.mask_rows.sizes[i] = d.sizes[i];
      p.mask_rows.strides[i] = d.strides[i];
    }
    p.mask = pr.mask.data_ptr();
    p.mask_col_stride = pr.mask.stride(-1);
  }
  p.causal = pr.causal;
  p.causal_rows = pr.x.dim() >= 2 ? pr.x.size(-2) : 1;
  const cudaStream_t stream = current_stream();
  dispatch_dtype(dtype_of(pr.x), [&](auto tag) {
    using T = decltype(tag);
    dispatch_mask(mk, [&](auto k) { launch_softmax_fwd<T, decltype(k)::value>(p, stream); });
  });
  return pr.moved ? y.movedim(-1, pr.dim).contiguous() : y;
}

at::Tensor softmax_bwd(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim, double scale) {
  const c10::cuda::CUDAGuard guard(y.device());
  check_softmax_bwd(grad_y, y, dim);
  const int64_t d = dim < 0 ? dim + y.dim() : dim;
  const bool moved = d != y.dim() - 1;
  at::Tensor yc = moved ? y.movedim(d, -1).contiguous() : y.contiguous();
  at::Tensor gc = moved ? grad_y.movedim(d, -1).contiguous() : grad_y.contiguous();
  at::Tensor gx = at::empty_like(yc);
  SoftmaxBwdParams p{};
  p.grad_y = gc.data_ptr();
  p.y = yc.data_ptr();
  p.grad_x = gx.data_ptr();
  p.n = yc.size(-1);
  p.rows = yc.numel() / p.n;
  p.scale = scale;
  const cudaStream_t stream = current_stream();
  dispatch_dtype(dtype_of(yc), [&](auto tag) { launch_softmax_bwd<decltype(tag)>(p, stream); });
  return moved ? gx.movedim(-1, d).contiguous() : gx;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target,
                                                      const at::Tensor& scale, int64_t ignore_index,
                                                      bool compute_grad) {
  const c10::cuda::CUDAGuard guard(logits.device());
  check_cross_entropy(logits, target, scale, ignore_index);
  at::Tensor x = logits.contiguous();
  at::Tensor t = target.contiguous();
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sc = scale.reshape({1}).to(acc);
  at::Tensor loss = at::empty({x.size(0)}, x.options().dtype(acc));
  at::Tensor grad = compute_grad ? at::empty_like(x) : at::empty({0}, x.options());
  if (x.size(0) == 0) return {loss, grad};
  CrossEntropyParams p{};
  p.x = x.data_ptr();
  p.target = t.const_data_ptr<int64_t>();
  p.loss = loss.data_ptr();
  p.grad = compute_grad ? grad.data_ptr() : nullptr;
  p.scale = sc.data_ptr();
  p.rows = x.size(0);
  p.n = x.size(1);
  p.ignore_index = ignore_index;
  const int block = static_cast<int>(std::min<int64_t>(kLongBlock, (p.n + 31) / 32 * 32));
  const cudaStream_t stream = current_stream();
  dispatch_dtype(dtype_of(x), [&](auto tag) {
    cross_entropy_rows_kernel<decltype(tag)><<<p.rows, block, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CUDA, m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
  m.impl("cross_entropy_rows", &cross_entropy_rows);
}

}  // namespace fusedformer::cuda
