// Dispatch of the tensor-core attention kernels to their head-dim buckets (the kernels themselves
// are instantiated in attention_{fwd,bwd}_hdim*.cu).
#include "attention_tc.cuh"

namespace fusedformer::cuda {

int tc_head_dim_bucket(int E, int Ev) {
  const int e = E > Ev ? E : Ev;
  return e <= 64 ? 64 : e <= 128 ? 128 : 256;
}

int attention_tc_smem(int bucket, bool backward) {
  switch (bucket) {
    case 64:
      return backward ? BwdTraits<64>::kSmem : FwdTraits<64>::kSmem;
    case 128:
      return backward ? BwdTraits<128>::kSmem : FwdTraits<128>::kSmem;
    default:
      return backward ? BwdTraits<256>::kSmem : FwdTraits<256>::kSmem;
  }
}

cudaError_t attention_fwd_tc(const AttnFwdParams& p, cudaStream_t stream) {
  switch (tc_head_dim_bucket(p.E, p.Ev)) {
    case 64:
      return attention_fwd_tc64(p, stream);
    case 128:
      return attention_fwd_tc128(p, stream);
    default:
      return attention_fwd_tc256(p, stream);
  }
}

cudaError_t attention_bwd_tc(const AttnBwdParams& p, cudaStream_t stream) {
  switch (tc_head_dim_bucket(p.fwd.E, p.fwd.Ev)) {
    case 64:
      return attention_bwd_tc64(p, stream);
    case 128:
      return attention_bwd_tc128(p, stream);
    default:
      return attention_bwd_tc256(p, stream);
  }
}

}  // namespace fusedformer::cuda
