// Counter-based random numbers for attention dropout (Philox-4x32-10), the same function on the
// CPU and on CUDA: the keep/drop decision of an element depends only on (seed, batch*head, query
// row, key column), so the backward recomputes exactly the forward's mask, whatever the tiling.
#pragma once

#include <cstdint>

#include "fusedformer/kernel_types.h"  // FF_HOST_DEVICE

namespace fusedformer {

struct Philox4 {
  uint32_t v[4];
};

FF_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                     uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint64_t p0 = uint64_t(M0) * c0, p1 = uint64_t(M1) * c2;
    uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// 32 random bits for each of the four key columns 4*col4 .. 4*col4+3 of query row `row` in the
// (batch*heads) slice `bh`.
FF_HOST_DEVICE Philox4 dropout_bits4(uint64_t seed, uint64_t bh, uint32_t row, uint32_t col4) {
  return philox4x32_10(col4, row, uint32_t(bh), uint32_t(bh >> 32), uint32_t(seed), uint32_t(seed >> 32));
}

// Elements whose bits are below this are dropped (probability p).
FF_HOST_DEVICE uint32_t dropout_threshold(double p) {
  double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(t);
}

}  // namespace fusedformer
