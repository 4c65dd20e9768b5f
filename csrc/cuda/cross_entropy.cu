// cross_entropy_rows for the CUDA dispatch key: the op is common/cross_entropy.h's, over the kernel
// below, a block per row.
#include <torch/library.h>

#include <algorithm>

#include "common/cross_entropy.h"
#include "fusedformer/cuda/device.h"
#include "softmax_kernels.cuh"

namespace fusedformer::cuda {
namespace {

constexpr int kMaxBlock = 1024;

// Cross-entropy rows (the loss of linear_cross_entropy), a block per row: the online max/sum pass of
// the long-row softmax gives lse = max + ln(sum); loss = lse - x[target] and, with grad, the gradient
// row (softmax - one_hot) * scale. Rows whose target is ignore_index: loss 0, zero gradient.
template <typename T>
__global__ void cross_entropy_rows_kernel(CrossEntropyArgs p) {
  using C = compute_t<T>;
  __shared__ C scratch[32];
  const int64_t r = blockIdx.x;
  const int team = blockDim.x;
  const T* x = static_cast<const T*>(p.x) + r * p.n;
  const BlockRowStats<C> st = block_row_stats<C>(p.n, team, scratch, [&](int64_t col) { return C(to_f(x[col])); });
  const C lse = st.nan ? c_nan<C>() : st.max + log(st.sum);
  const int64_t t = p.target[r];
  const bool keep = t != p.ignore_index;
  if (threadIdx.x == 0) static_cast<C*>(p.loss)[r] = keep ? lse - C(to_f(x[t])) : C(0);
  if (!p.grad) return;
  const C sc = keep ? *static_cast<const C*>(p.scale) : C(0);
  T* g = static_cast<T*>(p.grad) + r * p.n;
  for (int64_t col = threadIdx.x; col < p.n; col += team) {
    const C e = keep ? c_exp(C(to_f(x[col])) - lse) : C(0);
    g[col] = from_c<T>(e * sc - (col == t ? sc : C(0)));
  }
}

struct Cuda {
  static void cross_entropy(const at::Tensor& logits, const CrossEntropyArgs& p) {
    const c10::cuda::CUDAGuard guard(logits.device());
    const int block = static_cast<int>(std::min<int64_t>(kMaxBlock, (p.n + 31) / 32 * 32));
    const cudaStream_t stream = current_stream();
    dispatch_dtype(p.dtype, [&](auto tag) {
      cross_entropy_rows_kernel<decltype(tag)><<<p.rows, block, 0, stream>>>(p);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CUDA, m) { CrossEntropyOps<Cuda>::register_ops(m); }

}  // namespace fusedformer::cuda
