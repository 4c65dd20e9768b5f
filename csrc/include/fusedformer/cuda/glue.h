// Helpers for the ATen side of the CUDA ops (csrc/cuda/{softmax,layernorm,attention}.cu): dtype
// dispatch to the kernel element types, the current stream, and launch checks.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fusedformer/cuda/common.cuh"

namespace fusedformer::cuda {

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

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// multiprocessors of the current device
inline int sm_count() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

}  // namespace fusedformer::cuda
