// The general argument checks and helpers of common/glue.h.
#include <c10/util/Exception.h>

#include "common/glue.h"

namespace fusedformer {

void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, op, ": ", name,
                   " must be float32, bfloat16, float16 or float64, got ", st);
}

void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                      const char* op) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", b_name, " must have the dtype of ", a_name,
                   " (", a.scalar_type(), "), got ", b.scalar_type());
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", b_name, " must be on the device of ", a_name, " (",
              a.device(), "), got ", b.device());
}

void check_nonempty(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.numel() > 0, op, ": ", name, " must not be empty, got shape ", t.sizes());
}

at::Tensor broadcast_mask(const at::Tensor& mask, at::IntArrayRef target, const char* op, const char* name,
                          at::ScalarType compute) {
  auto st = mask.scalar_type();
  TORCH_CHECK_TYPE(st == at::kBool || at::isFloatingType(st), op, ": ", name,
                   " must be a bool tensor (True = keep) or a floating additive mask, got ", st);
  bool ok = mask.dim() <= static_cast<int64_t>(target.size());
  for (int64_t i = 1; ok && i <= mask.dim(); ++i) {
    int64_t ms = mask.size(-i), ts = target[target.size() - i];
    ok = ms == ts || ms == 1;
  }
  TORCH_CHECK_VALUE(ok, op, ": ", name, " of shape ", mask.sizes(), " does not broadcast to ", target);
  // convert before expanding, so a broadcast mask is never materialized
  at::Tensor m = (st == at::kBool || st == compute) ? mask : mask.to(compute);
  return m.expand(target);
}

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

}  // namespace fusedformer
