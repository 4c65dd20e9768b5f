// The ATen side shared by every op and both backends: the general argument checks and the mapping
// of tensors to the kernel types of fusedformer/kernel_types.h. Each op's own checks and its
// tensor -> kernel-argument glue are in common/<op>.{h,cpp}.
//
// Each check raises a Python exception (through TORCH_CHECK*) whose message names the argument,
// what was expected and what was given.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "fusedformer/kernel_types.h"

namespace fusedformer {

// float32, bfloat16, float16 or float64; anything else is a TypeError naming `name`.
void check_float_dtype(const at::Tensor& t, const char* op, const char* name);
void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                      const char* op);
void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const char* op);
void check_nonempty(const at::Tensor& t, const char* op, const char* name);
// float64 for float64 tensors, float32 otherwise: the type kernels compute, accumulate and keep
// statistics, additive masks and norm parameters in.
inline at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
// `mask` (bool or floating) must broadcast to `target`; returns it expanded to `target`, bool or
// (additive) converted to `compute`.
at::Tensor broadcast_mask(const at::Tensor& mask, at::IntArrayRef target, const char* op, const char* name,
                          at::ScalarType compute);

// dims [from, to) of t with size-1 dims dropped and row-major neighbours merged into (size, stride)
// pairs: the fewest dims that address the same elements.
void coalesce_dims(const at::Tensor& t, int64_t from, int64_t to, std::vector<int64_t>& sizes,
                   std::vector<int64_t>& strides);

// The kernels' dtype tag of a float tensor (checked by check_float_dtype).
inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kHalf:
      return DType::Float16;
    case at::kDouble:
      return DType::Float64;
    default:
      return DType::Float32;
  }
}

// None for an undefined mask, else bool or additive.
inline MaskKind mask_kind_of(const at::Tensor& m) {
  if (!m.defined()) return MaskKind::None;
  return m.scalar_type() == at::kBool ? MaskKind::Bool : MaskKind::Float;
}

// data_ptr(), or nullptr for an undefined tensor (an absent optional input or output)
inline void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

}  // namespace fusedformer
