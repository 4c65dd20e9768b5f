// Argument checks of fusedformer.quantized_linear.
#include <c10/util/Exception.h>

#include "common/glue.h"
#include "common/quantized_linear.h"

namespace fusedformer {

QuantizedLinearShape check_quantized_linear(const at::Tensor& input, const at::Tensor& qweight,
                                            const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                                            std::string_view scheme) {
  const char* op = "fusedformer.quantized_linear";
  QuantizedLinearShape s{};
  if (scheme == "int8") {
    s.scheme = QuantScheme::Int8;
  } else if (scheme == "int4") {
    s.scheme = QuantScheme::Int4;
  } else if (scheme == "nf4") {
    s.scheme = QuantScheme::NF4;
  } else if (scheme == "int8_dynamic") {
    s.scheme = QuantScheme::Int8Dynamic;
  } else if (scheme == "int4_dynamic") {
    s.scheme = QuantScheme::Int4Dynamic;
  } else {
    TORCH_CHECK_VALUE(false, op,
                      ": scheme must be \"int8\", \"int4\", \"nf4\", \"int8_dynamic\" or \"int4_dynamic\", got \"",
                      scheme, "\"");
  }
  check_float_dtype(input, op, "input");
  check_same_device(input, "input", qweight, "qweight", op);
  check_same_device(input, "input", scale, "scale", op);
  TORCH_CHECK_VALUE(input.dim() >= 1, op, ": input must have at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(qweight.dim() == 2, op, ": qweight must be 2-D, got shape ", qweight.sizes());
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ", scale.scalar_type());
  const int64_t K = input.size(-1), N = qweight.size(0);
  TORCH_CHECK_VALUE(K > 0, op, ": the last dim of input (in_features) must be positive, got input ", input.sizes());
  s.N = N;
  s.K = K;
  s.M = input.numel() / K;
  if (is_4bit(s.scheme)) {
    TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte, op,
                      ": qweight must be uint8 (two 4-bit values a byte) for scheme \"", scheme, "\", got ",
                      qweight.scalar_type());
    TORCH_CHECK_VALUE(qweight.size(1) * 2 == K, op, ": qweight.shape[1] (", qweight.size(1),
                      ") must be half the last dim of input (", K, ") for scheme \"", scheme, "\"; input ",
                      input.sizes(),
                      ", qweight ", qweight.sizes());
    TORCH_CHECK_VALUE(scale.dim() == 2 && scale.size(0) == N && scale.size(1) > 0 && K % scale.size(1) == 0, op,
                      ": scale must have shape (out_features, in_features / group_size) = (", N,
                      ", G) with G dividing ", K, ", got ", scale.sizes());
    s.group_size = K / scale.size(1);
    TORCH_CHECK_VALUE(s.group_size % 32 == 0, op, ": the group size (in_features / scale.shape[1] = ", K, " / ",
                      scale.size(1), " = ", s.group_size, ") must be a multiple of 32 for scheme \"", scheme, "\"");
  } else {
    TORCH_CHECK_VALUE(qweight.scalar_type() == at::kChar, op, ": qweight must be int8 for scheme \"", scheme,
                      "\", got ", qweight.scalar_type());
    TORCH_CHECK_VALUE(qweight.size(1) == K, op, ": the last dim of input (", K, ") must equal in_features, ",
                      "qweight.shape[1] (", qweight.size(1), "); input ", input.sizes(), ", qweight ",
                      qweight.sizes());
    TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == N, op, ": scale must have shape (out_features,) = (", N,
                      ",) for scheme \"", scheme, "\", got ", scale.sizes());
    s.group_size = K;
  }
  if (bias.has_value() && bias->defined()) {
    check_same_dtype(input, "input", *bias, "bias", op);
    check_same_device(input, "input", *bias, "bias", op);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (out_features,) = (", N,
                      ",), got ", bias->sizes());
  }
  return s;
}

}  // namespace fusedformer
