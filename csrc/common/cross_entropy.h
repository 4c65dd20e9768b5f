// Argument checks and kernel arguments of fusedformer.cross_entropy_rows, shared by the CPU and
// CUDA implementations.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "fusedformer/kernel_types.h"

namespace fusedformer {

// The checked inputs, the outputs and the kernel arguments that point into them.
struct CrossEntropy {
  at::Tensor x, target, scale;  // contiguous; scale one element of the compute type
  at::Tensor loss;              // (rows,), compute type
  at::Tensor grad;              // x's shape and dtype, or empty without compute_grad
  CrossEntropyArgs args;
};
// logits (rows, n >= 1) float, target (rows,) int64 with every entry in [0, n) or ignore_index,
// scale one element; all on one device. Reading target costs a device sync on CUDA.
CrossEntropy prepare_cross_entropy(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& scale,
                                   int64_t ignore_index, bool compute_grad);

// cross_entropy_rows over a backend's launcher:
//   static void Backend::cross_entropy(const at::Tensor& logits, const CrossEntropyArgs&);
template <typename Backend>
struct CrossEntropyOps {
  static std::tuple<at::Tensor, at::Tensor> cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target,
                                                               const at::Tensor& scale, int64_t ignore_index,
                                                               bool compute_grad) {
    const CrossEntropy c = prepare_cross_entropy(logits, target, scale, ignore_index, compute_grad);
    if (c.args.rows > 0) Backend::cross_entropy(logits, c.args);
    return {c.loss, c.grad};
  }

  static void register_ops(torch::Library& m) { m.impl("cross_entropy_rows", &cross_entropy_rows); }
};

}  // namespace fusedformer
