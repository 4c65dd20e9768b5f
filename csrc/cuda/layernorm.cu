// layer_norm_* / rms_norm_* for the CUDA dispatch key: the ops are common/layernorm.h's, over the
// CUDA launchers below.
#include <torch/library.h>

#include "common/glue.h"
#include "common/layernorm.h"
#include "fusedformer/cuda/device.h"
#include "layernorm_kernels.cuh"

namespace fusedformer::cuda {
namespace {

constexpr int kFwdMaxVecs = 8;
constexpr int kBwdMaxVecs = 4;

template <typename T, bool RMS, bool RES>
void launch_norm_fwd(const NormFwdArgs& p, cudaStream_t stream) {
  const int vec = vec_width<T>(p.n, {p.x, p.residual, p.y, p.h_out});
  const RowPlan plan = plan_rows(p.rows, p.n, vec, kFwdMaxVecs);
  constexpr int V = 16 / int(sizeof(T));
  if (plan.team == 0) {
    norm_fwd_long_kernel<T, RMS, RES><<<p.rows, kLongRowThreads, 0, stream>>>(p);
  } else if (vec == 1) {
    norm_fwd_rows_kernel<T, RMS, RES, 1, kFwdMaxVecs><<<plan.grid, plan.block, 0, stream>>>(p, plan.team, plan.nv);
  } else {
    norm_fwd_rows_kernel<T, RMS, RES, V, kFwdMaxVecs><<<plan.grid, plan.block, 0, stream>>>(p, plan.team, plan.nv);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the backward and returns the number of partial rows written to grad_weight /
// grad_bias, which the caller has sized for max_parts rows.
template <typename T, bool RMS>
int64_t launch_norm_bwd(const NormBwdArgs& p, int64_t max_parts, cudaStream_t stream) {
  using C = compute_t<T>;
  const int vec = vec_width<T>(p.n, {p.x, p.grad_y, p.grad_h, p.grad_x});
  RowPlan plan = plan_rows(p.rows, p.n, vec, kBwdMaxVecs, kNormBwdMaxThreads);
  constexpr int V = 16 / int(sizeof(T));
  int64_t parts;
  if (plan.team == 0) {
    parts = std::min<int64_t>(p.rows, max_parts);
    norm_bwd_long_kernel<T, RMS><<<parts, kLongRowThreads, 0, stream>>>(p);
  } else {
    const int rpb = kNormBwdMaxThreads / plan.team;
    parts = std::min<int64_t>(ceil_div(p.rows, rpb), max_parts);
    const int nparams = (p.grad_weight ? 1 : 0) + (p.grad_bias ? 1 : 0);
    const size_t smem = rpb > 1 ? size_t(p.n) * sizeof(C) * nparams : 0;  // <= 32 KB (see plan_rows)
    const int block = plan.team * rpb;
    if (vec == 1) {
      norm_bwd_rows_kernel<T, RMS, 1, kBwdMaxVecs><<<parts, block, smem, stream>>>(p, plan.team, plan.nv);
    } else {
      norm_bwd_rows_kernel<T, RMS, V, kBwdMaxVecs><<<parts, block, smem, stream>>>(p, plan.team, plan.nv);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return parts;
}

struct Cuda {
  static void norm_fwd(const at::Tensor& input, const NormFwdArgs& p) {
    const c10::cuda::CUDAGuard guard(input.device());
    const cudaStream_t stream = current_stream();
    const bool res = p.residual != nullptr;
    dispatch_dtype(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      if (p.rms) {
        res ? launch_norm_fwd<T, true, true>(p, stream) : launch_norm_fwd<T, true, false>(p, stream);
      } else {
        res ? launch_norm_fwd<T, false, true>(p, stream) : launch_norm_fwd<T, false, false>(p, stream);
      }
    });
  }

  // The kernels write the weight and bias gradients as partial rows, one per block (at most
  // max_parts), which sum_partials_kernel adds in block order: deterministic.
  static std::pair<at::Tensor, at::Tensor> norm_bwd(const at::Tensor& input, NormBwd& b) {
    const c10::cuda::CUDAGuard guard(input.device());
    const int64_t n = b.p.n;
    const auto opts = b.p.x.options().dtype(compute_dtype(b.p.x));
    const int64_t max_parts = 2 * int64_t(sm_count());
    at::Tensor part_w = b.want_weight ? at::empty({max_parts, n}, opts) : at::Tensor();
    at::Tensor part_b = b.want_bias ? at::empty({max_parts, n}, opts) : at::Tensor();
    NormBwdArgs& p = b.args;
    p.grad_weight = data_or_null(part_w);
    p.grad_bias = data_or_null(part_b);
    const cudaStream_t stream = current_stream();
    at::Tensor gw, gb;
    dispatch_dtype(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      using C = compute_t<T>;
      const int64_t parts =
          p.rms ? launch_norm_bwd<T, true>(p, max_parts, stream) : launch_norm_bwd<T, false>(p, max_parts, stream);
      auto reduce = [&](const at::Tensor& part) {
        at::Tensor out = at::empty({n}, opts);
        const int threads = 256;
        sum_partials_kernel<C><<<ceil_div(n, threads), threads, 0, stream>>>(
            static_cast<const C*>(part.data_ptr()), static_cast<C*>(out.data_ptr()), parts, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return out;
      };
      if (part_w.defined()) gw = reduce(part_w);
      if (part_b.defined()) gb = reduce(part_b);
    });
    return {gw, gb};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CUDA, m) { NormOps<Cuda>::register_ops(m); }

}  // namespace fusedformer::cuda
