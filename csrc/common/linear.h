// Argument checks of fusedformer.linear, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fusedformer {

// input (..., K), weight (N, K), bias (N) or none, one dtype and device
void check_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace fusedformer
