// CPU linear layer for few rows: y = x W^T + b with W (N, K) in nn.Linear's layout.
//
// With few rows (generation: one token per sequence, a few sequences) the product is a stream over
// the weights: each weight element is used M times, so the time is the time to read W. General
// matrix-multiply libraries pack W first or take a matrix-vector path that does not reach memory
// speed; this kernel reads W once, in place, in its storage type (bfloat16 and float16 weights are
// read at half the bytes and widened in registers), against all rows of x at once.
//
// Register tile: MR rows of x x NR rows of W, each accumulator a vector of partial sums along K,
// reduced across lanes at the end. Work is split over threads by blocks of W rows; a block small
// enough to stay in the L2 cache is reused by every group of MR rows of x.
#include <algorithm>
#include <array>
#include <memory>

#include "fusedformer/cpu/vec.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

#if defined(__AVX512F__) || defined(__AVX2__)
constexpr int kMR = 4, kNR = 3;
#else
constexpr int kMR = 2, kNR = 2;  // generic 16-lane vectors take four SSE registers each
#endif
// Bytes of W per block (kept in L2 while the row groups of x pass over it).
constexpr int64_t kBlockBytes = 160 << 10;
// Tiles ahead whose W rows are prefetched.
constexpr int kPrefetchTiles = 2;

// out[i][j] = sum_k x_i[k] * w_j[k] for MR rows x_i (compute type, contiguous K) and NR rows w_j
// (storage type). Lanes past K are handled by a scalar tail.
template <int MR, int NR, typename T, typename C>
FF_INLINE void tile(const C* const* x, const T* const* w, const T* const* next, int64_t K, C (*out)[kNR]) {
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  // small tiles keep two accumulator sets (even and odd vectors along K), so that enough
  // independent chains hide the latency of the multiply-add
  constexpr int U = MR * NR < 8 ? 2 : 1;
  V acc[U][MR][NR];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[u][i][j] = V{};
  const int64_t Kv = K - K % (U * N);
  for (int64_t k = 0; k < Kv; k += U * N) {
    // the W rows of a tile ahead, as many cache lines per row as this step reads, so that they
    // stream in from memory while this tile computes. Into L2 (prefetcht1), not non-temporal: on
    // Intel cores prefetchnta fills L1 through the line fill buffers and bypasses the L2 streamer,
    // which cut this loop to a third of memory speed (4 GB/s against 12 on a Xeon with AVX-512)
    constexpr int64_t kLine = 64 / int64_t(sizeof(T));  // elements per cache line
    if (k % kLine < U * N)
      for (int64_t o = 0; o < U * N; o += kLine)
        for (int j = 0; j < NR; ++j) __builtin_prefetch(next[j] + k + o, 0, 2);
    for (int u = 0; u < U; ++u) {
      V wv[NR];
      for (int j = 0; j < NR; ++j) wv[j] = vload(w[j] + k + u * N);
      for (int i = 0; i < MR; ++i) {
        const V xv = vload(x[i] + k + u * N);
        for (int j = 0; j < NR; ++j) acc[u][i][j] += xv * wv[j];
      }
    }
  }
  if constexpr (U == 2)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[0][i][j] += acc[1][i][j];
  // lane sums, N accumulators at a time
  constexpr int P = MR * NR;
  constexpr int G = (P + N - 1) / N;
  C sums[G * N];
  for (int g = 0; g < G; ++g) {
    V a[N];
    for (int t = 0; t < N; ++t) {
      const int p = g * N + t;
      a[t] = p < P ? acc[0][p / NR][p % NR] : V{};
    }
    vstore(sums + g * N, reduce_lanes<C>(a));
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      C s = sums[i * NR + j];
      for (int64_t k = Kv; k < K; ++k) s += x[i][k] * C(to_float(w[j][k]));
      out[i][j] = s;
    }
}

template <int MR, int NR, typename T, typename C>
void tile_store(const LinearArgs& a, const C* xc, int64_t m, int64_t n) {
  const C* xr[MR];
  const T* wr[NR];
  for (int i = 0; i < MR; ++i) xr[i] = xc + (m + i) * a.K;
  const T* nx[NR];
  for (int j = 0; j < NR; ++j) {
    wr[j] = static_cast<const T*>(a.w) + (n + j) * a.K;
    nx[j] = static_cast<const T*>(a.w) + std::min(n + kPrefetchTiles * NR + j, a.N - 1) * a.K;
  }
  C out[kMR][kNR];
  tile<MR, NR, T, C>(xr, wr, nx, a.K, out);
  T* y = static_cast<T*>(a.y);
  const T* b = static_cast<const T*>(a.bias);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      C v = out[i][j];
      if (b) v += C(to_float(b[n + j]));
      y[(m + i) * a.N + n + j] = to_storage<T>(v);
    }
}

// The tile for MR' <= kMR rows of x and NR' <= kNR rows of W, chosen at run time.
template <typename T, typename C>
using TileFn = void (*)(const LinearArgs&, const C*, int64_t, int64_t);

template <typename T, typename C, int MR, int... NRs>
constexpr auto row_of_tiles(std::integer_sequence<int, NRs...>) {
  return std::array<TileFn<T, C>, sizeof...(NRs)>{&tile_store<MR, NRs + 1, T, C>...};
}
template <typename T, typename C, int... MRs>
constexpr auto table_of_tiles(std::integer_sequence<int, MRs...>) {
  return std::array<std::array<TileFn<T, C>, kNR>, sizeof...(MRs)>{
      row_of_tiles<T, C, MRs + 1>(std::make_integer_sequence<int, kNR>{})...};
}

template <typename T>
void run(const LinearArgs& a) {
  using C = compute_t<T>;
  const int64_t M = a.M, N = a.N, K = a.K;
  // x in the compute type, rows contiguous (read in place when it already is)
  std::unique_ptr<C[]> xbuf;
  const C* xc;
  if constexpr (std::is_same_v<T, C>) {
    if (a.ldx == K) {
      xc = static_cast<const C*>(a.x);
    } else {
      xbuf.reset(new C[M * K]);
      for (int64_t i = 0; i < M; ++i) std::copy_n(static_cast<const T*>(a.x) + i * a.ldx, K, xbuf.get() + i * K);
      xc = xbuf.get();
    }
  } else {
    xbuf.reset(new C[M * K]);
    for (int64_t i = 0; i < M; ++i) {
      const T* src = static_cast<const T*>(a.x) + i * a.ldx;
      for (int64_t k = 0; k < K; ++k) xbuf[i * K + k] = to_float(src[k]);
    }
    xc = xbuf.get();
  }
  static constexpr auto tiles = table_of_tiles<T, C>(std::make_integer_sequence<int, kMR>{});
  // rows of W per block: a multiple of kNR, within kBlockBytes (at least one tile)
  const int64_t row_bytes = K * int64_t(sizeof(T));
  int64_t nb = std::max<int64_t>(kNR, kBlockBytes / std::max<int64_t>(row_bytes, 1) / kNR * kNR);
  // enough blocks for every thread when W is small
  const int64_t threads = num_threads();
  if (threads > 1) nb = std::min(nb, std::max<int64_t>(kNR, (N + 4 * threads - 1) / (4 * threads) / kNR * kNR));
  const int64_t blocks = (N + nb - 1) / nb;
  parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * nb, n1 = std::min(N, n0 + nb);
      for (int64_t m = 0; m < M; m += kMR) {
        const int mr = int(std::min<int64_t>(kMR, M - m));
        for (int64_t n = n0; n < n1; n += kNR) {
          const int nr = int(std::min<int64_t>(kNR, n1 - n));
          tiles[mr - 1][nr - 1](a, xc, m, n);
        }
      }
    }
  });
}

}  // namespace

void linear_fwd(const LinearArgs& a) {
  if (a.M == 0 || a.N == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) { run<decltype(tag)>(a); });
}

}  // namespace fusedformer::cpu::FF_ISA
