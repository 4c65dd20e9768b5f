// Interface between the ATen glue (csrc/cpu/*.cpp) and the CPU kernels (csrc/cpu/kernels/*.cpp).
//
// The kernels include no torch header: they see raw pointers, sizes and element strides, and are
// compiled once per instruction set. kernels() returns the table for the instruction set chosen at
// run time (the best the CPU supports, or FUSEDFORMER_CPU_CAPABILITY / set_isa()).
#pragma once

#include <cstdint>

namespace fusedformer::cpu {

enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2, Float64 = 3 };
enum class MaskKind : int { None = 0, Bool = 1, Float = 2 };

inline constexpr int kMaxMaskDims = 8;

// Compute type: float64 for float64 tensors, float32 otherwise. Additive masks, norm parameters,
// statistics and the attention log-sum-exp are in the compute type.

// Strided element offset of a row, for broadcast masks: row r is decomposed over `sizes`
// (row-major, the last entry varies fastest) and weighted by `strides` (0 for broadcast dims).
struct RowIndexer {
  int ndim = 0;
  int64_t sizes[kMaxMaskDims] = {};
  int64_t strides[kMaxMaskDims] = {};
  int64_t offset(int64_t r) const {
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      off += (r % sizes[d]) * strides[d];
      r /= sizes[d];
    }
    return off;
  }
};

// y = softmax(x * scale + mask) over contiguous rows of length n.
//
// With inner > 1 the softmax dim is not the last: x and y are contiguous (rows, n, inner) and the
// softmax runs along n for each (row, inner index) pair. The mask element of (row, k, i) is then
// at mask_row.offset(row) + k * mask_dim_stride + i * mask_col_stride, and causal keeps the inner
// (key) index i <= k (the softmax dim is the query dim, the last dim the key dim).
struct SoftmaxFwdArgs {
  DType dtype;
  const void* x;
  void* y;
  int64_t rows, n;
  double scale;
  MaskKind mask_kind;
  const void* mask;     // bool (uint8, true = keep) or additive in the compute type (see below)
  RowIndexer mask_row;  // element offset of each row's mask
  int64_t mask_col_stride;
  bool causal;          // row r is query (r % causal_rows); keeps columns j <= that
  int64_t causal_rows;
  int64_t inner;        // 0 or 1: the softmax dim is the last
  int64_t mask_dim_stride;
};

// grad_x = scale * y * (grad_y - sum(grad_y * y)) over contiguous rows (with inner > 1, along n
// of the contiguous (rows, n, inner) layout, as in SoftmaxFwdArgs).
struct SoftmaxBwdArgs {
  DType dtype;
  const void* grad_y;
  const void* y;
  void* grad_x;
  int64_t rows, n;
  double scale;
  int64_t inner;  // 0 or 1: the softmax dim is the last
};

// LayerNorm / RMSNorm forward over contiguous rows of length n. With `residual`, the input is
// h = x + residual (written to h_out in the input dtype) and the norm is taken of h.
struct NormFwdArgs {
  DType dtype;
  bool rms;
  const void* x;
  const void* residual;  // nullable
  void* y;
  void* h_out;           // nullable; required with residual
  const void* weight;    // nullable, n
  const void* bias;      // nullable, n (layer norm only)
  void* mean;            // rows (layer norm only)
  void* rstd;            // rows
  int64_t rows, n;
  double eps;
};

// Backward: grad_x (= grad of the residual too) from grad_y and, with the residual form, grad_h.
struct NormBwdArgs {
  DType dtype;
  bool rms;
  const void* grad_y;
  const void* grad_h;  // nullable: gradient flowing into the h output
  const void* x;       // the normalized input (h with the residual form)
  const void* mean;   // layer norm only
  const void* rstd;
  const void* weight;  // nullable
  void* grad_x;
  void* grad_weight;  // nullable, n
  void* grad_bias;    // nullable, n
  int64_t rows, n;
};

// Attention over (B, H, L, E) tensors addressed by element strides. Query head h reads key/value
// head h / (Hq / Hkv). The output row (b, h, i) starts at out + b * o_sb + h * o_sh + i * o_sl (its Ev
// features contiguous; the ops' outputs are contiguous (B, Hq, L, Ev), the varlen op's (T, Hq, Ev)); lse is
// contiguous (B, Hq, L) in the compute type, the natural-log log-sum-exp of each row's scaled logits (+inf for
// a row whose keys are all masked).
struct AttnTensor {
  const void* data;
  int64_t sb, sh, sl, se;  // strides of batch, head, position, feature
};

struct AttnFwdArgs {
  DType dtype;
  AttnTensor q, k, v;
  void* out;
  int64_t o_sb, o_sh, o_sl;  // element strides of the output's batch, head and position
  void* lse;
  int64_t B, Hq, Hkv, L, S, E, Ev;
  MaskKind mask_kind;
  const void* mask;  // bool (uint8) or additive (compute type), broadcast to (B, Hq, L, S) by its strides
  int64_t m_sb, m_sh, m_sl, m_ss;
  bool causal;  // top-left aligned: query i keeps key j <= i
  double scale;
  double dropout_p;
  uint64_t seed;
};

struct AttnBwdArgs {
  AttnFwdArgs fwd;       // inputs as in the forward (out and lse are read)
  AttnTensor grad_out;   // (B, Hq, L, Ev)
  void* grad_q;          // contiguous (B, Hq, L, E)
  void* grad_k;          // contiguous (B, Hkv, S, E)
  void* grad_v;          // contiguous (B, Hkv, S, Ev)
};

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
// nullable, C (M, N) rows ldc elements apart.
struct GemmArgs {
  const float* a;
  const float* b;
  const float* bias;
  float* c;
  int64_t M, N, K;
  int64_t rsa, csa, rsb, csb, ldc;
};

// Cross-entropy over contiguous rows of logits x (rows, n) against class indices target (rows), the
// loss of fusedformer.ops.linear_cross_entropy: loss[r] = logsumexp(x_r) - x_r[target[r]] (compute
// type) and, with grad, grad_r = softmax(x_r) * scale minus scale at target[r] (x's dtype). Rows whose
// target is ignore_index get loss 0 and a zero gradient; the others are in [0, n) (checked by the glue).
struct CrossEntropyArgs {
  DType dtype;
  const void* x;
  const int64_t* target;
  void* loss;
  void* grad;  // nullable
  int64_t rows, n, ignore_index;
  double scale;
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
