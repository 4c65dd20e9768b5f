// Tensor-core attention backward, head dims padded to 128 (bf16 and fp16; plain and general).
#include "attention_tc.cuh"

namespace fusedformer::cuda {

cudaError_t attention_bwd_tc128(const AttnBwdParams& p, cudaStream_t stream) {
  return attention_bwd_tc_bucket<128>(p, stream);
}

}  // namespace fusedformer::cuda
