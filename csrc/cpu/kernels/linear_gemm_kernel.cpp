// float32 matrix product for many rows: C = A B (+ bias), A (M, K) and B (K, N) with any strides,
// C (M, N) row-major. The linear op uses it for float32 above the few-rows kernel's range: the
// forward reads W^T through its strides, and the backward's input gradient is linear(g, W^T).
//
// Layout (the classic blocked scheme): B is copied in blocks of KC x NC into panels NR columns wide,
// shared by the threads; each thread copies MC x KC blocks of A into panels MR rows tall and runs
// the MR x NR register tile over them. A B panel (KC x NR) stays in L1 while the A panels of a
// block (MC x KC, in L2) pass over it. Tails are zero-padded in the copies, so the register tile
// always runs whole and only its store is cut to the valid rows and columns. The copies live in
// per-thread buffers kept between calls (at most KC x NC floats on the calling thread, MC x KC on
// each worker).
//
// With GemmArgs::bf16 on a CPU with AVX512-BF16 the copies round A and B to bfloat16, two values of
// consecutive k to a 32-bit word, and the register tile runs vdpbf16ps (each lane adds the two
// products of its pair to a float32 sum): the same tile at half the steps, float32 in and out.
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>

#include "fusedformer/cpu/vec.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

// register tile: MR rows x two vectors (2 x MR accumulators, two B vectors, one broadcast of A)
constexpr int MR = 6;
constexpr int NR = 2 * W;
constexpr int64_t KC = 384;        // at most: K is cut into equal blocks of up to KC
constexpr int64_t MC = 24 * MR;    // rows of an A block at most (216 KB)
constexpr int64_t NC = 96 * NR;    // a B block of KC x NC (4.5 MB with 8 lanes), shared by the threads

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// A per-thread buffer of at least n floats, 64-byte aligned, kept between calls.
float* scratch(int slot, int64_t n) {
  thread_local std::unique_ptr<float, FreeDeleter> buf[2];
  thread_local int64_t cap[2] = {0, 0};
  if (cap[slot] < n) {
    const int64_t bytes = (n * int64_t(sizeof(float)) + 63) / 64 * 64;
    buf[slot].reset(static_cast<float*>(std::aligned_alloc(64, size_t(bytes))));
    if (!buf[slot]) throw std::bad_alloc();
    cap[slot] = n;
  }
  return buf[slot].get();
}

// Copies B[p0 : p0+kc, j0 + q*NR : ...] for panels q in [q0, q1) of a block starting at column j0:
// panel q holds kc rows of NR values (zero past column n1).
void pack_b(const GemmArgs& g, int64_t p0, int64_t kc, int64_t j0, int64_t n1, int64_t q0, int64_t q1, float* bp) {
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t jb = j0 + q * NR;
    const int nr = int(std::min<int64_t>(NR, n1 - jb));
    float* dst = bp + q * kc * NR;
    if (g.b_column) {
      // the panel's columns into a column-major buffer, then written across the panel row by row
      alignas(64) float cols[NR][KC];
      for (int j = 0; j < NR; ++j) {
        if (j < nr)
          g.b_column(g.b_ctx, jb + j, p0, kc, cols[j]);
        else
          std::fill(cols[j], cols[j] + kc, 0.f);
      }
      for (int64_t k = 0; k < kc; ++k)
        for (int j = 0; j < NR; ++j) dst[k * NR + j] = cols[j][k];
      continue;
    }
    const float* src = g.b + p0 * g.rsb + jb * g.csb;
    if (g.csb == 1 && nr == NR) {
      for (int64_t k = 0; k < kc; ++k) {
        vstore(dst + k * NR, vload(src + k * g.rsb));
        vstore(dst + k * NR + W, vload(src + k * g.rsb + W));
      }
    } else if (g.rsb == 1) {
      // columns of B are contiguous (B = W^T): read each along k, write across the panel
      for (int j = 0; j < nr; ++j) {
        const float* col = src + j * g.csb;
        for (int64_t k = 0; k < kc; ++k) dst[k * NR + j] = col[k];
      }
      for (int j = nr; j < NR; ++j)
        for (int64_t k = 0; k < kc; ++k) dst[k * NR + j] = 0.f;
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int j = 0; j < NR; ++j) dst[k * NR + j] = j < nr ? src[k * g.rsb + j * g.csb] : 0.f;
    }
  }
}

// Copies A[i0 : i0+mc, p0 : p0+kc] into panels of MR rows: panel r holds kc columns of MR values
// (zero past row i0+mc).
void pack_a(const GemmArgs& g, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* ap) {
  for (int64_t r = 0; r * MR < mc; ++r) {
    const int mr = int(std::min<int64_t>(MR, mc - r * MR));
    float* dst = ap + r * MR * kc;
    const float* src = g.a + (i0 + r * MR) * g.rsa + p0 * g.csa;
    if (g.csa == 1) {
      const float* rows[MR];
      for (int i = 0; i < MR; ++i) rows[i] = src + std::min(i, mr - 1) * g.rsa;
      for (int64_t k = 0; k < kc; ++k)
        for (int i = 0; i < MR; ++i) dst[k * MR + i] = i < mr ? rows[i][k] : 0.f;
    } else if (g.rsa == 1 && mr == MR) {
      for (int64_t k = 0; k < kc; ++k)
        for (int i = 0; i < MR; ++i) dst[k * MR + i] = src[k * g.csa + i];
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int i = 0; i < MR; ++i) dst[k * MR + i] = i < mr ? src[i * g.rsa + k * g.csa] : 0.f;
    }
  }
}

// acc = sum over kc of (MR values of ap) x (NR values of bp)
FF_INLINE void tile(int64_t kc, const float* __restrict ap, const float* __restrict bp, vf (&acc)[MR][2]) {
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = vzero();
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const vf b0 = vload(bp), b1 = vload(bp + W);
    for (int i = 0; i < MR; ++i) {
      const vf a = vbroadcast(ap[i]);
      acc[i][0] += a * b0;
      acc[i][1] += a * b1;
    }
    ap += MR;
    bp += NR;
  }
}

// C[0 : mr, 0 : nr] = acc + (add ? C : bias)
FF_INLINE void store(const vf (&acc)[MR][2], float* c, int64_t ldc, int mr, int nr, bool add, const float* bias) {
  if (mr == MR && nr == NR) {
    vf b0 = vzero(), b1 = vzero();
    if (add) {
      for (int i = 0; i < MR; ++i) {
        float* p = c + i * ldc;
        vstore(p, acc[i][0] + vload(p));
        vstore(p + W, acc[i][1] + vload(p + W));
      }
      return;
    }
    if (bias) b0 = vload(bias), b1 = vload(bias + W);
    for (int i = 0; i < MR; ++i) {
      vstore(c + i * ldc, acc[i][0] + b0);
      vstore(c + i * ldc + W, acc[i][1] + b1);
    }
    return;
  }
  alignas(64) float t[MR][NR];
  for (int i = 0; i < MR; ++i) {
    vstore(t[i], acc[i][0]);
    vstore(t[i] + W, acc[i][1]);
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) c[i * ldc + j] = t[i][j] + (add ? c[i * ldc + j] : bias ? bias[j] : 0.f);
}

// The float32 panels: one element per k.
struct Float32Panels {
  static int64_t steps(int64_t kc) { return kc; }
  static void pack_b(const GemmArgs& g, int64_t p0, int64_t kc, int64_t j0, int64_t n1, int64_t q0, int64_t q1,
                     float* bp) {
    FF_ISA::pack_b(g, p0, kc, j0, n1, q0, q1, bp);
  }
  static void pack_a(const GemmArgs& g, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* ap) {
    FF_ISA::pack_a(g, i0, mc, p0, kc, ap);
  }
  static void tile(int64_t kc, const float* ap, const float* bp, vf (&acc)[MR][2]) { FF_ISA::tile(kc, ap, bp, acc); }
};

#if defined(__AVX512F__)
// Whether the CPU has AVX512-BF16 (vdpbf16ps), which GemmArgs::bf16 asks for.
bool has_bf16_dot() {
  static const bool v = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
  }();
  return v;
}

// Words of bfloat16 pairs from two float32 rows: lo[j] (round to nearest even) in the low half,
// hi[j] in the high half, the layout vdpbf16ps multiplies.
FF_INLINE vu bf16_pairs(vf lo, vf hi) {
  return __builtin_convertvector(to_bf16_bits(lo), vu) | (__builtin_convertvector(to_bf16_bits(hi), vu) << 16);
}

// Words of bfloat16 pairs from 2W consecutive float32 values x[0 : W], x[W : 2W]: word w holds
// values 2w (low half) and 2w + 1 (high half).
FF_INLINE vu bf16_pairs_along(vf x0, vf x1) {
  vh h0 = to_bf16_bits(x0), h1 = to_bf16_bits(x1);
  uint16_t both[2 * W];
  __builtin_memcpy(both, &h0, sizeof(h0));
  __builtin_memcpy(both + W, &h1, sizeof(h1));
  vu words;
  __builtin_memcpy(&words, both, sizeof(words));
  return words;
}

// acc += for each lane, a.lo * b.lo + a.hi * b.hi (bfloat16 pairs), in float32. EVEX vdpbf16ps
// (AVX512-BF16), written in asm so that only callers that checked the CPU reach it.
FF_INLINE vf dot_bf16(vf acc, vu a, vu b) {
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// The bfloat16 panels: one 32-bit word per pair of k (kc rounded up to even, the odd row zero).
// Each panel is copied as a float32 panel first, by the float32 copies, then paired.
struct Bf16Panels {
  static int64_t steps(int64_t kc) { return (kc + 1) / 2; }
  static void pack_b(const GemmArgs& g, int64_t p0, int64_t kc, int64_t j0, int64_t n1, int64_t q0, int64_t q1,
                     float* bp) {
    alignas(64) float panel[(KC + 1) * NR];
    uint32_t* out = reinterpret_cast<uint32_t*>(bp);
    for (int64_t q = q0; q < q1; ++q) {
      FF_ISA::pack_b(g, p0, kc, j0 + q * NR, n1, 0, 1, panel);
      std::fill(panel + kc * NR, panel + (kc + 1) * NR, 0.f);
      vu* dst = reinterpret_cast<vu*>(out + q * steps(kc) * NR);
      for (int64_t k2 = 0; k2 < steps(kc); ++k2) {
        const float* lo = panel + 2 * k2 * NR;
        *dst++ = bf16_pairs(vload(lo), vload(lo + NR));
        *dst++ = bf16_pairs(vload(lo + W), vload(lo + NR + W));
      }
    }
  }
  static void pack_a(const GemmArgs& g, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* ap) {
    alignas(64) float panel[(KC + 1) * MR];
    uint32_t* out = reinterpret_cast<uint32_t*>(ap);
    for (int64_t r = 0; r * MR < mc; ++r) {
      const int mr = int(std::min<int64_t>(MR, mc - r * MR));
      if (g.csa == 1 && kc % (2 * W) == 0) {
        // rows along k in memory: a row's bfloat16 values, read as 32-bit words, are its pairs
        uint32_t* dst = out + r * MR * steps(kc);
        for (int i = 0; i < MR; ++i) {
          const float* row = g.a + (i0 + r * MR + std::min(i, mr - 1)) * g.rsa + p0;
          for (int64_t k = 0; k < kc; k += 2 * W) {
            const vu words = i < mr ? bf16_pairs_along(vload(row + k), vload(row + k + W)) : vu{};
            for (int w = 0; w < W; ++w) dst[(k / 2 + w) * MR + i] = words[w];
          }
        }
        continue;
      }
      FF_ISA::pack_a(g, i0 + r * MR, mr, p0, kc, panel);
      std::fill(panel + kc * MR, panel + (kc + 1) * MR, 0.f);
      uint32_t* dst = out + r * MR * steps(kc);
      for (int64_t k2 = 0; k2 < steps(kc); ++k2)
        for (int i = 0; i < MR; ++i)
          dst[k2 * MR + i] = uint32_t(float_to_bf16(panel[2 * k2 * MR + i])) |
                             uint32_t(float_to_bf16(panel[(2 * k2 + 1) * MR + i])) << 16;
    }
  }
  static void tile(int64_t kc, const float* ap, const float* bp, vf (&acc)[MR][2]) {
    const uint32_t* a = reinterpret_cast<const uint32_t*>(ap);
    const vu* b = reinterpret_cast<const vu*>(bp);
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = vzero();
#pragma GCC unroll 4
    for (int64_t k2 = 0; k2 < steps(kc); ++k2) {
      const vu b0 = b[0], b1 = b[1];
      for (int i = 0; i < MR; ++i) {
        const vu x = vu{} + a[i];
        acc[i][0] = dot_bf16(acc[i][0], x, b0);
        acc[i][1] = dot_bf16(acc[i][1], x, b1);
      }
      a += MR;
      b += 2;
    }
  }
};
#endif

template <class Panels>
void blocked(const GemmArgs& g) {
  const int64_t M = g.M, N = g.N, K = g.K;
  const int64_t threads = num_threads();
  const int64_t nc_max = std::min(NC, (N + NR - 1) / NR * NR);
  // equal K blocks; row blocks of equal size (whole register tiles), as many as a multiple of the
  // threads, so that no thread waits for another at the end of a K block
  const int64_t kblocks = (K + KC - 1) / KC, kcb = (K + kblocks - 1) / kblocks;
  float* bp = scratch(0, kcb * nc_max);
  int64_t mblocks = (M + MC - 1) / MC;
  if (mblocks > 1) mblocks = (mblocks + threads - 1) / threads * threads;
  const int64_t mcb = ((M + mblocks - 1) / mblocks + MR - 1) / MR * MR;
  mblocks = (M + mcb - 1) / mcb;
  for (int64_t jc = 0; jc < N; jc += NC) {
    const int64_t nc = std::min(NC, N - jc), n1 = jc + nc;
    const int64_t panels = (nc + NR - 1) / NR;
    // with few row blocks the panels are split into groups too, so that every thread has work
    const int64_t groups = std::min(panels, std::max<int64_t>(1, (2 * threads + mblocks - 1) / mblocks));
    const int64_t per_group = (panels + groups - 1) / groups;
    for (int64_t pc = 0; pc < K; pc += kcb) {
      const int64_t kc = std::min(kcb, K - pc);
      parallel_for(0, panels, 8, [&](int64_t q0, int64_t q1) { Panels::pack_b(g, pc, kc, jc, n1, q0, q1, bp); });
      const bool add = pc > 0;
      parallel_for(0, mblocks * groups, 1, [&](int64_t t0, int64_t t1) {
        float* ap = scratch(1, mcb * kcb);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i0 = (t / groups) * mcb, mc = std::min(mcb, M - i0);
          const int64_t qa = (t % groups) * per_group, qb = std::min(panels, qa + per_group);
          if (qa >= qb) continue;
          Panels::pack_a(g, i0, mc, pc, kc, ap);
          for (int64_t q = qa; q < qb; ++q) {
            const int64_t j = jc + q * NR;
            const int nr = int(std::min<int64_t>(NR, n1 - j));
            const float* bq = bp + q * Panels::steps(kc) * NR;
            const float* bias = g.bias ? g.bias + j : nullptr;
            for (int64_t r = 0; r * MR < mc; ++r) {
              const int mr = int(std::min<int64_t>(MR, mc - r * MR));
              float* c = g.c + (i0 + r * MR) * g.ldc + j;
              // the C rows the store reads and writes come from memory while the tile computes
              for (int i = 0; i < mr; ++i) {
                __builtin_prefetch(c + i * g.ldc, 1, 3);
                __builtin_prefetch(c + i * g.ldc + nr - 1, 1, 3);
              }
              vf acc[MR][2];
              Panels::tile(kc, ap + r * MR * Panels::steps(kc), bq, acc);
              store(acc, c, g.ldc, mr, nr, add, bias);
            }
          }
        }
      });
    }
  }
}

}  // namespace

void gemm(const GemmArgs& g) {
  if (g.M == 0 || g.N == 0) return;
  if (g.K == 0) {
    for (int64_t i = 0; i < g.M; ++i)
      for (int64_t j = 0; j < g.N; ++j) g.c[i * g.ldc + j] = g.bias ? g.bias[j] : 0.f;
    return;
  }
#if defined(__AVX512F__)
  if (g.bf16 && has_bf16_dot()) return blocked<Bf16Panels>(g);
#endif
  blocked<Float32Panels>(g);
}

}  // namespace fusedformer::cpu::FF_ISA
