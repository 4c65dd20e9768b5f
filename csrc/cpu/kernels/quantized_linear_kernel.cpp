// CPU linear layer with quantized weights: y = x dequant(W)^T + b (formats: QuantScheme, and the
// layouts at the schema in csrc/registration.cpp).
//
// Few rows (generation): the product is a stream over the weights, so its time is the time to read
// the packed bytes. The weights are read once, in place, against all rows of x at once, widened and
// scaled in registers: a register tile of MR rows of x by NR rows of W, the W rows blocked so that a
// block stays in L2 while the row groups of x pass over it (as the float kernel, linear_kernel.cpp).
//
// Many rows (prefill): the blocked float32 product of linear_gemm_kernel.cpp (gemm), which copies W
// into panels anyway: it dequantizes as it copies (GemmArgs::b_column), so the arithmetic runs at the
// float product's speed and the weights are read once per call, in their packed bytes.
//
// int8_dynamic: each row of x is quantized to int8 (scale max|x| / 127, round to nearest) and the
// products are int8 x int8 summed in int32 (exact), scaled by the row and channel scales at the end.
// On x86 the dot products take 32 bytes at a time with the sign trick: x . w = |x| . (sign(x) w),
// the unsigned-by-signed byte product that AVX512-VNNI's vpdpbusd sums straight into int32 lanes and
// AVX2's vpmaddubsw / vpmaddwd in two steps (no saturation: |x|, |w| <= 127 and 2 x 127 x 127 < 2^15).
#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>

#include "fusedformer/cpu/vec.h"

namespace fusedformer::cpu::FF_ISA {

// the blocked float32 product of this instruction set (linear_gemm_kernel.cpp)
void gemm(const GemmArgs& g);

namespace {

// Rows up to which the weights are streamed; above, dequantized panels go through the float product.
constexpr int64_t kFewRows = 16;
#if defined(__AVX512F__)
constexpr int kMR = 4, kNR = 3, kNR1 = 8;
#elif defined(__AVX2__)
constexpr int kMR = 4, kNR = 3, kNR1 = 6;
#else
constexpr int kMR = 2, kNR = 2, kNR1 = 4;
#endif
// kNR1: the tile's W rows when x has one row (decoding at batch 1): with no rows of x to share a
// widened W vector, more independent sums keep the FMA units busy (the widening is the cost)
constexpr int kNRMax = kNR1 > kNR ? kNR1 : kNR;
// Bytes of packed W per block (kept in L2 while the row groups of x pass over it).
constexpr int64_t kBlockBytes = 160 << 10;
// Tiles ahead whose W rows are prefetched.
constexpr int kPrefetchTiles = 2;
// int4 values come in blocks of 32 (16 bytes): byte j holds element j (low nibble) and j + 16 (high).
constexpr int kBlock4 = 32;

typedef int8_t vs8 __attribute__((vector_size(W)));

FF_INLINE int64_t row_bytes(const QuantLinearArgs& a) { return is_4bit(a.scheme) ? a.K / 2 : a.K; }

// element k of row n of W, dequantized in double (exact: a small integer times a float32)
double qvalue(const QuantLinearArgs& a, int64_t n, int64_t k) {
  if (is_4bit(a.scheme)) {
    const uint8_t* row = static_cast<const uint8_t*>(a.qw) + n * (a.K / 2);
    const int64_t j = k % kBlock4;
    const uint8_t b = row[(k - j) / 2 + (j & 15)];
    const float level = levels4(a.scheme).v[j < 16 ? (b & 15) : (b >> 4)];
    return double(level) * double(a.scale[n * (a.K / a.group_size) + k / a.group_size]);
  }
  return double(static_cast<const int8_t*>(a.qw)[n * a.K + k]) * double(a.scale[n]);
}

// W int8 values from p, as floats
FF_INLINE vf load8(const int8_t* p) {
  // GCC lowers the generic int8 -> float vector conversion byte by byte; the x86 builds sign-extend
  // in one instruction
#if defined(__AVX512F__)
  return vf(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  return vf(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  vs8 b;
  __builtin_memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(__builtin_convertvector(b, vi), vf);
#endif
}
// One W row's 4-bit values, dequantized: set_scale(levels, s) at each group, then part(p, s) is the
// s-th vector (elements s * W .. s * W + W - 1) of the 32-value block at p (16 bytes) times the group's
// scale, for s < kBlock4 / W. The scheme's 16 levels (Levels4) times the group's scale are a table that a
// nibble indexes: with AVX-512 one register and one permute (vpermps reads the low 4 bits of each
// lane), a widening of the 16 bytes, one shift and two permutes per 32 values; with AVX2 two 8-lane
// halves, a permute of each and a blend on the nibble's bit 3; elsewhere a lookup per lane. The
// unscaled levels (Table4) are loaded once per call.
#if defined(__AVX512F__)
static_assert(W == 16, "one 512-bit vector holds 16 floats");
struct Table4 {
  __m512 v;
  explicit Table4(const Levels4& l) : v(_mm512_loadu_ps(l.v)) {}
};
struct Int4Row {
  __m512 table;
  FF_INLINE void set_scale(const Table4& l, float s) { table = _mm512_mul_ps(l.v, _mm512_set1_ps(s)); }
  FF_INLINE vf part(const uint8_t* p, int s) const {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return vf(_mm512_permutexvar_ps(s ? _mm512_srli_epi32(b, 4) : b, table));
  }
};
#elif defined(__AVX2__)
static_assert(W == 8, "one 256-bit vector holds 8 floats");
struct Table4 {
  __m256 lo, hi;
  explicit Table4(const Levels4& l) : lo(_mm256_loadu_ps(l.v)), hi(_mm256_loadu_ps(l.v + 8)) {}
};
struct Int4Row {
  __m256 lo, hi;
  FF_INLINE void set_scale(const Table4& l, float s) {
    lo = _mm256_mul_ps(l.lo, _mm256_set1_ps(s));
    hi = _mm256_mul_ps(l.hi, _mm256_set1_ps(s));
  }
  FF_INLINE vf part(const uint8_t* p, int s) const {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + (s & 1) * 8)));
    const __m256i c = s >> 1 ? _mm256_srli_epi32(b, 4) : _mm256_and_si256(b, _mm256_set1_epi32(15));
    // vpermps reads the low 3 bits; bit 3 (moved to the sign) picks the half
    return vf(_mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, c), _mm256_permutevar8x32_ps(hi, c),
                               _mm256_castsi256_ps(_mm256_slli_epi32(c, 28))));
  }
};
#else
struct Table4 {
  const float* v;
  explicit Table4(const Levels4& l) : v(l.v) {}
};
struct Int4Row {
  float table[16];
  FF_INLINE void set_scale(const Table4& l, float s) {
    for (int c = 0; c < 16; ++c) table[c] = l.v[c] * s;
  }
  FF_INLINE vf part(const uint8_t* p, int s) const {
    constexpr int per_half = 16 / W;  // vectors per 16 elements
    vf r;
    for (int i = 0; i < W; ++i) {
      const uint8_t b = p[(s % per_half) * W + i];
      r[i] = table[s / per_half ? b >> 4 : b & 15];
    }
    return r;
  }
};
#endif

// Elements k0 .. k0 + kc - 1 of row n of W dequantized into dst: the many-rows product's column
// source (GemmArgs::b_column, ctx the QuantLinearArgs).
void dequant_segment(const void* ctx, int64_t n, int64_t k0, int64_t kc, float* dst) {
  const QuantLinearArgs& a = *static_cast<const QuantLinearArgs*>(ctx);
  const int64_t K = a.K, k1 = k0 + kc;
  if (is_4bit(a.scheme)) {
    const uint8_t* row = static_cast<const uint8_t*>(a.qw) + n * (K / 2);
    const float* s = a.scale + n * (K / a.group_size);
    // whole 32-value blocks, the ones the segment cuts through the first and last
    const Table4 levels(levels4(a.scheme));
    Int4Row r;
    for (int64_t b = k0 - k0 % kBlock4; b < k1; b += kBlock4) {
      if (b == k0 - k0 % kBlock4 || b % a.group_size == 0) r.set_scale(levels, s[b / a.group_size]);
      alignas(64) float v[kBlock4];
      for (int s4 = 0; s4 < kBlock4 / W; ++s4) vstore(v + s4 * W, r.part(row + b / 2, s4));
      for (int64_t k = std::max(b, k0); k < std::min(b + kBlock4, k1); ++k) dst[k - k0] = v[k - b];
    }
    return;
  }
  const int8_t* row = static_cast<const int8_t*>(a.qw) + n * K;
  const float s = a.scale[n];
  const vf sv = vset1(s);
  int64_t k = k0;
  for (; k + W <= k1; k += W) vstore(dst + k - k0, load8(row + k) * sv);
  for (; k < k1; ++k) dst[k - k0] = float(row[k]) * s;
}

// out[i][j] = x_i . dequant(w_{n+j}) for MR rows x_i (float, contiguous K) and NR rows of W.
template <QuantScheme S, int MR, int NR>
FF_INLINE void tile(const QuantLinearArgs& a, const float* const* x, int64_t n, float (*out)[kNRMax]) {
  const int64_t K = a.K;
  vf acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vf{};
  const int64_t ahead = std::min(n + kPrefetchTiles * NR, a.N - NR);
  if constexpr (S == QuantScheme::Int4) {
    const int64_t G = K / a.group_size;
    const uint8_t* w[NR];
    const uint8_t* next[NR];
    for (int j = 0; j < NR; ++j) {
      w[j] = static_cast<const uint8_t*>(a.qw) + (n + j) * (K / 2);
      next[j] = static_cast<const uint8_t*>(a.qw) + (ahead + j) * (K / 2);
    }
    const Table4 levels(levels4(a.scheme));
    Int4Row r[NR];
    for (int64_t k0 = 0; k0 < K; k0 += kBlock4) {
      if (k0 % a.group_size == 0)
        for (int j = 0; j < NR; ++j) r[j].set_scale(levels, a.scale[(n + j) * G + k0 / a.group_size]);
      // the W rows of a tile ahead stream in while this one computes (into L2, see linear_kernel.cpp)
      if (k0 % 128 == 0)
        for (int j = 0; j < NR; ++j) __builtin_prefetch(next[j] + k0 / 2, 0, 2);
#if defined(__AVX512F__)
      // a W row's two vectors at a time, used at once: the tile's rows each keep a table register
      for (int j = 0; j < NR; ++j) {
        const vf lo = r[j].part(w[j] + k0 / 2, 0), hi = r[j].part(w[j] + k0 / 2, 1);
        for (int i = 0; i < MR; ++i) {
          acc[i][j] += vload(x[i] + k0) * lo;
          acc[i][j] += vload(x[i] + k0 + W) * hi;
        }
      }
#else
      for (int s4 = 0; s4 < kBlock4 / W; ++s4) {
        vf wv[NR];
        for (int j = 0; j < NR; ++j) wv[j] = r[j].part(w[j] + k0 / 2, s4);
        for (int i = 0; i < MR; ++i) {
          const vf xv = vload(x[i] + k0 + s4 * W);
          for (int j = 0; j < NR; ++j) acc[i][j] += xv * wv[j];
        }
      }
#endif
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) out[i][j] = hsum(acc[i][j]);
  } else {
    const int8_t* w[NR];
    const int8_t* next[NR];
    for (int j = 0; j < NR; ++j) {
      w[j] = static_cast<const int8_t*>(a.qw) + (n + j) * K;
      next[j] = static_cast<const int8_t*>(a.qw) + (ahead + j) * K;
    }
    const int64_t Kv = K - K % W;
    for (int64_t k = 0; k < Kv; k += W) {
      if (k % 64 == 0)
        for (int j = 0; j < NR; ++j) __builtin_prefetch(next[j] + k, 0, 2);
      vf wv[NR];
      for (int j = 0; j < NR; ++j) wv[j] = load8(w[j] + k);
      for (int i = 0; i < MR; ++i) {
        const vf xv = vload(x[i] + k);
        for (int j = 0; j < NR; ++j) acc[i][j] += xv * wv[j];
      }
    }
    // per-channel scale once at the end
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) {
        float s = hsum(acc[i][j]);
        for (int64_t k = Kv; k < K; ++k) s += x[i][k] * float(w[j][k]);
        out[i][j] = s * a.scale[n + j];
      }
  }
}

// a tile's sums out[i][j] plus the bias into y (rows m.., channels n..) in the output dtype
template <typename T, int MR, int NR>
FF_INLINE void store_tile(const QuantLinearArgs& a, const float (*out)[kNRMax], int64_t m, int64_t n) {
  T* y = static_cast<T*>(a.y);
  const T* b = static_cast<const T*>(a.bias);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float v = out[i][j];
      if (b) v += to_float(b[n + j]);
      y[(m + i) * a.N + n + j] = from_float<T>(v);
    }
}

template <typename T, QuantScheme S, int MR, int NR>
void tile_store(const QuantLinearArgs& a, const float* xc, int64_t m, int64_t n) {
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = xc + (m + i) * a.K;
  float out[kMR][kNRMax];
  tile<S, MR, NR>(a, xr, n, out);
  store_tile<T, MR, NR>(a, out, m, n);
}

// f(rows, cols) for a tile of mr <= MR rows of x and nr <= NR rows of W, the counts passed as
// std::integral_constant (compile-time sizes for the register tiles, chosen at run time)
template <int MR, int NR, typename F>
FF_INLINE void with_tile_size(int mr, int nr, const F& f) {
  if constexpr (MR > 1)
    if (mr < MR) return with_tile_size<MR - 1, NR>(mr, nr, f);
  if constexpr (NR > 1)
    if (nr < NR) return with_tile_size<MR, NR - 1>(mr, nr, f);
  f(std::integral_constant<int, MR>{}, std::integral_constant<int, NR>{});
}

// an int32 sum of int8_dynamic's products as the output: x's row scale, W's channel scale, the bias
// (a float, or vectors of channels)
template <typename V>
FF_INLINE V dynamic_output(V sum, V x_scale, V w_scale, V bias) {
  return sum * x_scale * w_scale + bias;
}

// the tile for mr <= MR rows of x and nr <= NR rows of W, chosen at run time
template <typename T, QuantScheme S, int MR = kMR, int NR = kNR>
FF_INLINE void run_tile(int mr, int nr, const QuantLinearArgs& a, const float* xc, int64_t m, int64_t n) {
  with_tile_size<MR, NR>(mr, nr, [&](auto rows, auto cols) {
    tile_store<T, S, decltype(rows)::value, decltype(cols)::value>(a, xc, m, n);
  });
}

// Rows of x as contiguous float rows (in place when they already are).
template <typename T>
const float* rows_as_float(const QuantLinearArgs& a, std::unique_ptr<float[]>& buf) {
  const T* x = static_cast<const T*>(a.x);
  if constexpr (std::is_same_v<T, float>)
    if (a.ldx == a.K || a.M == 1) return x;
  buf.reset(new float[a.M * a.K]);
  float* dst = buf.get();
  parallel_for(0, a.M, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t k = 0; k < a.K; ++k) dst[i * a.K + k] = to_float(x[i * a.ldx + k]);
  });
  return dst;
}

// W rows per block: a multiple of nr within kBlockBytes, and enough blocks for every thread.
int64_t block_rows(const QuantLinearArgs& a, int64_t nr) {
  int64_t nb = std::max<int64_t>(nr, kBlockBytes / std::max<int64_t>(row_bytes(a), 1) / nr * nr);
  const int64_t threads = num_threads();
  if (threads > 1) nb = std::min(nb, std::max<int64_t>(nr, (a.N + 4 * threads - 1) / (4 * threads) / nr * nr));
  return nb;
}

// tile(mr, nr, m, n) over the whole output, tiles of kMR rows of x by NR rows of W: threads take
// blocks of W rows, and each block is run against every group of kMR rows of x while it sits in L2
template <int NR = kNR, typename F>
void for_each_tile(const QuantLinearArgs& a, const F& tile) {
  const int64_t nb = block_rows(a, NR);
  parallel_for(0, (a.N + nb - 1) / nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * nb, n1 = std::min(a.N, n0 + nb);
      for (int64_t m = 0; m < a.M; m += kMR) {
        const int mr = int(std::min<int64_t>(kMR, a.M - m));
        for (int64_t n = n0; n < n1; n += NR) tile(mr, int(std::min<int64_t>(NR, n1 - n)), m, n);
      }
    }
  });
}

template <typename T, QuantScheme S>
void run_stream(const QuantLinearArgs& a) {
  std::unique_ptr<float[]> xbuf;
  const float* xc = rows_as_float<T>(a, xbuf);
  if (a.M == 1)
    for_each_tile<kNR1>(a, [&](int, int nr, int64_t m, int64_t n) { run_tile<T, S, 1, kNR1>(1, nr, a, xc, m, n); });
  else
    for_each_tile(a, [&](int mr, int nr, int64_t m, int64_t n) { run_tile<T, S>(mr, nr, a, xc, m, n); });
}

// Many rows: the blocked float32 product, its copies of W dequantized from the packed weights.
// xf: x's rows as contiguous floats, given (int4_dynamic's quantized rows) or made here.
template <typename T>
void run_panels(const QuantLinearArgs& a, const float* xf = nullptr) {
  const int64_t M = a.M, N = a.N, K = a.K;
  GemmArgs g{};
  std::unique_ptr<float[]> xbuf, ybuf, bbuf;
  if constexpr (std::is_same_v<T, float>) {
    g.a = xf ? xf : static_cast<const float*>(a.x);
    g.rsa = xf ? K : a.ldx;
    g.c = static_cast<float*>(a.y);
    g.bias = static_cast<const float*>(a.bias);
  } else {
    g.a = xf ? xf : rows_as_float<T>(a, xbuf);
    g.rsa = K;
    ybuf.reset(new float[M * N]);
    g.c = ybuf.get();
    if (a.bias) {
      bbuf.reset(new float[N]);
      for (int64_t n = 0; n < N; ++n) bbuf[n] = to_float(static_cast<const T*>(a.bias)[n]);
      g.bias = bbuf.get();
    }
  }
  g.csa = 1;
  g.M = M;
  g.N = N;
  g.K = K;
  g.ldc = N;
  g.b_column = &dequant_segment;
  g.b_ctx = &a;
  gemm(g);
  if constexpr (!std::is_same_v<T, float>) {
    T* y = static_cast<T*>(a.y);
    const float* yf = ybuf.get();
    parallel_for(0, M, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0 * N; i < i1 * N; ++i) y[i] = from_float<T>(yf[i]);
    });
  }
}

// float64 (the exactness tests): plain loops in double.
void run_double(const QuantLinearArgs& a) {
  const double* x = static_cast<const double*>(a.x);
  const double* b = static_cast<const double*>(a.bias);
  double* y = static_cast<double*>(a.y);
  parallel_for(0, a.N, 4, [&](int64_t n0, int64_t n1) {
    std::unique_ptr<double[]> w(new double[a.K]);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t k = 0; k < a.K; ++k) w[k] = qvalue(a, n, k);
      for (int64_t i = 0; i < a.M; ++i) {
        double s = b ? b[n] : 0.0;
        for (int64_t k = 0; k < a.K; ++k) s += x[i * a.ldx + k] * w[k];
        y[i * a.N + n] = s;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// int8_dynamic

// Quantizes a row of x (K values) to int8 at q (zero padded to ldq), returns its scale. flip 0x80
// writes x + 128 as unsigned bytes instead (the VNNI product's form; padding 128, i.e. zero).
template <typename T>
float quantize_row(const T* x, int64_t K, int8_t* q, int64_t ldq, int8_t flip) {
  float amax = 0.f;
  int64_t k = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    // 16 lanes at a time; max(|x|, m) keeps m where |x| is NaN, as std::max below does
    __m512 m = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + k)), m);
    amax = _mm512_reduce_max_ps(m);
  }
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(float(to_float(x[k]))));
  const float s = amax / 127.f;
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  k = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    // cvtps rounds to nearest even (nearbyint's default); |x| <= amax keeps x * inv within +-127
    const __m512 vinv = _mm512_set1_ps(inv);
    for (; k + 16 <= K; k += 16) {
      const __m128i v = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                       _mm_xor_si128(_mm_max_epi8(v, _mm_set1_epi8(-127)), _mm_set1_epi8(flip)));
    }
  }
#endif
  for (; k < K; ++k)
    q[k] = int8_t(int8_t(std::nearbyint(std::clamp(float(to_float(x[k])) * inv, -127.f, 127.f))) ^ flip);
  for (k = K; k < ldq; ++k) q[k] = flip;
  return s;
}

#if defined(__AVX2__)
// acc (8 int32 lanes) += the 4-byte-group dot products of x and w (int8 in [-127, 127]).
template <bool VNNI>
FF_INLINE __m256i dot32(__m256i acc, __m256i x, __m256i w) {
  const __m256i ax = _mm256_sign_epi8(x, x);
  const __m256i sw = _mm256_sign_epi8(w, x);
  if constexpr (VNNI) {
    // EVEX vpdpbusd (AVX512-VNNI + VL), written in asm so that only this build's callers that
    // checked the CPU reach it and the rest of the file keeps the base flags
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(ax), "v"(sw));
    return acc;
  } else {
    const __m256i p16 = _mm256_maddubs_epi16(ax, sw);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
  }
}
FF_INLINE int32_t hsum_epi32(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i t = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1)));
}

// out[i][j] = sum_k xq_i[k] w_j[k] for MR rows of quantized x (padded) and NR rows of W; the rows
// next of W (a tile ahead) are prefetched, as the float tile does, so that W streams from memory
// at its bandwidth when it is not in the cache.
template <bool VNNI, int MR, int NR>
FF_INLINE void itile(const int8_t* const* x, const int8_t* const* w, const int8_t* const* next, int64_t K,
                     int32_t (*out)[kNRMax]) {
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  const int64_t Kv = K - K % 32;
  for (int64_t k = 0; k < Kv; k += 32) {
    if (k % 64 == 0)
      for (int j = 0; j < NR; ++j) __builtin_prefetch(next[j] + k, 0, 2);
    __m256i wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[j] + k));
    for (int i = 0; i < MR; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i] + k));
      for (int j = 0; j < NR; ++j) acc[i][j] = dot32<VNNI>(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      int32_t s = hsum_epi32(acc[i][j]);
      for (int64_t k = Kv; k < K; ++k) s += int32_t(x[i][k]) * int32_t(w[j][k]);
      out[i][j] = s;
    }
}
#endif

// sum_k xq[k] w[k], plain (the generic build; compilers vectorize it)
FF_INLINE int32_t idot(const int8_t* x, const int8_t* w, int64_t K) {
  int32_t s = 0;
  for (int64_t k = 0; k < K; ++k) s += int32_t(x[k]) * int32_t(w[k]);
  return s;
}

template <bool VNNI, int MR, int NR>
void itile_store(const QuantLinearArgs& a, const int8_t* xq, int64_t ldq, const float* xs, const float* bias,
                 float* y, int64_t m, int64_t n) {
  const int8_t* qw = static_cast<const int8_t*>(a.qw);
  int32_t out[kMR][kNRMax];
#if defined(__AVX2__)
  const int8_t* xr[MR];
  const int8_t* wr[NR];
  const int8_t* next[NR];
  const int64_t ahead = std::min(n + kPrefetchTiles * NR, a.N - NR);
  for (int i = 0; i < MR; ++i) xr[i] = xq + (m + i) * ldq;
  for (int j = 0; j < NR; ++j) {
    wr[j] = qw + (n + j) * a.K;
    next[j] = qw + (ahead + j) * a.K;
  }
  itile<VNNI, MR, NR>(xr, wr, next, a.K, out);
#else
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i][j] = idot(xq + (m + i) * ldq, qw + (n + j) * a.K, a.K);
#endif
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      y[(m + i) * a.N + n + j] =
          dynamic_output(float(out[i][j]), xs[m + i], a.scale[n + j], bias ? bias[n + j] : 0.f);
}

template <bool VNNI, int MR = kMR, int NR = kNR>
FF_INLINE void run_itile(int mr, int nr, const QuantLinearArgs& a, const int8_t* xq, int64_t ldq, const float* xs,
                         const float* bias, float* y, int64_t m, int64_t n) {
  with_tile_size<MR, NR>(mr, nr, [&](auto rows, auto cols) {
    itile_store<VNNI, decltype(rows)::value, decltype(cols)::value>(a, xq, ldq, xs, bias, y, m, n);
  });
}

template <bool VNNI>
void run_dynamic_tiles(const QuantLinearArgs& a, const int8_t* xq, int64_t ldq, const float* xs, const float* bias,
                       float* y) {
  if (a.M == 1)  // as the float stream: more W rows per tile when no rows of x share them
    for_each_tile<kNR1>(a, [&](int, int nr, int64_t m, int64_t n) {
      run_itile<VNNI, 1, kNR1>(1, nr, a, xq, ldq, xs, bias, y, m, n);
    });
  else
    for_each_tile(a, [&](int mr, int nr, int64_t m, int64_t n) {
      run_itile<VNNI>(mr, nr, a, xq, ldq, xs, bias, y, m, n);
    });
}

#if defined(__AVX512F__)
// Whether the CPU has AVX512-VNNI: the AVX-512 build's dynamic kernel then uses vpdpbusd (the AVX2
// build keeps vpmaddubsw, which every AVX2 CPU has).
bool use_vnni() {
  static const bool v = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
  }();
  return v;
}
#endif

#if defined(__AVX512F__)
// Many rows with AVX512-VNNI: the dot-product tiles above end every output with a horizontal sum,
// which at a few hundred input features costs as much as the products. Here W is repacked for the
// call, per block of kNC = 64 output channels, into vpdpbusd's layout: for each 4 consecutive k, the
// 64 channels' 4 bytes (four 64-byte vectors); x's int8 rows are shifted to unsigned bytes (x + 128)
// so that 4 of them can be broadcast against a W vector. A micro-tile of kMRv rows x 64 channels holds
// 4 kMRv int32 accumulators: per 4 k, 4 W loads, kMRv broadcasts and 4 kMRv vpdpbusd, no reduction.
// (x + 128) . w = x . w + 128 sum_k w: each channel's 128 sum_k w is subtracted at the end, so the
// int32 sums are the exact ones of the tiles above.
constexpr int kMRv = 6;             // rows per micro-tile
constexpr int kNC = 64;             // channels per packed block
constexpr int64_t kRowsPerTask = 48;  // rows a task runs against one packed block (in L2 with it)
constexpr int64_t kMaxVnniK = 65536;  // 255 x 127 x K stays below 2^31

FF_INLINE __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// W rows n0 .. n0 + 63 (zero past N; k zero past K) into dst[(k / 4) * 256 + c * 4 + k % 4], and
// off[c] = 128 * sum_k w[n0 + c][k].
void pack_vnni(const int8_t* qw, int64_t N, int64_t K, int64_t K4, int64_t n0, int8_t* dst, int32_t* off) {
  for (int c = 0; c < kNC; ++c) {
    const int64_t n = n0 + c;
    int32_t sum = 0;
    for (int64_t k = 0; k < 4 * K4; ++k) {
      const int8_t v = n < N && k < K ? qw[n * K + k] : int8_t(0);
      dst[(k / 4) * (4 * kNC) + c * 4 + k % 4] = v;
      sum += v;
    }
    off[c] = 128 * sum;
  }
}

// y rows m .. m + MR - 1, channels n0 .. n0 + 63 (those below N): x rows xu (unsigned, ldu bytes
// apart, 4 K4 of them used), the packed block wp.
template <int MR>
FF_INLINE void vnni_tile(const QuantLinearArgs& a, const uint8_t* xu, int64_t ldu, const int8_t* wp, const int32_t* off,
                         int64_t K4, const float* xs, const float* bias, float* y, int64_t m, int64_t n0) {
  __m512i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_setzero_si512();
  const uint8_t* xr = xu + m * ldu;
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const int8_t* w = wp + k4 * (4 * kNC);
    __m512i b[4];
    for (int v = 0; v < 4; ++v) b[v] = _mm512_loadu_si512(w + v * 64);
    for (int i = 0; i < MR; ++i) {
      int32_t four;
      __builtin_memcpy(&four, xr + i * ldu + 4 * k4, 4);
      const __m512i xb = _mm512_set1_epi32(four);
      for (int v = 0; v < 4; ++v) acc[i][v] = dpbusd(acc[i][v], xb, b[v]);
    }
  }
  for (int v = 0; v < 4; ++v) {
    const int64_t c0 = n0 + 16 * v;
    if (c0 >= a.N) break;
    const __mmask16 mask = a.N - c0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (a.N - c0)) - 1);
    const __m512i o = _mm512_loadu_si512(off + 16 * v);
    const __m512 sc = _mm512_maskz_loadu_ps(mask, a.scale + c0);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + c0) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) {
      const vf d = vf(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][v], o)));
      const vf r = dynamic_output(d, vset1(xs[m + i]), vf(sc), vf(bv));
      _mm512_mask_storeu_ps(y + (m + i) * a.N + c0, mask, __m512(r));
    }
  }
}


// The many-rows int8_dynamic product with vpdpbusd on packed W (see above); xu the quantized rows as
// unsigned bytes (x + 128), ldu = 4 ceil(K / 4) apart.
void run_dynamic_vnni(const QuantLinearArgs& a, const uint8_t* xu, int64_t ldu, const float* xs, const float* bias,
                      float* y) {
  const int64_t M = a.M, N = a.N, K = a.K, K4 = ldu / 4;
  const int64_t blocks = (N + kNC - 1) / kNC, block_bytes = K4 * 4 * kNC;
  std::unique_ptr<int8_t[]> wp(new int8_t[blocks * block_bytes]);
  std::unique_ptr<int32_t[]> off(new int32_t[blocks * kNC]);
  const int8_t* qw = static_cast<const int8_t*>(a.qw);
  parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) pack_vnni(qw, N, K, K4, b * kNC, wp.get() + b * block_bytes, off.get() + b * kNC);
  });
  const int64_t row_tasks = (M + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(0, row_tasks * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t % blocks, m0 = t / blocks * kRowsPerTask, m1 = std::min(M, m0 + kRowsPerTask);
      for (int64_t m = m0; m < m1; m += kMRv)
        with_tile_size<kMRv, 1>(int(std::min<int64_t>(kMRv, m1 - m)), 1, [&](auto rows, auto) {
          vnni_tile<decltype(rows)::value>(a, xu, ldu, wp.get() + b * block_bytes, off.get() + b * kNC, K4, xs, bias,
                                           y, m, b * kNC);
        });
    }
  });
}
#endif

// y (float, M x N) into the output's storage when that is not float32
template <typename T>
void convert_output(const QuantLinearArgs& a, const float* y) {
  if constexpr (!std::is_same_v<T, float>) {
    T* yt = static_cast<T*>(a.y);
    for (int64_t i = 0; i < a.M * a.N; ++i) yt[i] = to_storage<T>(y[i]);
  }
}

template <typename T>
void run_dynamic(const QuantLinearArgs& a) {
  const int64_t M = a.M, N = a.N, K = a.K;
#if defined(__AVX512F__)
  const bool vnni_rows = use_vnni() && M > kFewRows && K <= kMaxVnniK;
#else
  const bool vnni_rows = false;
#endif
  // rows padded for the product that takes them: 4-byte groups (VNNI rows) or 32-byte vectors
  const int64_t ldq = vnni_rows ? (K + 3) / 4 * 4 : (K + 31) / 32 * 32;
  std::unique_ptr<int8_t[]> xq(new int8_t[M * ldq]);
  std::unique_ptr<float[]> xs(new float[M]);
  const T* x = static_cast<const T*>(a.x);
  parallel_for(0, M, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      xs[i] = quantize_row(x + i * a.ldx, K, xq.get() + i * ldq, ldq, int8_t(vnni_rows ? 0x80 : 0));
  });
  // the output in float (the storage when it is float32), then converted
  std::unique_ptr<float[]> ybuf, bbuf;
  float* y = std::is_same_v<T, float> ? static_cast<float*>(a.y) : (ybuf.reset(new float[M * N]), ybuf.get());
  const float* bias = nullptr;
  if (a.bias) {
    bbuf.reset(new float[N]);
    for (int64_t n = 0; n < N; ++n) bbuf[n] = to_float(static_cast<const T*>(a.bias)[n]);
    bias = bbuf.get();
  }
#if defined(__AVX512F__)
  if (use_vnni()) {
    if (vnni_rows)
      run_dynamic_vnni(a, reinterpret_cast<const uint8_t*>(xq.get()), ldq, xs.get(), bias, y);
    else
      run_dynamic_tiles<true>(a, xq.get(), ldq, xs.get(), bias, y);
    return convert_output<T>(a, y);
  }
#endif
  run_dynamic_tiles<false>(a, xq.get(), ldq, xs.get(), bias, y);
  convert_output<T>(a, y);
}


// ---------------------------------------------------------------------------------------------
// int4_dynamic: int4's weights against x quantized in blocks of 32 features (llama.cpp's Q4_0 x Q8_0)
//
// Each block of 32 values of a row of x gets its own scale max|x| / 127 and int8 values (quantize_row).
// A W block's 16 bytes hold its elements j (low nibbles) and j + 16 (high nibbles) as codes c = q + 8
// in 0 .. 15, unsigned bytes ready for the unsigned-by-signed byte products (vpdpbusd; vpmaddubsw and
// vpmaddwd) against x's int8 values with no sign trick. x is stored per pair of blocks in W's order,
// 64 bytes [b0 0..15, b1 0..15, b0 16..31, b1 16..31], so that one 32-byte load of W (two blocks), masked
// and shifted, meets two 32-byte loads of x. A product's eight int32 lanes hold four 4-byte partial
// sums per block; sum (c - 8) x = sum c x - 8 sum x, so each block's -8 sum x starts its first lane.
// The lanes go to float, times x's block scale and W's group scale, summed in float. The many-rows
// path dequantizes the quantized x into float rows for int4's panels.

constexpr int64_t kQBlock = 32;  // x values per quantization block (a W packing block)

// x quantized in blocks: q (M rows of P pairs of 64 bytes), per pair 8 lanes of corr (the blocks'
// -8 sum x in lanes 0 and 4) and of scale (the blocks' scales, each in 4 lanes); a missing second
// block of a row's last pair (K / 32 odd) is zeros.
struct XBlocks {
  int64_t P = 0;
  std::unique_ptr<int8_t[]> q;
  std::unique_ptr<int32_t[]> corr;
  std::unique_ptr<float[]> scale;
  const int8_t* pair(int64_t i, int64_t p) const { return q.get() + (i * P + p) * 64; }
  const int32_t* pair_corr(int64_t i, int64_t p) const { return corr.get() + (i * P + p) * 8; }
  const float* pair_scale(int64_t i, int64_t p) const { return scale.get() + (i * P + p) * 8; }
};

template <typename T>
XBlocks quantize_blocks(const QuantLinearArgs& a) {
  XBlocks xb;
  const int64_t nb = a.K / kQBlock;
  xb.P = (nb + 1) / 2;
  xb.q.reset(new int8_t[a.M * xb.P * 64]());
  xb.corr.reset(new int32_t[a.M * xb.P * 8]());
  xb.scale.reset(new float[a.M * xb.P * 8]());
  const T* x = static_cast<const T*>(a.x);
  parallel_for(0, a.M, 4, [&](int64_t i0, int64_t i1) {
    int8_t v[kQBlock];
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t b = 0; b < nb; ++b) {
        const float s = quantize_row(x + i * a.ldx + b * kQBlock, kQBlock, v, kQBlock, 0);
        const int64_t p = b / 2, h = b % 2;
        int8_t* q = xb.q.get() + (i * xb.P + p) * 64;
        int32_t sum = 0;
        for (int t = 0; t < 16; ++t) {
          q[h * 16 + t] = v[t];
          q[32 + h * 16 + t] = v[16 + t];
        }
        for (int t = 0; t < kQBlock; ++t) sum += v[t];
        xb.corr[(i * xb.P + p) * 8 + h * 4] = -8 * sum;
        for (int l = 0; l < 4; ++l) xb.scale[(i * xb.P + p) * 8 + h * 4 + l] = s;
      }
  });
  return xb;
}

// the scale of W row n's group holding block b
FF_INLINE float block_scale(const QuantLinearArgs& a, int64_t n, int64_t b) {
  return a.scale[n * (a.K / a.group_size) + b * kQBlock / a.group_size];
}

// row i of x against W row n, plain: the generic build and float64
template <typename Acc>
Acc i4dot(const QuantLinearArgs& a, const XBlocks& xb, int64_t i, int64_t n) {
  const uint8_t* w = static_cast<const uint8_t*>(a.qw) + n * (a.K / 2);
  Acc total = 0;
  for (int64_t b = 0; b < a.K / kQBlock; ++b) {
    const int8_t* q = xb.pair(i, b / 2) + (b % 2) * 16;
    int32_t s = xb.pair_corr(i, b / 2)[(b % 2) * 4];
    for (int t = 0; t < 16; ++t) s += int32_t(w[b * 16 + t] & 15) * q[t] + int32_t(w[b * 16 + t] >> 4) * q[32 + t];
    total += Acc(s) * Acc(xb.pair_scale(i, b / 2)[(b % 2) * 4]) * Acc(block_scale(a, n, b));
  }
  return total;
}

#if defined(__AVX2__)
// acc + the 4-byte-group products of codes lo, hi (unsigned) with x's bytes xlo, xhi (signed)
template <bool VNNI>
FF_INLINE __m256i dot_codes(__m256i acc, __m256i lo, __m256i hi, __m256i xlo, __m256i xhi) {
  if constexpr (VNNI) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(lo), "v"(xlo));
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(hi), "v"(xhi));
    return acc;
  } else {
    // |c x| <= 15 x 127: the two pair sums of each int16 lane stay below 2^15
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
}

FF_INLINE float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// out[i][j] = x_{m+i} . w_{n+j} for MR rows of x and NR rows of W
template <bool VNNI, int MR, int NR>
FF_INLINE void i4tile(const QuantLinearArgs& a, const XBlocks& xb, int64_t m, int64_t n, float (*out)[kNRMax]) {
  const int64_t half = a.K / 2, nb = a.K / kQBlock;
  const uint8_t* qw = static_cast<const uint8_t*>(a.qw);
  const int64_t ahead = std::min(n + kPrefetchTiles * NR, a.N - NR);
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const __m256i nibble = _mm256_set1_epi8(15);
  const int64_t G = a.K / a.group_size, per_group = a.group_size / kQBlock;
  // the groups of the pair's two blocks, counted along (no division in the loop)
  int64_t g0 = 0, pos0 = 0;
  for (int64_t p = 0; p < xb.P; ++p, pos0 += 2) {
    while (pos0 >= per_group) pos0 -= per_group, ++g0;
    const bool full = 2 * p + 1 < nb;
    const int64_t g1 = pos0 + 1 < per_group ? g0 : g0 + 1;
    if (p % 2 == 0)  // a cache line of each W row of the tile ahead every 64 bytes
      for (int j = 0; j < NR; ++j) __builtin_prefetch(qw + (ahead + j) * half + p * 32, 0, 2);
    __m256i xlo[MR], xhi[MR], corr[MR];
    __m256 xs[MR];
    for (int i = 0; i < MR; ++i) {
      const int8_t* q = xb.pair(m + i, p);
      xlo[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      xhi[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
      corr[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.pair_corr(m + i, p)));
      xs[i] = _mm256_loadu_ps(xb.pair_scale(m + i, p));
    }
    for (int j = 0; j < NR; ++j) {
      const uint8_t* w = qw + (n + j) * half + p * 32;
      // the row's last block alone when K / 32 is odd: 16 bytes, the rest zero
      const __m256i wv = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))
                              : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
      const __m256i lo = _mm256_and_si256(wv, nibble);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), nibble);
      const float* sc = a.scale + (n + j) * G;
      const __m256 ws = _mm256_set_m128(_mm_set1_ps(full ? sc[g1] : 0.f), _mm_set1_ps(sc[g0]));
      for (int i = 0; i < MR; ++i) {
        const __m256i d = dot_codes<VNNI>(corr[i], lo, hi, xlo[i], xhi[i]);
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(xs[i], ws), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i][j] = hsum256(acc[i][j]);
}
#endif

template <typename T, bool VNNI, int MR, int NR>
void i4tile_store(const QuantLinearArgs& a, const XBlocks& xb, int64_t m, int64_t n) {
  float out[kMR][kNRMax];
#if defined(__AVX2__)
  i4tile<VNNI, MR, NR>(a, xb, m, n, out);
#else
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i][j] = i4dot<float>(a, xb, m + i, n + j);
#endif
  store_tile<T, MR, NR>(a, out, m, n);
}

template <typename T, bool VNNI>
void run_int4_dynamic_tiles(const QuantLinearArgs& a, const XBlocks& xb) {
  auto tiles = [&](auto mr_max, auto nr_max) {
    constexpr int MR = decltype(mr_max)::value, NR = decltype(nr_max)::value;
    for_each_tile<NR>(a, [&](int mr, int nr, int64_t m, int64_t n) {
      with_tile_size<MR, NR>(std::min(mr, MR), nr, [&](auto rows, auto cols) {
        i4tile_store<T, VNNI, decltype(rows)::value, decltype(cols)::value>(a, xb, m, n);
      });
    });
  };
  if (a.M == 1)  // as the float stream: more W rows per tile when no rows of x share them
    tiles(std::integral_constant<int, 1>{}, std::integral_constant<int, kNR1>{});
  else
    tiles(std::integral_constant<int, kMR>{}, std::integral_constant<int, 2>{});
}

template <typename T>
void run_int4_dynamic(const QuantLinearArgs& a) {
  const XBlocks xb = quantize_blocks<T>(a);
  if constexpr (std::is_same_v<T, double>) {  // the exactness tests: plain loops, summed in double
    double* y = static_cast<double*>(a.y);
    const double* b = static_cast<const double*>(a.bias);
    parallel_for(0, a.N, 4, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t i = 0; i < a.M; ++i) y[i * a.N + n] = i4dot<double>(a, xb, i, n) + (b ? b[n] : 0.0);
    });
    return;
  }
  if (a.M > kFewRows) {
    // the quantized rows back in float, in x's order, through int4's dequantized panels
    std::unique_ptr<float[]> xf(new float[a.M * a.K]);
    parallel_for(0, a.M, 4, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t b = 0; b < a.K / kQBlock; ++b) {
          const int8_t* q = xb.pair(i, b / 2) + (b % 2) * 16;
          const float s = xb.pair_scale(i, b / 2)[(b % 2) * 4];
          float* dst = xf.get() + i * a.K + b * kQBlock;
          for (int t = 0; t < 16; ++t) {
            dst[t] = float(q[t]) * s;
            dst[16 + t] = float(q[32 + t]) * s;
          }
        }
    });
    return run_panels<T>(a, xf.get());
  }
#if defined(__AVX512F__)
  if (use_vnni()) return run_int4_dynamic_tiles<T, true>(a, xb);
#endif
  run_int4_dynamic_tiles<T, false>(a, xb);
}

}  // namespace

void quantized_linear(const QuantLinearArgs& a) {
  if (a.M == 0 || a.N == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.scheme == QuantScheme::Int4Dynamic) {
      run_int4_dynamic<T>(a);
    } else if constexpr (std::is_same_v<T, double>) {
      if (a.scheme == QuantScheme::Int8Dynamic)
        run_dynamic<T>(a);
      else
        run_double(a);
    } else if (a.scheme == QuantScheme::Int8Dynamic) {
      run_dynamic<T>(a);
    } else if (a.M > kFewRows) {
      run_panels<T>(a);
    } else if (is_4bit(a.scheme)) {  // the scheme's levels are read from a.scheme
      run_stream<T, QuantScheme::Int4>(a);
    } else {
      run_stream<T, QuantScheme::Int8>(a);
    }
  });
}

}  // namespace fusedformer::cpu::FF_ISA
