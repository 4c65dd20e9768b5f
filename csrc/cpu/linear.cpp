// linear for the CPU dispatch key: y = input W^T + bias. float32 inputs of more than kSmallRows rows
// go through the blocked matrix product (csrc/cpu/kernels/linear_gemm_kernel.cpp), which reads input and
// weight through their strides (a transposed view costs no copy); the others through the few-rows
// streaming kernel (csrc/cpu/kernels/linear_kernel.cpp), for any number of rows. The blocked product
// takes bfloat16 products where torch's float32 matmul precision allows them (see bf16_products_allowed).
#include <ATen/Context.h>
#include <torch/library.h>
#include <torch/version.h>

#include "common/glue.h"
#include "common/linear.h"
#include "cpu/ops.h"
#include "fusedformer/cpu/kernels.h"

namespace fusedformer::cpu {
namespace {

// Rows above which float32 takes the blocked product: below, the streaming kernel reads W once
// against all rows at memory speed, which the product's packing of W cannot match.
constexpr int64_t kSmallRows = 16;

// Whether float32 products may round their operands to bfloat16, as torch's own CPU matmul may:
// torch.set_float32_matmul_precision("medium") or torch.backends.mkldnn.matmul.fp32_precision = "bf16".
bool bf16_products_allowed() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL) ==
         at::Float32Precision::BF16;
#else
  return false;
#endif
}

}  // namespace

at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear(input, weight, bias);
  const int64_t K = weight.size(1), N = weight.size(0);
  // rows of input as an (M, K) matrix with unit feature stride (a view when the layout allows)
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < input.dim(); ++d) M *= input.size(d);
  at::Tensor x2 = input.reshape({M, K});
  auto out_shape = input.sizes().vec();
  out_shape.back() = N;
  if (input.scalar_type() == at::kFloat && M > kSmallRows) {
    at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    at::Tensor y = at::empty(out_shape, input.options().memory_format(at::MemoryFormat::Contiguous));
    GemmArgs g{};
    g.a = x2.const_data_ptr<float>();
    g.b = weight.const_data_ptr<float>();
    g.bias = b.defined() ? b.const_data_ptr<float>() : nullptr;
    g.c = y.mutable_data_ptr<float>();
    g.M = M;
    g.N = N;
    g.K = K;
    g.rsa = x2.stride(0);
    g.csa = x2.stride(1);
    g.rsb = weight.stride(1);  // B = W^T: B(k, j) = W(j, k)
    g.csb = weight.stride(0);
    g.ldc = N;
    g.bf16 = bf16_products_allowed();
    kernels().gemm(g);
    return y;
  }
  if (K > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  if (x2.size(0) > 1 && x2.stride(0) < K) x2 = x2.contiguous();
  at::Tensor w = weight.contiguous();
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(out_shape, input.options().memory_format(at::MemoryFormat::Contiguous));
  LinearArgs a{};
  a.dtype = dtype_of(input);
  a.x = x2.data_ptr();
  a.w = w.data_ptr();
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.M = x2.size(0);
  a.N = N;
  a.K = K;
  a.ldx = x2.size(0) > 1 ? x2.stride(0) : K;
  kernels().linear_fwd(a);
  return y;
}

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) { m.impl("linear", &linear); }

}  // namespace fusedformer::cpu
