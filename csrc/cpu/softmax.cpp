// softmax_fwd / softmax_bwd and cross_entropy_rows for the CPU dispatch key. The kernels take the
// softmax dim where it lies: rows when it is the last dim, the (outer, n, inner) layout otherwise
// (no transpose).
#include <torch/library.h>

#include "fusedformer/common.h"
#include "fusedformer/cpu/glue.h"

namespace fusedformer::cpu {
namespace {

int64_t prod(at::IntArrayRef sizes, int64_t from, int64_t to) {
  int64_t p = 1;
  for (int64_t d = from; d < to; ++d) p *= sizes[d];
  return p;
}

// dims [from, to) of t with size-1 dims dropped and row-major neighbours merged: (size, stride) pairs
void coalesce_dims(const at::Tensor& t, int64_t from, int64_t to, std::vector<int64_t>& sizes,
                   std::vector<int64_t>& strides) {
  sizes.clear();
  strides.clear();
  for (int64_t d = from; d < to; ++d) {
    const int64_t s = t.size(d), st = t.stride(d);
    if (s == 1) continue;
    if (!sizes.empty() && strides.back() == st * s) {
      sizes.back() *= s;
      strides.back() = st;
    } else {
      sizes.push_back(s);
      strides.push_back(st);
    }
  }
}

void set_indexer(RowIndexer& ix, const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  ix.ndim = static_cast<int>(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    ix.sizes[i] = sizes[i];
    ix.strides[i] = strides[i];
  }
}

// Describes the (expanded) mask to the kernel: the offset of each row (outer index) by a
// RowIndexer, the stride along the softmax dim and along the columns (the last dim, or the
// coalesced inner dims), which the kernels take as 0 or 1. A mask that does not fit that
// description is made contiguous first.
void describe_mask(at::Tensor& m, int64_t dim, bool last, SoftmaxFwdArgs& a) {
  std::vector<int64_t> sizes, strides, isizes, istrides;
  const int64_t nd = m.dim();
  auto fits = [&]() {
    if (last) {
      coalesce_dims(m, 0, nd - 1, sizes, strides);
      const int64_t cs = m.stride(nd - 1);
      return static_cast<int>(sizes.size()) <= kMaxMaskDims && (cs == 0 || cs == 1 || m.size(nd - 1) == 1);
    }
    coalesce_dims(m, 0, dim, sizes, strides);
    coalesce_dims(m, dim + 1, nd, isizes, istrides);
    return static_cast<int>(sizes.size()) <= kMaxMaskDims && isizes.size() <= 1 &&
           (isizes.empty() || istrides[0] == 0 || istrides[0] == 1);
  };
  if (!fits()) {
    m = m.contiguous();
    const bool ok = fits();
    TORCH_INTERNAL_ASSERT(ok);
  }
  set_indexer(a.mask_row, sizes, strides);
  a.mask = m.data_ptr();
  if (last) {
    a.mask_col_stride = m.size(nd - 1) == 1 ? 0 : m.stride(nd - 1);
  } else {
    a.mask_col_stride = isizes.empty() ? 0 : istrides[0];
    a.mask_dim_stride = m.size(dim) == 1 ? 0 : m.stride(dim);
  }
}

at::Tensor softmax_fwd(const at::Tensor& x, int64_t dim, double scale, const std::optional<at::Tensor>& mask,
                       bool is_causal) {
  SoftmaxProblem p = prepare_softmax(x, dim, mask, is_causal, /*move_dim=*/false);
  const int64_t d = p.dim, nd = p.x.dim();
  const bool last = d == nd - 1;
  at::Tensor y = at::empty_like(p.x);
  SoftmaxFwdArgs a{};
  a.dtype = dtype_of(p.x);
  a.x = p.x.data_ptr();
  a.y = y.data_ptr();
  a.n = p.x.size(d);
  a.inner = prod(p.x.sizes(), d + 1, nd);
  a.rows = p.x.numel() / (a.n * a.inner);
  a.scale = scale;
  a.mask_kind = mask_kind_of(p.mask);
  if (p.mask.defined()) describe_mask(p.mask, d, last, a);
  a.causal = p.causal;
  a.causal_rows = nd >= 2 ? p.x.size(-2) : 1;
  kernels().softmax_fwd(a);
  return y;
}

at::Tensor softmax_bwd(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim, double scale) {
  check_softmax_bwd(grad_y, y, dim);
  const int64_t d = dim < 0 ? dim + y.dim() : dim;
  at::Tensor yc = y.contiguous();
  at::Tensor gc = grad_y.contiguous();
  at::Tensor gx = at::empty_like(yc);
  SoftmaxBwdArgs a{};
  a.dtype = dtype_of(yc);
  a.grad_y = gc.data_ptr();
  a.y = yc.data_ptr();
  a.grad_x = gx.data_ptr();
  a.n = yc.size(d);
  a.inner = prod(yc.sizes(), d + 1, yc.dim());
  a.rows = yc.numel() / (a.n * a.inner);
  a.scale = scale;
  kernels().softmax_bwd(a);
  return gx;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target,
                                                      const at::Tensor& scale, int64_t ignore_index,
                                                      bool compute_grad) {
  check_cross_entropy(logits, target, scale, ignore_index);
  at::Tensor x = logits.contiguous();
  at::Tensor t = target.contiguous();
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({x.size(0)}, x.options().dtype(acc));
  at::Tensor grad = compute_grad ? at::empty_like(x) : at::empty({0}, x.options());
  CrossEntropyArgs a{};
  a.dtype = dtype_of(x);
  a.x = x.data_ptr();
  a.target = t.const_data_ptr<int64_t>();
  a.loss = loss.data_ptr();
  a.grad = compute_grad ? grad.data_ptr() : nullptr;
  a.rows = x.size(0);
  a.n = x.size(1);
  a.ignore_index = ignore_index;
  a.scale = scale.item<double>();
  kernels().cross_entropy(a);
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
  m.impl("cross_entropy_rows", &cross_entropy_rows);
}

}  // namespace fusedformer::cpu
