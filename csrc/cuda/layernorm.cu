// layer_norm_* / rms_norm_* for the CUDA dispatch key.
#include <torch/library.h>

#include "fusedformer/common.h"
#include "fusedformer/cuda/glue.h"
#include "layernorm_kernels.cuh"

namespace fusedformer::cuda {
namespace {

constexpr int kFwdMaxVecs = 8;
constexpr int kBwdMaxVecs = 4;
constexpr int kLongBlock = 1024;
constexpr int kBwdBlock = 512;

template <typename T, bool RMS, bool RES>
void launch_norm_fwd(const NormFwdParams& p, cudaStream_t stream) {
  const int vec = vec_width<T>(p.n, {p.x, p.residual, p.y, p.h_out});
  const RowPlan plan = plan_rows(p.rows, p.n, vec, kFwdMaxVecs);
  constexpr int V = 16 / int(sizeof(T));
  if (plan.team == 0) {
    norm_fwd_long_kernel<T, RMS, RES><<<p.rows, kLongBlock, 0, stream>>>(p);
  } else if (vec == 1) {
    norm_fwd_rows_kernel<T, RMS, RES, 1, kFwdMaxVecs><<<plan.grid, plan.block, 0, stream>>>(p, plan.team, plan.nv);
  } else {
    norm_fwd_rows_kernel<T, RMS, RES, V, kFwdMaxVecs><<<plan.grid, plan.block, 0, stream>>>(p, plan.team, plan.nv);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the backward and returns the number of partial rows written to part_w / part_b, which
// the caller has sized for max_parts rows.
template <typename T, bool RMS>
int64_t launch_norm_bwd(const NormBwdParams& p, int64_t max_parts, cudaStream_t stream) {
  using C = compute_t<T>;
  const int vec = vec_width<T>(p.n, {p.x, p.grad_y, p.grad_h, p.grad_x});
  RowPlan plan = plan_rows(p.rows, p.n, vec, kBwdMaxVecs);
  constexpr int V = 16 / int(sizeof(T));
  int64_t parts;
  if (plan.team == 0) {
    parts = std::min<int64_t>(p.rows, max_parts);
    norm_bwd_long_kernel<T, RMS><<<parts, kLongBlock, 0, stream>>>(p);
  } else {
    const int rpb = plan.team <= 128 ? kBwdBlock / plan.team : 1;
    parts = std::min<int64_t>(ceil_div(p.rows, rpb), max_parts);
    const int nparams = (p.part_w ? 1 : 0) + (p.part_b ? 1 : 0);
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

struct NormOut {
  at::Tensor y, h, mean, rstd;
};

NormOut norm_fwd(bool rms, const at::Tensor& input, at::IntArrayRef normalized_shape,
                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                 const std::optional<at::Tensor>& residual) {
  const c10::cuda::CUDAGuard guard(input.device());
  NormProblem pr = prepare_norm(rms ? "fusedformer.rms_norm" : "fusedformer.layer_norm", input, normalized_shape,
                                weight, bias, residual, eps);
  NormOut o;
  o.y = at::empty(input.sizes(), pr.x.options());
  o.h = pr.residual.defined() ? at::empty(input.sizes(), pr.x.options()) : at::empty({0}, pr.x.options());
  auto stat_opts = pr.x.options().dtype(compute_dtype(pr.x));
  o.mean = rms ? at::Tensor() : at::empty(pr.stat_shape, stat_opts);
  o.rstd = at::empty(pr.stat_shape, stat_opts);
  NormFwdParams p{};
  p.x = pr.x.data_ptr();
  p.residual = pr.residual.defined() ? pr.residual.data_ptr() : nullptr;
  p.y = o.y.data_ptr();
  p.h_out = pr.residual.defined() ? o.h.data_ptr() : nullptr;
  p.weight = pr.weight.defined() ? pr.weight.data_ptr() : nullptr;
  p.bias = pr.bias.defined() ? pr.bias.data_ptr() : nullptr;
  p.mean = rms ? nullptr : o.mean.data_ptr();
  p.rstd = o.rstd.data_ptr();
  p.rows = pr.rows;
  p.n = pr.n;
  p.eps = eps;
  const cudaStream_t stream = current_stream();
  const bool res = p.residual != nullptr;
  dispatch_dtype(dtype_of(pr.x), [&](auto tag) {
    using T = decltype(tag);
    if (rms) {
      res ? launch_norm_fwd<T, true, true>(p, stream) : launch_norm_fwd<T, true, false>(p, stream);
    } else {
      res ? launch_norm_fwd<T, false, true>(p, stream) : launch_norm_fwd<T, false, false>(p, stream);
    }
  });
  return o;
}

struct NormGrads {
  at::Tensor gx, gw, gb;
};

NormGrads norm_bwd(bool rms, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h,
                   const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
                   const std::optional<at::Tensor>& weight, bool has_bias, at::IntArrayRef normalized_shape) {
  const c10::cuda::CUDAGuard guard(input.device());
  const char* op = rms ? "fusedformer.rms_norm backward" : "fusedformer.layer_norm backward";
  NormBwdProblem b = prepare_norm_bwd(op, rms, grad_out, grad_h, input, mean, rstd, weight, normalized_shape);
  const NormProblem& pr = b.p;
  const auto ct = compute_dtype(pr.x);
  NormGrads g;
  g.gx = at::empty(input.sizes(), pr.x.options());
  auto fopts = pr.x.options().dtype(ct);
  const int64_t max_parts = 2 * int64_t(sm_count());
  at::Tensor part_w = pr.weight.defined() ? at::empty({max_parts, pr.n}, fopts) : at::Tensor();
  at::Tensor part_b = has_bias ? at::empty({max_parts, pr.n}, fopts) : at::Tensor();
  NormBwdParams p{};
  p.grad_y = b.grad_y.data_ptr();
  p.grad_h = b.grad_h.defined() ? b.grad_h.data_ptr() : nullptr;
  p.x = pr.x.data_ptr();
  p.mean = rms ? nullptr : b.mean.data_ptr();
  p.rstd = b.rstd.data_ptr();
  p.weight = pr.weight.defined() ? pr.weight.data_ptr() : nullptr;
  p.grad_x = g.gx.data_ptr();
  p.part_w = part_w.defined() ? part_w.data_ptr() : nullptr;
  p.part_b = part_b.defined() ? part_b.data_ptr() : nullptr;
  p.rows = pr.rows;
  p.n = pr.n;
  const cudaStream_t stream = current_stream();
  at::Tensor gw, gb;
  dispatch_dtype(dtype_of(pr.x), [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    const int64_t parts = rms ? launch_norm_bwd<T, true>(p, max_parts, stream)
                              : launch_norm_bwd<T, false>(p, max_parts, stream);
    auto reduce = [&](const at::Tensor& part) {
      at::Tensor out = at::empty({pr.n}, fopts);
      const int threads = 256;
      sum_partials_kernel<C><<<ceil_div(pr.n, threads), threads, 0, stream>>>(
          static_cast<const C*>(part.data_ptr()), static_cast<C*>(out.data_ptr()), parts, pr.n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return out;
    };
    if (part_w.defined()) gw = reduce(part_w);
    if (part_b.defined()) gb = reduce(part_b);
  });
  auto empty = at::empty({0}, pr.x.options());
  g.gw = gw.defined() ? param_grad(gw, weight) : empty;
  g.gb = gb.defined() ? gb.to(input.scalar_type()).view(normalized_shape) : empty;
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& input, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& residual) {
  NormOut o = norm_fwd(false, input, normalized_shape, weight, bias, eps, residual);
  return {o.y, o.h, o.mean, o.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool has_bias,
    at::IntArrayRef normalized_shape) {
  NormGrads g = norm_bwd(false, grad_out, grad_h, input, mean, rstd, weight, has_bias, normalized_shape);
  return {g.gx, g.gw, g.gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& input,
                                                            at::IntArrayRef normalized_shape,
                                                            const std::optional<at::Tensor>& weight, double eps,
                                                            const std::optional<at::Tensor>& residual) {
  NormOut o = norm_fwd(true, input, normalized_shape, weight, std::nullopt, eps, residual);
  return {o.y, o.h, o.rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h,
                                                const at::Tensor& input, const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& weight,
                                                at::IntArrayRef normalized_shape) {
  NormGrads g = norm_bwd(true, grad_out, grad_h, input, at::Tensor(), rstd, weight, false, normalized_shape);
  return {g.gx, g.gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

}  // namespace fusedformer::cuda
