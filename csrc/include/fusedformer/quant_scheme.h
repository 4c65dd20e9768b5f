// Weight formats of fusedformer.quantized_linear, shared by the ATen glue and the CPU and CUDA
// kernels (the layouts are documented at the schema, csrc/registration.cpp).
#pragma once

namespace fusedformer {

enum class QuantScheme : int {
  Int8 = 0,         // int8 weights, one float32 scale per output channel
  Int4 = 1,         // 4-bit weights two a byte, one float32 scale per group of K
  Int8Dynamic = 2,  // int8 weights; input rows quantized to int8 on the fly, int32 accumulation
};

}  // namespace fusedformer
