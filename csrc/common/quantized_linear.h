// Argument checks of fusedformer.quantized_linear, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>

#include "fusedformer/quant_scheme.h"

namespace fusedformer {

// Checked arguments: the scheme, the shape of the product and the group size along K.
struct QuantizedLinearShape {
  QuantScheme scheme;
  int64_t M, N, K;
  int64_t group_size;  // K for the per-channel schemes
};

// input (..., K) float; qweight int8 (N, K) or uint8 (N, K / 2); scale float32 (N,) or
// (N, K / group_size); bias (N) of input's dtype or none; all on one device.
QuantizedLinearShape check_quantized_linear(const at::Tensor& input, const at::Tensor& qweight,
                                            const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                                            std::string_view scheme);

}  // namespace fusedformer
