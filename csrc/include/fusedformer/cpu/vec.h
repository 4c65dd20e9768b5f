// Portable SIMD layer for the CPU kernels.
//
// Kernel translation units are compiled once per instruction set (generic, AVX2, AVX-512) with
// FF_ISA naming the namespace; everything here lives in that namespace so that the copies never
// collide at link time. The vector type is a GCC/Clang vector extension: the compiler lowers it to
// the widest registers the target flags allow (ymm for AVX2, zmm for AVX-512, xmm pairs / NEON on
// the generic build), so one kernel source serves every target.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__F16C__) || defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#ifndef FF_ISA
#error "kernel translation units are compiled with FF_ISA=<namespace>"
#endif

#include "fusedformer/cpu/kernels.h"

namespace fusedformer::cpu::FF_ISA {

#if defined(__AVX512F__)
inline constexpr int W = 16;
#elif defined(__AVX2__)
inline constexpr int W = 8;
#else
// Generic build: 16 lanes, lowered by the compiler to what the baseline target has. Its lane count
// equals AVX-512's, so the 16-lane code paths are exercised on any machine.
inline constexpr int W = 16;
#endif

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));
// float64 (computed in double, for gradcheck-grade accuracy): vectors of the same byte width
inline constexpr int WD = W / 2;
typedef double vd __attribute__((vector_size(W * 4)));

#define FF_INLINE inline __attribute__((always_inline))

FF_INLINE vf vzero() { return vf{}; }
FF_INLINE vf vset1(float s) { return vf{} + s; }
FF_INLINE vf vabs(vf a) { return (vf)((vu)a & 0x7fffffffu); }
FF_INLINE vf vselect(vi m, vf a, vf b) { return m ? a : b; }

// float or double and their vectors (vf, vd): loads, stores, min and max
template <typename E>
concept Real = std::is_same_v<E, float> || std::is_same_v<E, double>;
template <Real E>
using real_vec_t = std::conditional_t<std::is_same_v<E, double>, vd, vf>;
template <Real E>
FF_INLINE real_vec_t<E> vload(const E* p) {
  real_vec_t<E> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <Real E>
FF_INLINE void vstore(E* p, real_vec_t<E> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
template <typename V>
FF_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}
template <typename V>
FF_INLINE V vmin(V a, V b) {
  return a < b ? a : b;
}

// sum of the lanes of v (vf or vd), in lane order
template <typename V, typename E = std::remove_reference_t<decltype(std::declval<V>()[0])>>
FF_INLINE E hsum(V v) {
  E s = E(0);
  for (int i = 0; i < int(sizeof(V) / sizeof(E)); ++i) s += v[i];
  return s;
}
// max that ignores NaN lanes (a NaN row is caught by the sum that follows, which becomes NaN)
template <typename V, typename E = std::remove_reference_t<decltype(std::declval<V>()[0])>>
FF_INLINE E hmax(V v) {
  E m = v[0];
  for (int i = 1; i < int(sizeof(V) / sizeof(E)); ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// lane index vector {0, 1, ..., W-1}
FF_INLINE vi viota() {
  vi r;
  for (int i = 0; i < W; ++i) r[i] = i;
  return r;
}

// ---------------------------------------------------------------------------------------------
// scalar conversions for bfloat16 / float16 storage (raw uint16 bits)

FF_INLINE float bits_to_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
FF_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}
FF_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
FF_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN, sign kept
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return uint16_t(u >> 16);
}
FF_INLINE float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {
    float v = float(mant) * 5.9604644775390625e-08f;  // mant * 2^-24, exact
    return bits_to_float(float_to_bits(v) | sign);
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}
FF_INLINE uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u >= 0x7f800000u) return sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN / inf
  if (u >= 0x477ff000u) return sign | 0x7c00u;                                 // rounds to inf
  if (u < 0x38800000u) {
    // result is subnormal (or zero): let the FPU round by adding 0.5 (2^-1): the half subnormal
    // step 2^-24 then sits at the last mantissa bit of the float sum.
    float v = bits_to_float(u) + 0.5f;
    return sign | uint16_t(float_to_bits(v) - 0x3f000000u);
  }
  uint32_t odd = (u >> 13) & 1u;
  u += 0xc8000fffu + odd;  // rebias exponent (-112 << 23) and round to nearest even
  return sign | uint16_t(u >> 13);
}

// ---------------------------------------------------------------------------------------------
// storage types and vector loads / stores converting to and from float

struct bf16_t {
  uint16_t x;
};
struct f16_t {
  uint16_t x;
};

FF_INLINE float to_float(float v) { return v; }
FF_INLINE double to_float(double v) { return v; }  // float64 stays float64
FF_INLINE float to_float(bf16_t v) { return bf16_to_float(v.x); }
FF_INLINE float to_float(f16_t v) { return half_to_float(v.x); }
template <typename T>
FF_INLINE T from_float(float v);
template <>
FF_INLINE float from_float<float>(float v) {
  return v;
}
template <>
FF_INLINE double from_float<double>(float v) {
  return v;
}
template <>
FF_INLINE bf16_t from_float<bf16_t>(float v) {
  return bf16_t{float_to_bf16(v)};
}
template <>
FF_INLINE f16_t from_float<f16_t>(float v) {
  return f16_t{float_to_half(v)};
}

FF_INLINE vf vload(const bf16_t* p) {
  // one widening load and a shift (the generic conversion compiles to a split widen and a lane insert)
#if defined(__AVX512F__)
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(__AVX2__)
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  vh h;
  __builtin_memcpy(&h, p, sizeof(h));
  vu u = __builtin_convertvector(h, vu) << 16;
  return (vf)u;
#endif
}
// float -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN with its sign
FF_INLINE vh to_bf16_bits(vf v) {
  vu u = (vu)v;
  vu hi = u >> 16;
  vu r = (u + 0x7fffu + (hi & 1u)) >> 16;
  r = (v != v) ? (hi | 0x40u) : r;
#if defined(__AVX2__) && !defined(__AVX512F__)
  // r < 2^16: an unsigned-saturating pack is exact; it interleaves 128-bit halves, undone by permute
  __m256i pk = _mm256_packus_epi32((__m256i)r, (__m256i)r);
  return (vh)_mm256_castsi256_si128(_mm256_permute4x64_epi64(pk, 0x08));
#else
  return __builtin_convertvector(r, vh);
#endif
}
FF_INLINE void vstore(bf16_t* p, vf v) {
  vh h = to_bf16_bits(v);
  __builtin_memcpy(p, &h, sizeof(h));
}
FF_INLINE vf vload(const f16_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && defined(__AVX2__)
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf v;
  for (int i = 0; i < W; ++i) v[i] = half_to_float(p[i].x);
  return v;
#endif
}
// float -> float16 bits, round to nearest even
FF_INLINE vh to_f16_bits(vf v) {
#if defined(__AVX512F__)
  return (vh)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT);
#elif defined(__F16C__) && defined(__AVX2__)
  return (vh)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT);
#else
  vh h;
  for (int i = 0; i < W; ++i) h[i] = float_to_half(v[i]);
  return h;
#endif
}
FF_INLINE void vstore(f16_t* p, vf v) {
  vh h = to_f16_bits(v);
  __builtin_memcpy(p, &h, sizeof(h));
}

// v rounded to the precision of storage type T (and back to float)
template <typename T>
FF_INLINE vf round_through(vf v) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    return (vf)(__builtin_convertvector(to_bf16_bits(v), vu) << 16);
  } else if constexpr (std::is_same_v<T, f16_t>) {
    const vh h = to_f16_bits(v);
    return vload(reinterpret_cast<const f16_t*>(&h));
  } else {
    return v;
  }
}
template <typename T>
FF_INLINE vd round_through(vd v) {
  return v;
}

// ---------------------------------------------------------------------------------------------
// Non-temporal (streaming) stores, for outputs too large to stay in cache: they skip the read of
// the destination line that a plain store costs. p must be aligned to the stored vector's size
// (kStreamAlign bytes suffices for every type); where the instruction set has no such store, a
// plain one. Each thread that streamed calls vstream_fence() before its data is read elsewhere.

inline constexpr int kStreamAlign = 64;
// outputs of at least this many bytes are written with streaming stores by the memory-bound kernels
inline constexpr int64_t kStreamMinBytes = int64_t(4) << 20;

// the bytes of v as consecutive Chunks, each written by store(address, chunk)
template <typename Chunk, typename V, typename Store>
FF_INLINE void store_chunks(void* p, const V& v, Store store) {
  for (size_t i = 0; i < sizeof(V); i += sizeof(Chunk)) {
    Chunk c;
    __builtin_memcpy(&c, reinterpret_cast<const char*>(&v) + i, sizeof(Chunk));
    store(reinterpret_cast<Chunk*>(static_cast<char*>(p) + i), c);
  }
}

template <typename V>
FF_INLINE void vstream_bytes(void* p, V v) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) {
    _mm512_stream_si512(static_cast<__m512i*>(p), (__m512i)v);
    return;
  } else if constexpr (sizeof(V) == 32) {
    _mm256_stream_si256(static_cast<__m256i*>(p), (__m256i)v);
    return;
  }
#elif defined(__AVX2__)
  if constexpr (sizeof(V) % 32 == 0) {
    store_chunks<__m256i>(p, v, [](__m256i* d, __m256i c) { _mm256_stream_si256(d, c); });
    return;
  }
#endif
#if defined(__SSE2__)
  if constexpr (sizeof(V) % 16 == 0) {
    store_chunks<__m128i>(p, v, [](__m128i* d, __m128i c) { _mm_stream_si128(d, c); });
    return;
  }
#endif
  __builtin_memcpy(p, &v, sizeof(V));
}
FF_INLINE void vstream(float* p, vf v) { vstream_bytes(p, v); }
FF_INLINE void vstream(double* p, vd v) { vstream_bytes(p, v); }
FF_INLINE void vstream(bf16_t* p, vf v) { vstream_bytes(p, to_bf16_bits(v)); }
FF_INLINE void vstream(f16_t* p, vf v) { vstream_bytes(p, to_f16_bits(v)); }
// a vector store, streaming (past the caches) or plain
template <typename T, typename V>
FF_INLINE void put(T* p, V v, bool stream) {
  if (stream) {
    vstream(p, v);
  } else {
    vstore(p, v);
  }
}
FF_INLINE void vstream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}
// elements of T from p up to the next kStreamAlign boundary
template <typename T>
FF_INLINE int64_t stream_head(const T* p) {
  return int64_t((kStreamAlign - reinterpret_cast<uintptr_t>(p) % kStreamAlign) % kStreamAlign) / int64_t(sizeof(T));
}

// Software prefetch of `bytes` (a compile-time size) from p into L2: the memory-bound kernels
// fetch the next row while they compute on the current one, which sits in L1.
template <size_t BYTES>
FF_INLINE void prefetch_l2(const void* p) {
  for (size_t o = 0; o < BYTES; o += 64) __builtin_prefetch(static_cast<const char*>(p) + o, 0, 2);
}

// ---------------------------------------------------------------------------------------------
// The exponential of every softmax (softmax, cross-entropy, attention) and of GELU: its arguments
// are t = (x - max) * c <= 0, so no upper clamp is needed. 2^t with t <= 0 (or NaN): results
// below 2^-126.5 (t = -inf included) are exactly 0 and a NaN stays NaN. Degree-6 minimax polynomial on [-1/2, 1/2], relative error < 1e-7.

// max(a, lo), keeping a NaN lane of a
FF_INLINE vf vmax_keepnan(vf a, vf lo) {
#if defined(__AVX512F__)
  return (vf)_mm512_max_ps((__m512)lo, (__m512)a);  // maxps returns its second operand on NaN
#elif defined(__AVX2__)
  return (vf)_mm256_max_ps((__m256)lo, (__m256)a);
#else
  return lo > a ? lo : a;
#endif
}
FF_INLINE vf vexp2_nonpos(vf t) {
  t = vmax_keepnan(t, vset1(-127.f));
  const vf magic = vset1(12582912.f);  // 1.5 * 2^23: the low mantissa bits of t + magic are round(t)
  const vf s = t + magic;
  const vf f = t - (s - magic);  // [-1/2, 1/2]
  vf p = vset1(1.534581242594868e-4f);
  p = p * f + 1.3399930903688073e-3f;
  p = p * f + 9.618489071726799e-3f;
  p = p * f + 5.550328642129898e-2f;
  p = p * f + 2.4022646248340607e-1f;
  p = p * f + 6.931471824645996e-1f;
  p = p * f + 1.0f;
  // 2^round(t) from those bits: the exponent field wraps to 0 (the float 0) at round(t) = -127
  const vu e = ((vu)s << 23) + (127u << 23);
  return p * (vf)e;
}
// float64: lane by lane through libm (float64 is the accuracy path, not a fast path)
FF_INLINE vd vexp2_nonpos(vd t) {
  for (int i = 0; i < WD; ++i) t[i] = std::exp2(t[i]);
  return t;
}

// ---------------------------------------------------------------------------------------------
// bool masks (one byte per element, nonzero = keep): all-ones lanes where kept

typedef uint8_t vb __attribute__((vector_size(W)));
FF_INLINE vi vload_keep(const uint8_t* p) {
  vb b;
  __builtin_memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, vi) != 0;
}

// ---------------------------------------------------------------------------------------------
// Kernels written once for every storage type T: compute type C (double for double, else float),
// its vector type V and lane count N.

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename C>
struct SimdOf;
template <>
struct SimdOf<float> {
  using V = vf;
  static constexpr int N = W;
};
template <>
struct SimdOf<double> {
  using V = vd;
  static constexpr int N = WD;
};
template <typename C>
using vec_t = typename SimdOf<C>::V;
template <typename C>
inline constexpr int lanes_v = SimdOf<C>::N;

template <typename C>
FF_INLINE vec_t<C> vsplat(C s) {
  return vec_t<C>{} + s;
}
// convert a compute value to storage type T
template <typename T, typename C>
FF_INLINE T to_storage(C v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return from_float<T>(static_cast<float>(v));
  }
}

// partial vectors: the first n (< lanes) lanes from memory, the rest `fill`
template <typename T, typename C = compute_t<T>>
FF_INLINE vec_t<C> vload_n(const T* p, int n, C fill = C(0)) {
  vec_t<C> v = vsplat<C>(fill);
  for (int i = 0; i < n; ++i) v[i] = to_float(p[i]);
  return v;
}
template <typename T, typename V>
FF_INLINE void vstore_n(T* p, V v, int n) {
  for (int i = 0; i < n; ++i) p[i] = to_storage<T>(v[i]);
}

// Transposed reduction (N = lanes accumulators at once): lane p of the result is the sum of the lanes of acc[p]. Pairs of vectors
// are folded in halves (stage H keeps H lanes of each 2H-lane block), which leaves the inputs in
// bit-reversed order; they are fed in that order so the result comes out in natural order.
template <int N, int H>
constexpr int fold_lo(int p) {
  const int b = p / (2 * H), o = p % (2 * H);
  return o < H ? b * 2 * H + o : N + b * 2 * H + o - H;
}
template <int N, int H>
constexpr int fold_hi(int p) {
  const int b = p / (2 * H), o = p % (2 * H);
  return o < H ? b * 2 * H + H + o : N + b * 2 * H + o;
}
template <int H, typename V, std::size_t... I>
FF_INLINE V fold(V x, V y, std::index_sequence<I...>) {
  constexpr int N = int(sizeof...(I));
  return __builtin_shufflevector(x, y, fold_lo<N, H>(int(I))...) + __builtin_shufflevector(x, y, fold_hi<N, H>(int(I))...);
}
constexpr int bit_reverse(int x, int bits) {
  int r = 0;
  for (int i = 0; i < bits; ++i) r |= ((x >> i) & 1) << (bits - 1 - i);
  return r;
}
template <typename C>
FF_INLINE vec_t<C> reduce_lanes(const vec_t<C>* acc) {
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  constexpr int bits = __builtin_ctz(N);
  V v[N];
  for (int k = 0; k < N; ++k) v[k] = acc[bit_reverse(k, bits)];
  [&]<int... S>(std::integer_sequence<int, S...>) {
    // stage s halves the vector count: H = N >> (s + 1)
    ((
         [&] {
           constexpr int H = N >> (S + 1);
           for (int k = 0; k < (N >> (S + 1)); ++k) v[k] = fold<H>(v[2 * k], v[2 * k + 1], std::make_index_sequence<N>{});
         }()),
     ...);
  }(std::make_integer_sequence<int, bits>{});
  return v[0];
}

// f(T{}) with T the storage type of the argument structs' dtype
template <typename F>
FF_INLINE void dispatch_dtype(DType dt, F&& f) {
  fusedformer::dispatch_dtype<ElementTypes<float, bf16_t, f16_t, double>>(dt, static_cast<F&&>(f));
}

// ---------------------------------------------------------------------------------------------
// Broadcasts that compile to a single vbroadcast (from memory where the scalar comes from memory);
// `vec_t<C>{} + s` costs an extra add and a register move per call, which matters in inner loops.

namespace vec_detail {
template <typename V, typename S, std::size_t... I>
FF_INLINE V broadcast(S s, std::index_sequence<I...>) {
  V r{s};
  return __builtin_shufflevector(r, r, (I * 0)...);
}
}  // namespace vec_detail

template <typename C>
FF_INLINE vec_t<C> vbroadcast(C s) {
  return vec_detail::broadcast<vec_t<C>>(s, std::make_index_sequence<lanes_v<C>>{});
}

}  // namespace fusedformer::cpu::FF_ISA
