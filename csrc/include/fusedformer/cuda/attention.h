// Interface between the ATen glue of the CUDA attention ops (csrc/cuda/attention.cu) and the
// attention kernels, which live in kernel-only translation units (no torch header) so that the
// heavy template instantiations compile in parallel:
//   attention_fwd_hdim{64,128,256}.cu / attention_bwd_hdim*.cu  tensor-core kernels (bf16, fp16)
//   attention_decode.cu                                          few query rows, long key/value cache
//   attention_simt.cu                                            any dtype (float32, float64) and layout
// Launchers return the launch status (cudaGetLastError()); the glue checks it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fusedformer/cuda/common.cuh"

namespace fusedformer::cuda {

// The shared argument structs (fusedformer/kernel_types.h) with 32-bit sizes and a float dropout_p.
using AttnFwdParams = AttnFwdArgsOf<int, float>;

// ... and the workspaces of the CUDA backward (compute type; float32 for bf16/fp16):
struct AttnBwdParams : AttnBwdArgsOf<int, float> {
  const void* dvec;  // (B, Hq, L): rowsum(grad_out * out)
  const void* lse2;  // (B, Hq, L): lse * log2(e) (tensor-core path)
  void* dq_accum;    // (B, Hq, L, E) zeroed: dQ / scale, accumulated over key blocks
  int* dq_locks;     // (B, Hq, ceil(L / 64)) zeroed, or null: with locks the key blocks add to dQ in order
};

// The mask's (L, S) slice of (batch b, query head h), addressed by m_sl / m_ss; nullptr without a
// mask. C: the compute type of an additive mask.
template <typename C>
__device__ __forceinline__ const void* mask_slice(const AttnFwdParams& p, int b, int h) {
  const int64_t off = int64_t(b) * p.m_sb + int64_t(h) * p.m_sh;
  if (p.mask_kind == MaskKind::Bool) return static_cast<const uint8_t*>(p.mask) + off;
  if (p.mask_kind == MaskKind::Float) return static_cast<const C*>(p.mask) + off;
  return nullptr;
}

// Tensor-core kernels: bf16/fp16, E and Ev multiples of 8 and at most 256, unit feature stride,
// 16-byte aligned rows. `general` instantiations handle masks and dropout.
int tc_head_dim_bucket(int E, int Ev);                 // 64, 128 or 256
int attention_tc_smem(int bucket, bool backward);      // bytes of shared memory a block needs
cudaError_t attention_fwd_tc(const AttnFwdParams& p, cudaStream_t stream);
cudaError_t attention_bwd_tc(const AttnBwdParams& p, cudaStream_t stream);
// per bucket (one translation unit each)
cudaError_t attention_fwd_tc64(const AttnFwdParams& p, cudaStream_t stream);
cudaError_t attention_fwd_tc128(const AttnFwdParams& p, cudaStream_t stream);
cudaError_t attention_fwd_tc256(const AttnFwdParams& p, cudaStream_t stream);
cudaError_t attention_bwd_tc64(const AttnBwdParams& p, cudaStream_t stream);
cudaError_t attention_bwd_tc128(const AttnBwdParams& p, cudaStream_t stream);
cudaError_t attention_bwd_tc256(const AttnBwdParams& p, cudaStream_t stream);
// rows of a query block of the tensor-core backward (the dq_locks granularity)
inline constexpr int kTcBwdBlockM = 64;

// Decode: few query rows (L * Hq / Hkv <= kDecodeMaxRows) against many keys, split along the keys
// into `splits` chunks whose partial results (workspace: splits * B * Hq * L * (Ev + 2) floats)
// are merged by a second kernel. Any dtype; unit feature stride and 16-byte aligned rows for the
// vectorized loads (else use the SIMT path).
inline constexpr int kDecodeMaxRows = 8;
int decode_splits(const AttnFwdParams& p, int sm_count);
cudaError_t attention_fwd_decode(const AttnFwdParams& p, int splits, float* workspace, cudaStream_t stream);
bool decode_supported(const AttnFwdParams& p);

// SIMT kernels for any dtype and layout (float32 and float64 go here): forward, and a
// deterministic backward (one kernel for dK/dV per key block, one for dQ per query block).
cudaError_t attention_fwd_simt(const AttnFwdParams& p, cudaStream_t stream);
cudaError_t attention_bwd_simt(const AttnBwdParams& p, cudaStream_t stream);
// dvec = rowsum(grad_out * out) and (when lse2 is given) lse2 = lse * log2(e), per query row
cudaError_t attention_bwd_prepare(const AttnBwdParams& p, cudaStream_t stream);

}  // namespace fusedformer::cuda
