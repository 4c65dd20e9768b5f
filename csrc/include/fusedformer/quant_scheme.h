// Weight formats of fusedformer.quantized_linear, shared by the ATen glue and the CPU and CUDA
// kernels (the layouts are documented at the schema, csrc/registration.cpp).
#pragma once

namespace fusedformer {

enum class QuantScheme : int {
  Int8 = 0,         // int8 weights, one float32 scale per output channel
  Int4 = 1,         // 4-bit weights two a byte, one float32 scale per group of K; levels -8 .. 7
  Int8Dynamic = 2,  // int8 weights; input rows quantized to int8 on the fly, int32 accumulation
  NF4 = 3,          // Int4's layout and scales; a nibble picks one of the 16 levels of kNF4Levels
  Int4Dynamic = 4,  // Int4's weights; input rows quantized to int8 in blocks of 32, int32 sums per block
};

// Schemes whose weights are 4-bit codes in groups (Int4's packing and scales).
constexpr bool is_4bit(QuantScheme s) {
  return s == QuantScheme::Int4 || s == QuantScheme::NF4 || s == QuantScheme::Int4Dynamic;
}

// The 16 values a 4-bit code stands for, before the group's scale: code c (the nibble, 0 .. 15).
struct Levels4 {
  float v[16];
};
// Int4: c - 8.
inline constexpr Levels4 kInt4Levels{{-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7}};
// NF4 ("normal float", Dettmers et al. 2023): quantiles of the standard normal, 7 below zero, zero
// and 8 above, scaled to [-1, 1], so that normally distributed weights fill each level about equally
// (the values bitsandbytes uses, so its codes mean the same here).
inline constexpr Levels4 kNF4Levels{{-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                                     -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                                     0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                                     0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                                     0.7229568362236023f, 1.0f}};

constexpr const Levels4& levels4(QuantScheme s) { return s == QuantScheme::NF4 ? kNF4Levels : kInt4Levels; }

}  // namespace fusedformer
