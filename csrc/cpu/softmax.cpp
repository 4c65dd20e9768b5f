// softmax_fwd / softmax_bwd for the CPU dispatch key.
#include <torch/library.h>

#include "fusedformer/common.h"
#include "fusedformer/cpu/glue.h"

namespace fusedformer::cpu {
namespace {

at::Tensor softmax_fwd(const at::Tensor& x, int64_t dim, double scale, const std::optional<at::Tensor>& mask,
                       bool is_causal) {
  SoftmaxProblem p = prepare_softmax(x, dim, mask, is_causal);
  at::Tensor y = at::empty_like(p.x);
  SoftmaxFwdArgs a{};
  a.dtype = dtype_of(p.x);
  a.x = p.x.data_ptr();
  a.y = y.data_ptr();
  a.n = p.x.size(-1);
  a.rows = p.x.numel() / a.n;
  a.scale = scale;
  a.mask_kind = mask_kind_of(p.mask);
  if (p.mask.defined()) {
    a.mask = p.mask.data_ptr();
    // coalesce the row dims of the (expanded) mask into at most kMaxMaskDims entries
    std::vector<int64_t> sizes, strides;
    for (int64_t d = 0; d < p.mask.dim() - 1; ++d) {
      int64_t s = p.mask.size(d), st = p.mask.stride(d);
      if (s == 1) continue;
      if (!sizes.empty() && strides.back() == st * s) {
        sizes.back() *= s;
        strides.back() = st;
      } else {
        sizes.push_back(s);
        strides.push_back(st);
      }
    }
    if (static_cast<int>(sizes.size()) > kMaxMaskDims) {
      // too many non-mergeable broadcast dims: materialize the mask's row dims
      p.mask = p.mask.contiguous();
      sizes = {a.rows};
      strides = {a.n};
    }
    a.mask_row.ndim = static_cast<int>(sizes.size());
    for (size_t i = 0; i < sizes.size(); ++i) {
      a.mask_row.sizes[i] = sizes[i];
      a.mask_row.strides[i] = strides[i];
    }
    a.mask = p.mask.data_ptr();
    a.mask_col_stride = p.mask.stride(-1);
  }
  a.causal = p.causal;
  a.causal_rows = p.x.dim() >= 2 ? p.x.size(-2) : 1;
  kernels().softmax_fwd(a);
  return p.moved ? y.movedim(-1, p.dim).contiguous() : y;
}

at::Tensor softmax_bwd(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim, double scale) {
  check_softmax_bwd(grad_y, y, dim);
  int64_t d = dim < 0 ? dim + y.dim() : dim;
  bool moved = d != y.dim() - 1;
  at::Tensor yc = moved ? y.movedim(d, -1).contiguous() : y.contiguous();
  at::Tensor gc = moved ? grad_y.movedim(d, -1).contiguous() : grad_y.contiguous();
  at::Tensor gx = at::empty_like(yc);
  SoftmaxBwdArgs a{};
  a.dtype = dtype_of(yc);
  a.grad_y = gc.data_ptr();
  a.y = yc.data_ptr();
  a.grad_x = gx.data_ptr();
  a.n = yc.size(-1);
  a.rows = yc.numel() / a.n;
  a.scale = scale;
  kernels().softmax_bwd(a);
  return moved ? gx.movedim(-1, d).contiguous() : gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}

}  // namespace fusedformer::cpu
