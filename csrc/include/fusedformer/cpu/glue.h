// Helpers for the ATen side of the CPU ops (csrc/cpu/*.cpp).
#pragma once

#include <ATen/ATen.h>

#include "fusedformer/cpu/kernels.h"

namespace fusedformer::cpu {

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

inline MaskKind mask_kind_of(const at::Tensor& m) {
  if (!m.defined()) return MaskKind::None;
  return m.scalar_type() == at::kBool ? MaskKind::Bool : MaskKind::Float;
}

}  // namespace fusedformer::cpu
