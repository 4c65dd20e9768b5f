// Dispatch of the tensor-core attention kernels to their head-dim buckets (the kernels themselves
// are instantiated in attention_{fwd,bwd}_hdim*.cu).
#include <type_traits>

#include "attention_tc.cuh"

namespace fusedformer::cuda {

int tc_head_dim_bucket(int E, int Ev) {
  const int e = E > Ev ? E : Ev;
  return e <= 64 ? 64 : e <= 128 ? 128 : 256;
}

namespace {

// f64, f128 or f256 by the head-dim bucket (tc_head_dim_bucket)
template <typename R, typename... A>
R by_bucket(int bucket, R (*f64)(A...), R (*f128)(A...), R (*f256)(A...), std::type_identity_t<A>... args) {
  return bucket == 64 ? f64(args...) : bucket == 128 ? f128(args...) : f256(args...);
}

template <int D>
int smem(bool backward) {
  return backward ? BwdTraits<D>::kSmem : FwdTraits<D>::kSmem;
}

}  // namespace

int attention_tc_smem(int bucket, bool backward) {
  return by_bucket(bucket, &smem<64>, &smem<128>, &smem<256>, backward);
}

cudaError_t attention_fwd_tc(const AttnFwdParams& p, cudaStream_t stream) {
  return by_bucket(tc_head_dim_bucket(p.E, p.Ev), &attention_fwd_tc64, &attention_fwd_tc128, &attention_fwd_tc256, p,
                   stream);
}

cudaError_t attention_bwd_tc(const AttnBwdParams& p, cudaStream_t stream) {
  return by_bucket(tc_head_dim_bucket(p.fwd.E, p.fwd.Ev), &attention_bwd_tc64, &attention_bwd_tc128,
                   &attention_bwd_tc256, p, stream);
}

}  // namespace fusedformer::cuda
