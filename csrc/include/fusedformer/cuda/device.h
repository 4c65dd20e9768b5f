// The CUDA-only part of the ATen glue of the CUDA ops (csrc/cuda/<op>.cu): the current stream, the
// device's multiprocessors, launch checks. What both backends share is in common/glue.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fusedformer/cuda/common.cuh"

namespace fusedformer::cuda {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// multiprocessors of the current device
inline int sm_count() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

}  // namespace fusedformer::cuda
