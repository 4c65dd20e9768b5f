// The CPU implementations of the ops that another CPU op composes (decode_layer), callable from C++
// without the dispatcher: each checks its arguments as the op does.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fusedformer::cpu {

at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

at::Tensor quantized_linear(const at::Tensor& input, const at::Tensor& qweight, const at::Tensor& scale,
                            const std::optional<at::Tensor>& bias, c10::string_view scheme);

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                                                 double dropout_p, bool is_causal, double scale,
                                                 const std::optional<at::Tensor>& seed);

// in place on a contiguous input
void gelu_inplace(const at::Tensor& input, c10::string_view approximate);

}  // namespace fusedformer::cpu
