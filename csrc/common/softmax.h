// Argument checks and kernel arguments of fusedformer.softmax, shared by the CPU and CUDA
// implementations. The CPU kernels take the softmax dim where it lies (move_dim false: rows when it
// is the last dim, the (outer, n, inner) layout otherwise); the CUDA kernels take rows only, so the
// CUDA glue moves the dim last (move_dim true) and back.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "fusedformer/kernel_types.h"

namespace fusedformer {

struct SoftmaxProblem {
  at::Tensor x;     // contiguous, the softmax dim moved last (unless move_dim is false)
  at::Tensor mask;  // undefined, or expanded to x's (moved) shape
  int64_t dim;      // wrapped dim of the caller's tensor
  bool moved;       // dim was not the last one and was moved: the result must be moved back
  // causal applies to the last two dims of x: only when the softmax dim is last, or (move_dim
  // false) the second to last; for other dims it is folded into `mask`
  bool causal;
};
SoftmaxProblem prepare_softmax(const at::Tensor& x, int64_t dim, const std::optional<at::Tensor>& mask,
                               bool is_causal, bool move_dim);

// The forward's output and its kernel arguments. The kernels read a mask row at the column stride
// mask_col_stride; unit_mask_cols (the CPU kernels) asks for a stride of 0 or 1, copying a mask
// that has another.
struct SoftmaxFwd {
  SoftmaxProblem p;
  at::Tensor y;  // p.x's shape
  SoftmaxFwdArgs args;
  at::Tensor result() const { return p.moved ? y.movedim(-1, p.dim).contiguous() : y; }
};
SoftmaxFwd softmax_fwd_args(const at::Tensor& x, int64_t dim, double scale, const std::optional<at::Tensor>& mask,
                            bool is_causal, bool move_dim, bool unit_mask_cols);

struct SoftmaxBwd {
  at::Tensor grad_y, y, grad_x;  // contiguous, the softmax dim moved last when `moved`
  int64_t dim;
  bool moved;
  SoftmaxBwdArgs args;
  at::Tensor result() const { return moved ? grad_x.movedim(-1, dim).contiguous() : grad_x; }
};
SoftmaxBwd softmax_bwd_args(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim, double scale, bool move_dim);

// softmax_fwd / softmax_bwd over a backend's launchers:
//   static constexpr bool Backend::kMoveDim, Backend::kUnitMaskCols;  (see above)
//   static void Backend::softmax_fwd(const at::Tensor& x, const SoftmaxFwdArgs&);
//   static void Backend::softmax_bwd(const at::Tensor& y, const SoftmaxBwdArgs&);
template <typename Backend>
struct SoftmaxOps {
  static at::Tensor softmax_fwd(const at::Tensor& x, int64_t dim, double scale, const std::optional<at::Tensor>& mask,
                                bool is_causal) {
    const SoftmaxFwd f = softmax_fwd_args(x, dim, scale, mask, is_causal, Backend::kMoveDim, Backend::kUnitMaskCols);
    Backend::softmax_fwd(x, f.args);
    return f.result();
  }

  static at::Tensor softmax_bwd(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim, double scale) {
    const SoftmaxBwd b = softmax_bwd_args(grad_y, y, dim, scale, Backend::kMoveDim);
    Backend::softmax_bwd(y, b.args);
    return b.result();
  }

  static void register_ops(torch::Library& m) {
    m.impl("softmax_fwd", &softmax_fwd);
    m.impl("softmax_bwd", &softmax_bwd);
  }
};

}  // namespace fusedformer
