// quantized_linear for the CPU dispatch key: y = input dequant(qweight)^T + bias. The kernels
// (csrc/cpu/kernels/quantized_linear_kernel.cpp) stream the packed weights for few rows and go
// through dequantized panels and the blocked float product for many.
#include <torch/library.h>

#include "common/glue.h"
#include "common/quantized_linear.h"
#include "cpu/ops.h"
#include "fusedformer/cpu/kernels.h"

namespace fusedformer::cpu {

at::Tensor quantized_linear(const at::Tensor& input, const at::Tensor& qweight, const at::Tensor& scale,
                            const std::optional<at::Tensor>& bias, c10::string_view scheme) {
  const QuantizedLinearShape s =
      check_quantized_linear(input, qweight, scale, bias, std::string_view(scheme.data(), scheme.size()));
  // rows of input as an (M, K) matrix with unit feature stride (a view when the layout allows)
  at::Tensor x2 = input.reshape({s.M, s.K});
  if (s.K > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  if (s.M > 1 && x2.stride(0) < s.K) x2 = x2.contiguous();
  at::Tensor w = qweight.contiguous();
  at::Tensor sc = scale.contiguous();
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  auto out_shape = input.sizes().vec();
  out_shape.back() = s.N;
  at::Tensor y = at::empty(out_shape, input.options().memory_format(at::MemoryFormat::Contiguous));
  QuantLinearArgs a{};
  a.dtype = dtype_of(input);
  a.scheme = s.scheme;
  a.x = x2.data_ptr();
  a.qw = w.data_ptr();
  a.scale = sc.const_data_ptr<float>();
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.M = s.M;
  a.N = s.N;
  a.K = s.K;
  a.ldx = s.M > 1 ? x2.stride(0) : s.K;
  a.group_size = s.group_size;
  kernels().quantized_linear(a);
  return y;
}

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) { m.impl("quantized_linear", &quantized_linear); }

}  // namespace fusedformer::cpu
