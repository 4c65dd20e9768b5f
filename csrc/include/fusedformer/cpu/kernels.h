// Interface between the ATen glue (csrc/cpu/*.cpp) and the CPU kernels (csrc/cpu/kernels/*.cpp):
// the argument structs only the CPU has (those shared with CUDA are in fusedformer/kernel_types.h)
// and the kernel table. The kernels include no torch header and are compiled once per instruction
// set; kernels() returns the table for the instruction set chosen at run time (the best the CPU
// supports, or FUSEDFORMER_CPU_CAPABILITY / set_isa()).
#pragma once

#include <cstdint>

#include "fusedformer/kernel_types.h"
#include "fusedformer/quant_scheme.h"

namespace fusedformer::cpu {

using AttnFwdArgs = AttnFwdArgsOf<int64_t, double>;
using AttnBwdArgs = AttnBwdArgsOf<int64_t, double>;

// y = x W^T + bias (nn.Linear): x (M, K) rows ldx elements apart, W (N, K) contiguous, bias (N)
// nullable, y (M, N) contiguous; all of one dtype, accumulated in the compute type.
struct LinearArgs {
  DType dtype;
  const void* x;
  const void* w;
  const void* bias;
  void* y;
  int64_t M, N, K, ldx;
};

// C = A B + bias (float32): A (M, K) with element (i, k) at a[i * rsa + k * csa], B (K, N) with
// element (k, j) at b[k * rsb + j * csb] (any strides: transposed views need no copy), bias (N)
// nullable, C (M, N) rows ldc elements apart. Or B from b_column instead of b: it writes elements
// k0 .. k0 + kc - 1 of column j of B into dst (the quantized linear's weights, dequantized as the
// product copies them into its panels). With bf16 set, the AVX-512 build on a CPU with AVX512-BF16
// rounds A and B to bfloat16 as it copies them and sums their products in float32 (vdpbf16ps: twice
// the float32 rate); elsewhere bf16 is ignored.
struct GemmArgs {
  const float* a;
  const float* b;
  const float* bias;
  float* c;
  int64_t M, N, K;
  int64_t rsa, csa, rsb, csb, ldc;
  void (*b_column)(const void* ctx, int64_t j, int64_t k0, int64_t kc, float* dst);
  const void* b_ctx;
  bool bf16;
};

// GELU over n contiguous elements, as torch.nn.functional.gelu: the exact x * Phi(x) (Phi the
// standard normal CDF) or, with tanh, its tanh approximation. Forward: out = gelu(x), grad_y null.
// Backward: out = grad_y * gelu'(x). All arrays in the storage dtype, computed in the compute type.
struct GeluArgs {
  DType dtype;
  bool tanh;
  const void* x;
  const void* grad_y;  // backward only
  void* out;  // may be x (in place)
  int64_t n;
};

// y = x dequant(W)^T + bias with quantized W (the formats of QuantScheme): x (M, K) rows ldx
// elements apart in dtype, qw the packed weights (N rows, contiguous), scale float32 (N, K /
// group_size) contiguous, bias (N) nullable in dtype, y (M, N) contiguous in dtype.
struct QuantLinearArgs {
  DType dtype;
  QuantScheme scheme;
  const void* x;
  const void* qw;
  const float* scale;
  const void* bias;
  void* y;
  int64_t M, N, K, ldx, group_size;
};

struct KernelTable {
  const char* name;
  void (*softmax_fwd)(const SoftmaxFwdArgs&);
  void (*softmax_bwd)(const SoftmaxBwdArgs&);
  void (*norm_fwd)(const NormFwdArgs&);
  void (*norm_bwd)(const NormBwdArgs&);
  void (*attention_fwd)(const AttnFwdArgs&);
  void (*attention_bwd)(const AttnBwdArgs&);
  void (*linear_fwd)(const LinearArgs&);
  void (*gemm)(const GemmArgs&);
  void (*cross_entropy)(const CrossEntropyArgs&);
  void (*gelu_fwd)(const GeluArgs&);
  void (*gelu_bwd)(const GeluArgs&);
  void (*paged_attention)(const PagedAttnArgs&);
  void (*quantized_linear)(const QuantLinearArgs&);
};

#define FF_DECLARE_KERNELS(ns)                     \
  namespace ns {                                   \
  void softmax_fwd(const SoftmaxFwdArgs&);         \
  void softmax_bwd(const SoftmaxBwdArgs&);         \
  void norm_fwd(const NormFwdArgs&);               \
  void norm_bwd(const NormBwdArgs&);               \
  void attention_fwd(const AttnFwdArgs&);          \
  void attention_bwd(const AttnBwdArgs&);          \
  void linear_fwd(const LinearArgs&);              \
  void gemm(const GemmArgs&);                      \
  void cross_entropy(const CrossEntropyArgs&);     \
  void gelu_fwd(const GeluArgs&);                  \
  void gelu_bwd(const GeluArgs&);                  \
  void paged_attention(const PagedAttnArgs&);      \
  void quantized_linear(const QuantLinearArgs&);   \
  }

// The kernel table in use.
const KernelTable& kernels();
// Names of the instruction sets this build has and this CPU runs, best last.
const char* const* available_isas(int* count);
// Selects an instruction set by name ("generic", "avx2", "avx512"); false if unavailable.
bool set_isa(const char* name);

// Threading, implemented with ATen's parallel primitives (csrc/cpu/parallel.cpp).
// f(begin, end) is called on disjoint chunks covering [begin, end).
void parallel_for(int64_t begin, int64_t end, int64_t grain, void (*f)(void*, int64_t, int64_t), void* ctx);
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for(
      begin, end, grain,
      [](void* c, int64_t b, int64_t e) { (*static_cast<const F*>(c))(b, e); },
      const_cast<void*>(static_cast<const void*>(&f)));
}
int num_threads();

}  // namespace fusedformer::cpu
