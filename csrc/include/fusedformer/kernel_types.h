// Kernel argument types shared by the CPU kernels (csrc/cpu/kernels/) and the CUDA kernels
// (csrc/cuda/), and the dispatch from a run-time dtype or mask kind to a compile-time one.
//
// No torch header: the kernels are compiled apart from ATen (the CPU ones once per instruction set,
// the CUDA ones by nvcc in their own translation units), and see only raw pointers, sizes and
// element strides. The ATen side fills these structs once per op (csrc/common/<op>.cpp).
#pragma once

#include <cstdint>
#include <type_traits>

// Small helpers both backends call: inlined on the host, and on the device under nvcc.
#if defined(__CUDACC__)
#define FF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FF_HOST_DEVICE inline
#endif

namespace fusedformer {

enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2, Float64 = 3 };
enum class MaskKind : int { None = 0, Bool = 1, Float = 2 };

// The element type of each dtype on a backend: the CPU kernels' storage structs, or CUDA's
// __nv_bfloat16 / __half.
template <typename F32, typename BF16, typename F16, typename F64>
struct ElementTypes {
  using f32 = F32;
  using bf16 = BF16;
  using f16 = F16;
  using f64 = F64;
};

// f(T{}) with T the element type of `dt` in Types (an ElementTypes).
template <typename Types, typename F>
inline void dispatch_dtype(DType dt, F&& f) {
  if (dt == DType::BFloat16) {
    f(typename Types::bf16{});
  } else if (dt == DType::Float16) {
    f(typename Types::f16{});
  } else if (dt == DType::Float64) {
    f(typename Types::f64{});
  } else {
    f(typename Types::f32{});
  }
}

// f(std::integral_constant<MaskKind, k>{}): the mask kind as a compile-time constant.
template <typename F>
inline void dispatch_mask(MaskKind k, F&& f) {
  using K = MaskKind;
  if (k == K::Bool) {
    f(std::integral_constant<K, K::Bool>{});
  } else if (k == K::Float) {
    f(std::integral_constant<K, K::Float>{});
  } else {
    f(std::integral_constant<K, K::None>{});
  }
}

// Additive masks, norm parameters, statistics and the attention log-sum-exp are in the compute
// type: float64 for float64 tensors, float32 otherwise.

inline constexpr int kMaxMaskDims = 8;

// Strided element offset of a row, for broadcast masks: row r is decomposed over `sizes`
// (row-major, the last entry varies fastest) and weighted by `strides` (0 for broadcast dims).
struct RowIndexer {
  int ndim = 0;
  int64_t sizes[kMaxMaskDims] = {};
  int64_t strides[kMaxMaskDims] = {};
  FF_HOST_DEVICE int64_t offset(int64_t r) const {
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
// With inner > 1 the softmax dim is not the last (the CPU kernels take that layout in place; the
// CUDA glue moves the dim last first): x and y are contiguous (rows, n, inner) and the softmax runs
// along n for each (row, inner index) pair. The mask element of (row, k, i) is then at
// mask_row.offset(row) + k * mask_dim_stride + i * mask_col_stride, and causal keeps the inner
// (key) index i <= k (the softmax dim is the query dim, the last dim the key dim).
struct SoftmaxFwdArgs {
  DType dtype;
  const void* x;
  void* y;
  int64_t rows, n;
  double scale;
  MaskKind mask_kind;
  const void* mask;     // bool (uint8, true = keep) or additive in the compute type
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

// Cross-entropy over contiguous rows of logits x (rows, n) against class indices target (rows), the
// loss of fusedformer.ops.linear_cross_entropy: loss[r] = logsumexp(x_r) - x_r[target[r]] (compute
// type) and, with grad, grad_r = softmax(x_r) * scale minus scale at target[r] (x's dtype). Rows whose
// target is ignore_index get loss 0 and a zero gradient; the others are in [0, n) (checked by the glue).
// scale is read from memory, so that a scale computed on the device costs no synchronization.
struct CrossEntropyArgs {
  DType dtype;
  const void* x;
  const int64_t* target;
  void* loss;         // rows, compute type
  void* grad;         // nullable: rows x n, x's dtype
  const void* scale;  // one element, compute type
  int64_t rows, n, ignore_index;
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
  const void* weight;    // nullable, n, compute type
  const void* bias;      // nullable, n, compute type (layer norm only)
  void* mean;            // rows, compute type (layer norm only)
  void* rstd;            // rows, compute type
  int64_t rows, n;
  double eps;
};

// Backward: grad_x (= grad of the residual too) from grad_y and, with the residual form, grad_h.
// grad_weight / grad_bias (compute type, nullable) are the CPU kernel's n sums; the CUDA kernels
// write one partial row of n per block there instead, summed by a second kernel.
struct NormBwdArgs {
  DType dtype;
  bool rms;
  const void* grad_y;
  const void* grad_h;  // nullable: gradient flowing into the h output
  const void* x;       // the normalized input (h with the residual form)
  const void* mean;    // layer norm only
  const void* rstd;
  const void* weight;  // nullable
  void* grad_x;
  void* grad_weight;
  void* grad_bias;
  int64_t rows, n;
};

// Attention over (B, H, L, E) tensors addressed by element strides. Query head h reads key/value
// head h / (Hq / Hkv). The output row (b, h, i) starts at out + b * o_sb + h * o_sh + i * o_sl (its
// Ev features contiguous; the ops' outputs are contiguous (B, Hq, L, Ev), the varlen op's
// (T, Hq, Ev)); lse is contiguous (B, Hq, L) in the compute type, the natural-log log-sum-exp of
// each row's scaled logits (+inf for a row whose keys are all masked).
struct AttnTensor {
  const void* data;
  int64_t sb, sh, sl, se;  // strides of batch, head, position, feature
};

// Index: the type of the sizes (int64_t on the CPU; int on CUDA, whose kernels index in 32 bits).
// Real: the type of dropout_p (float on CUDA, where doubles are slow).
template <typename Index, typename Real>
struct AttnFwdArgsOf {
  DType dtype;
  AttnTensor q, k, v;
  void* out;
  int64_t o_sb, o_sh, o_sl;  // element strides of the output's batch, head and position
  void* lse;
  Index B, Hq, Hkv, L, S, E, Ev;
  MaskKind mask_kind;
  const void* mask;  // bool (uint8) or additive (compute type), broadcast to (B, Hq, L, S) by its strides
  int64_t m_sb, m_sh, m_sl, m_ss;
  bool causal;  // top-left aligned: query i keeps key j <= i
  double scale;
  Real dropout_p;
  uint64_t seed;
};

template <typename Index, typename Real>
struct AttnBwdArgsOf {
  AttnFwdArgsOf<Index, Real> fwd;  // inputs as in the forward (out and lse are read)
  AttnTensor grad_out;             // (B, Hq, L, Ev)
  void* grad_q;                    // contiguous (B, Hq, L, E)
  void* grad_k;                    // contiguous (B, Hkv, S, E)
  void* grad_v;                    // contiguous (B, Hkv, S, Ev)
};

// Paged attention (inference): packed queries q (T, Hq, E) of B sequences against key/value caches
// (num_blocks, Hkv, block_size, E) read through block tables. Sequence b owns the query rows
// [query_start[b], query_start[b + 1]) (q_len_b of them) and a context of seq_lens[b] tokens, token j
// in block block_tables[b * bt_stride + j / block_size] at offset j % block_size; its queries are the
// last q_len_b positions of the context and attend causally (bottom-right aligned). out is contiguous
// (T, Hq, E). The index arrays are int64 on the kernel's device (their values checked on the CPU).
struct PagedAttnArgs {
  DType dtype;
  const void* q;
  int64_t q_st, q_sh, q_se;  // element strides of the query's token, head and feature
  const void* k_cache;
  const void* v_cache;
  int64_t kc_sb, kc_sh, kc_sl, kc_se;  // element strides of the key cache's block, head, offset, feature
  int64_t vc_sb, vc_sh, vc_sl, vc_se;
  const int64_t* block_tables;  // (B, bt_stride)
  int64_t bt_stride;
  const int64_t* seq_lens;      // (B,)
  const int64_t* query_start;   // (B + 1,)
  void* out;
  int64_t B, T, Hq, Hkv, E, block_size, num_blocks;
  int64_t max_q_len;  // the most query rows of a sequence (CPU)
  double scale;
};

}  // namespace fusedformer
