// Argument checks and kernel arguments of fusedformer.softmax.
#include <c10/util/Exception.h>

#include <limits>
#include <vector>

#include "common/glue.h"
#include "common/softmax.h"

namespace fusedformer {
namespace {

int64_t prod(at::IntArrayRef sizes, int64_t from, int64_t to) {
  int64_t p = 1;
  for (int64_t d = from; d < to; ++d) p *= sizes[d];
  return p;
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
// coalesced inner dims). A mask that does not fit that description is made contiguous first.
void describe_mask(at::Tensor& m, int64_t dim, bool last, bool unit_cols, SoftmaxFwdArgs& a) {
  std::vector<int64_t> sizes, strides, isizes, istrides;
  const int64_t nd = m.dim();
  auto unit = [&](int64_t stride) { return !unit_cols || stride == 0 || stride == 1; };
  auto fits = [&]() {
    if (last) {
      coalesce_dims(m, 0, nd - 1, sizes, strides);
      return static_cast<int>(sizes.size()) <= kMaxMaskDims && (unit(m.stride(nd - 1)) || m.size(nd - 1) == 1);
    }
    coalesce_dims(m, 0, dim, sizes, strides);
    coalesce_dims(m, dim + 1, nd, isizes, istrides);
    return static_cast<int>(sizes.size()) <= kMaxMaskDims && isizes.size() <= 1 &&
           (isizes.empty() || unit(istrides[0]));
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

void check_softmax_bwd(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim) {
  const char* op = "fusedformer.softmax backward";
  check_float_dtype(y, op, "output");
  check_same_dtype(y, "output", grad_y, "grad_output", op);
  check_same_device(y, "output", grad_y, "grad_output", op);
  TORCH_CHECK_VALUE(grad_y.sizes() == y.sizes(), op, ": grad_output must have the output's shape ", y.sizes(),
                    ", got ", grad_y.sizes());
  TORCH_CHECK_INDEX(dim >= -y.dim() && dim < y.dim(), op, ": dim ", dim, " out of range for ", y.dim(),
                    " dimensions");
}

}  // namespace

SoftmaxProblem prepare_softmax(const at::Tensor& x, int64_t dim, const std::optional<at::Tensor>& mask,
                               bool is_causal, bool move_dim) {
  const char* op = "fusedformer.softmax";
  check_float_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  check_nonempty(x, op, "x");
  TORCH_CHECK_INDEX(dim >= -x.dim() && dim < x.dim(), op, ": dim must be in [", -x.dim(), ", ", x.dim() - 1,
                    "] for an x of ", x.dim(), " dimensions, got ", dim);
  SoftmaxProblem p;
  p.dim = dim < 0 ? dim + x.dim() : dim;
  p.moved = move_dim && p.dim != x.dim() - 1;
  TORCH_CHECK_VALUE(!is_causal || x.dim() >= 2, op, ": is_causal needs an x of at least 2 dimensions, got ",
                    x.dim());
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    check_same_device(x, "x", *mask, "mask", op);
    m = broadcast_mask(*mask, x.sizes(), op, "mask", compute_dtype(x));
  }
  const bool causal_native = p.dim == x.dim() - 1 || (!move_dim && p.dim == x.dim() - 2);
  if (is_causal && !causal_native) {
    // causal masking refers to the caller's last two dims; with another softmax dim it is applied
    // as an explicit (broadcast) mask.
    int64_t L = x.size(-2), S = x.size(-1);
    auto keep = at::ones({L, S}, x.options().dtype(at::kBool)).tril();
    if (!m.defined()) {
      m = keep.expand(x.sizes());
    } else if (m.scalar_type() == at::kBool) {
      m = m.logical_and(keep);
    } else {
      m = m.masked_fill(keep.logical_not(), -std::numeric_limits<float>::infinity());
    }
    p.causal = false;
  } else {
    p.causal = is_causal;
  }
  if (p.moved) {
    p.x = x.movedim(p.dim, -1).contiguous();
    if (m.defined()) m = m.movedim(p.dim, -1);
  } else {
    p.x = x.contiguous();
  }
  p.mask = m;
  return p;
}

SoftmaxFwd softmax_fwd_args(const at::Tensor& x, int64_t dim, double scale, const std::optional<at::Tensor>& mask,
                            bool is_causal, bool move_dim, bool unit_mask_cols) {
  SoftmaxFwd f;
  f.p = prepare_softmax(x, dim, mask, is_causal, move_dim);
  SoftmaxProblem& p = f.p;
  const int64_t nd = p.x.dim(), d = p.moved ? nd - 1 : p.dim;
  f.y = at::empty_like(p.x);
  SoftmaxFwdArgs& a = f.args;
  a = SoftmaxFwdArgs{};
  a.dtype = dtype_of(p.x);
  a.x = p.x.data_ptr();
  a.y = f.y.data_ptr();
  a.n = p.x.size(d);
  a.inner = prod(p.x.sizes(), d + 1, nd);
  a.rows = p.x.numel() / (a.n * a.inner);
  a.scale = scale;
  a.mask_kind = mask_kind_of(p.mask);
  if (p.mask.defined()) describe_mask(p.mask, d, d == nd - 1, unit_mask_cols, a);
  a.causal = p.causal;
  a.causal_rows = nd >= 2 ? p.x.size(-2) : 1;
  return f;
}

SoftmaxBwd softmax_bwd_args(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim, double scale, bool move_dim) {
  check_softmax_bwd(grad_y, y, dim);
  SoftmaxBwd b;
  b.dim = dim < 0 ? dim + y.dim() : dim;
  b.moved = move_dim && b.dim != y.dim() - 1;
  b.y = b.moved ? y.movedim(b.dim, -1).contiguous() : y.contiguous();
  b.grad_y = b.moved ? grad_y.movedim(b.dim, -1).contiguous() : grad_y.contiguous();
  b.grad_x = at::empty_like(b.y);
  const int64_t d = b.moved ? y.dim() - 1 : b.dim;
  SoftmaxBwdArgs& a = b.args;
  a = SoftmaxBwdArgs{};
  a.dtype = dtype_of(b.y);
  a.grad_y = b.grad_y.data_ptr();
  a.y = b.y.data_ptr();
  a.grad_x = b.grad_x.data_ptr();
  a.n = b.y.size(d);
  a.inner = prod(b.y.sizes(), d + 1, b.y.dim());
  a.rows = b.y.numel() / (a.n * a.inner);
  a.scale = scale;
  return b;
}

}  // namespace fusedformer
