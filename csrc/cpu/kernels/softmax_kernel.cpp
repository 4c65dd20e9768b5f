// CPU softmax kernels: y = softmax(x * scale + mask) along a dim, and its backward.
// Compiled once per instruction set (see vec.h).
//
// Softmax dim last (rows): three passes over a row that stays in cache: the max of the logits, then
// e = 2^((z - max) * log2e) into a scratch row while summing, then e / sum into y. Longer rows are
// taken in segments whose (max, sum) pairs are merged, then written by a pass that recomputes e;
// when there are fewer such rows than threads, the segments of a row are spread over the threads.
// Without a mask and with scale >= 0 the logits are never formed: the max is taken of x itself and
// the scale folded into the exponent's factor.
// Softmax dim not last: the contiguous (rows, n, inner) layout is processed where it lies,
// vectorized across blocks of inner columns (no transpose, no copy).
// Outputs larger than the caches are written with streaming stores.
//
// Every path: a NaN logit makes its row NaN; a row whose logits are all -inf (fully masked) gives
// zeros (and zero gradients in the backward, which follows from y = 0).
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "softmax_rows.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

constexpr int64_t kSlabBytes = 128 << 10;  // strided kernel: bytes of x one column block spans
constexpr int64_t kMaxBlock = 512;         // strided kernel: widest column block (elements)

// one row of up to kRowInCache columns; columns from `limit` on are zero
template <typename T, Src S, typename C = compute_t<T>>
void row_fwd(const RowSrc<T, S>& src, T* y, C* buf, int64_t n, int64_t limit, C c, bool stream, const T* next) {
  using V = vec_t<C>;
  const C ref = usable_ref(pass_max(src, buf, 0, limit));
  const C inv = inverse_sum(pass_exp<true>(src, buf, 0, limit, ref, c, next));
  const V vi = vsplat<C>(inv);
  write_range(
      y, 0, limit, stream, [&](int64_t j) { return vload(buf + j) * vi; }, [&](int64_t j) { return buf[j] * inv; });
  if (limit < n) write_zeros(y, limit, n, stream);
}

// one long row, segment by segment (buf holds kSegment values)
template <typename T, Src S, typename C = compute_t<T>>
void long_row_fwd(const RowSrc<T, S>& src, T* y, C* buf, int64_t n, int64_t limit, C c, bool stream) {
  Stats<C> st{-kInf<C>, C(0)};
  for (int64_t j0 = 0; j0 < limit; j0 += kSegment)
    merge_stats(st, segment_stats(src, buf, j0, std::min(limit, j0 + kSegment), c), c);
  segment_write(src, y, 0, limit, usable_ref(st.ref), c, inverse_sum(st.sum), stream);
  if (limit < n) write_zeros(y, limit, n, stream);
}

// one row spread over the threads: the segments' statistics, then the segments' outputs
template <typename T, Src S, typename C = compute_t<T>>
void split_row_fwd(const RowSrc<T, S>& src, T* y, int64_t n, int64_t limit, C c, bool stream) {
  const int64_t nseg = (limit + kSegment - 1) / kSegment;
  std::vector<Stats<C>> st(nseg);
  parallel_for(0, nseg, 1, [&](int64_t s0, int64_t s1) {
    Scratch<C> buf(kSegment);
    for (int64_t s = s0; s < s1; ++s)
      st[s] = segment_stats(src, buf.p, s * kSegment, std::min(limit, (s + 1) * kSegment), c);
  });
  Stats<C> all{-kInf<C>, C(0)};
  for (const auto& s : st) merge_stats(all, s, c);
  const C ref = usable_ref(all.ref), inv = inverse_sum(all.sum);
  parallel_for(0, (n + kSegment - 1) / kSegment, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t j0 = s * kSegment, j1 = std::min(n, j0 + kSegment);
      if (j0 < limit) segment_write(src, y, j0, std::min(j1, limit), ref, c, inv, stream);
      if (j1 > limit) write_zeros(y, std::max(j0, limit), j1, stream);
    }
    if (stream) vstream_fence();
  });
}

template <typename T, Src S>
void fwd_rows(const SoftmaxFwdArgs& a, bool stream, bool split) {
  using C = compute_t<T>;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t n = a.n;
  const C scale = C(a.scale);
  const C c = S == Src::Raw ? C(a.scale * kLog2eD) : C(kLog2eD);
  // f(source of row r), or false when a bool mask broadcast along the row drops all of it
  auto with_source = [&](int64_t r, auto&& f) -> bool {
    RowSrc<T, S> s{x + r * n, nullptr, nullptr, scale, C(0)};
    if constexpr (S == Src::Add) s.madd = static_cast<const C*>(a.mask) + a.mask_row.offset(r);
    if constexpr (S == Src::AddConst) s.mconst = static_cast<const C*>(a.mask)[a.mask_row.offset(r)];
    if constexpr (S == Src::Keep) {
      s.mkeep = static_cast<const uint8_t*>(a.mask) + a.mask_row.offset(r);
      if (a.mask_col_stride == 0) {
        if (!s.mkeep[0]) return false;
        f(RowSrc<T, Src::Scaled>{s.x, nullptr, nullptr, scale, C(0)});
        return true;
      }
    }
    f(s);
    return true;
  };
  auto limit_of = [&](int64_t r) { return a.causal ? std::min<int64_t>(n, r % a.causal_rows + 1) : n; };

  if (split) {
    for (int64_t r = 0; r < a.rows; ++r) {
      T* yr = y + r * n;
      if (!with_source(r, [&](const auto& src) { split_row_fwd(src, yr, n, limit_of(r), c, stream); })) {
        parallel_for(0, n, kGrainElems, [&](int64_t j0, int64_t j1) {
          write_zeros(yr, j0, j1, false);
        });
      }
    }
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElems / n);
  parallel_for(0, a.rows, grain, [&](int64_t r0, int64_t r1) {
    const bool in_cache = n <= kRowInCache;
    Scratch<C> buf(in_cache ? n : kSegment);
    for (int64_t r = r0; r < r1; ++r) {
      T* yr = y + r * n;
      const int64_t limit = limit_of(r);
      const T* next = r + 1 < r1 ? x + (r + 1) * n : nullptr;
      const bool kept = with_source(r, [&](const auto& src) {
        in_cache ? row_fwd(src, yr, buf.p, n, limit, c, stream, next)
                 : long_row_fwd(src, yr, buf.p, n, limit, c, stream);
      });
      if (!kept) write_zeros(yr, 0, n, stream);
    }
    if (stream) vstream_fence();
  });
}

// ---------------------------------------------------------------------------------------------
// softmax dim not last: (rows, n, inner), blocks of `bw` inner columns; per column the max, the
// sum and the output, each a pass along n over the block (which stays in cache).

// The work items of the strided kernels: item w is the outer row o and the block of up to bw inner
// columns from i0 (nfull of them in whole vectors, rem in a partial one).
template <typename T>
struct ColumnBlocks {
  static constexpr int N = lanes_v<compute_t<T>>;
  int64_t n, inner, bw, nblk, grain;
  bool stream_ok;  // streaming needs every output vector aligned: whole lines per row of the block

  ColumnBlocks(int64_t n_, int64_t inner_, const T* out, bool stream) : n(n_), inner(inner_) {
    const int64_t unit = std::max<int64_t>(N, kStreamAlign / int64_t(sizeof(T)));
    bw = kSlabBytes / (n * int64_t(sizeof(T)));
    bw = std::clamp<int64_t>(bw / unit * unit, unit, kMaxBlock);
    bw = std::min(bw, (inner + N - 1) / N * N);
    nblk = (inner + bw - 1) / bw;
    grain = std::max<int64_t>(1, kGrainElems / (n * bw));
    stream_ok = stream && (inner * int64_t(sizeof(T))) % kStreamAlign == 0 &&
                reinterpret_cast<uintptr_t>(out) % kStreamAlign == 0;
  }
  struct Item {
    int64_t o, i0, cols, nfull;
    int rem;
  };
  Item item(int64_t w) const {
    const int64_t i0 = (w % nblk) * bw, cols = std::min(bw, inner - i0);
    return {w / nblk, i0, cols, cols / N * N, int(cols % N)};
  }
};

template <typename T, MaskKind MK>
void fwd_strided(const SoftmaxFwdArgs& a, bool stream) {
  using C = compute_t<T>;
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t n = a.n, inner = a.inner;
  const ColumnBlocks<T> blocks(n, inner, y, stream);
  const bool stream_ok = blocks.stream_ok;
  const C scale = C(a.scale), c = C(kLog2eD);
  const int64_t mds = a.mask_dim_stride, mcs = a.mask_col_stride;

  parallel_for(0, a.rows * blocks.nblk, blocks.grain, [&](int64_t w0, int64_t w1) {
    alignas(64) C ref[kMaxBlock];
    alignas(64) C inv[kMaxBlock];
    for (int64_t w = w0; w < w1; ++w) {
      const auto it = blocks.item(w);
      const int64_t o = it.o, i0 = it.i0, cols = it.cols, nfull = it.nfull;
      const int rem = it.rem;
      const T* xo = x + o * n * inner + i0;
      T* yo = y + o * n * inner + i0;
      const int64_t moff = MK == MaskKind::None ? 0 : a.mask_row.offset(o) + i0 * mcs;
      // logits of row k, columns [i, i + N) of the block (cnt < N: a partial vector, other lanes -inf)
      auto logits = [&](int64_t k, int64_t i, int cnt) -> V {
        const T* xk = xo + k * inner + i;
        V z = cnt == N ? vload(xk) : vload_n(xk, cnt, C(0));
        z = z * scale;
        if constexpr (MK == MaskKind::Float) {
          const C* m = static_cast<const C*>(a.mask) + moff + k * mds + i * mcs;
          z += mcs == 0 ? vsplat<C>(m[0]) : (cnt == N ? vload(m) : vload_n(m, cnt, C(0)));
        } else if constexpr (MK == MaskKind::Bool) {
          const uint8_t* m = static_cast<const uint8_t*>(a.mask) + moff + k * mds + i * mcs;
          for (int l = 0; l < cnt; ++l) z[l] = m[mcs == 0 ? 0 : l] ? z[l] : -kInf<C>;
        }
        if (a.causal && i0 + i + N - 1 > k) {
          for (int l = 0; l < N; ++l)
            if (i0 + i + l > k) z[l] = -kInf<C>;
        }
        return fill_from(z, cnt, -kInf<C>);
      };
      // causal: row k has no kept column in the block when k < i0
      const int64_t k_first = a.causal ? std::min(n, i0) : 0;
      for (int64_t i = 0; i < cols; i += N) vstore(ref + i, vsplat<C>(-kInf<C>));
      for (int64_t k = k_first; k < n; ++k) {
        int64_t i = 0;
        for (; i < nfull; i += N) vstore(ref + i, max_skipnan(vload(ref + i), logits(k, i, N)));
        if (rem) vstore(ref + i, max_skipnan(vload(ref + i), logits(k, i, rem)));
      }
      for (int64_t i = 0; i < cols; i += N) {
        V r = vload(ref + i);
        for (int l = 0; l < N; ++l) r[l] = usable_ref(r[l]);
        vstore(ref + i, r);
        vstore(inv + i, V{});
      }
      const V vc = vsplat<C>(c);
      for (int64_t k = k_first; k < n; ++k) {
        int64_t i = 0;
        for (; i < nfull; i += N)
          vstore(inv + i, vload(inv + i) + vexp2_nonpos((logits(k, i, N) - vload(ref + i)) * vc));
        if (rem) vstore(inv + i, vload(inv + i) + vexp2_nonpos((logits(k, i, rem) - vload(ref + i)) * vc));
      }
      for (int64_t i = 0; i < cols; i += N) {
        V s = vload(inv + i);
        for (int l = 0; l < N; ++l) s[l] = inverse_sum(s[l]);
        vstore(inv + i, s);
      }
      for (int64_t k = 0; k < n; ++k) {
        T* yk = yo + k * inner;
        int64_t i = 0;
        if (k < k_first) {
          for (; i < nfull; i += N) put(yk + i, V{}, stream_ok);
          if (rem) vstore_n(yk + i, V{}, rem);
          continue;
        }
        for (; i < nfull; i += N)
          put(yk + i, vexp2_nonpos((logits(k, i, N) - vload(ref + i)) * vc) * vload(inv + i), stream_ok);
        if (rem) vstore_n(yk + i, vexp2_nonpos((logits(k, i, rem) - vload(ref + i)) * vc) * vload(inv + i), rem);
      }
    }
    if (stream_ok) vstream_fence();
  });
}

// ---------------------------------------------------------------------------------------------
// backward: grad_x = scale * y * (grad_y - sum(grad_y * y))

template <typename T, typename C = compute_t<T>>
C dot_range(const T* g, const T* y, int64_t j0, int64_t j1) {
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  V a0 = V{}, a1 = V{}, a2 = V{}, a3 = V{};
  int64_t j = j0;
  for (; j + 4 * N <= j1; j += 4 * N) {
    a0 += vload(g + j) * vload(y + j);
    a1 += vload(g + j + N) * vload(y + j + N);
    a2 += vload(g + j + 2 * N) * vload(y + j + 2 * N);
    a3 += vload(g + j + 3 * N) * vload(y + j + 3 * N);
  }
  for (; j + N <= j1; j += N) a0 += vload(g + j) * vload(y + j);
  C d = hsum((a0 + a1) + (a2 + a3));
  for (; j < j1; ++j) d += to_float(g[j]) * to_float(y[j]);
  return d;
}

// gx[j0, j1); with next_g / next_y, the next row is prefetched meanwhile
template <typename T, typename C = compute_t<T>>
void bwd_write(const T* g, const T* y, T* gx, int64_t j0, int64_t j1, C dot, C s, bool stream,
               const T* next_g = nullptr, const T* next_y = nullptr) {
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  const V vd = vsplat<C>(dot), vs = vsplat<C>(s);
  write_range(
      gx, j0, j1, stream,
      [&](int64_t j) {
        if (next_g) {
          prefetch_l2<N * sizeof(T)>(next_g + j);
          prefetch_l2<N * sizeof(T)>(next_y + j);
        }
        return vload(y + j) * (vload(g + j) - vd) * vs;
      },
      [&](int64_t j) { return to_float(y[j]) * (to_float(g[j]) - dot) * s; });
}

template <typename T>
void bwd_rows(const SoftmaxBwdArgs& a, bool stream, bool split) {
  using C = compute_t<T>;
  const T* gy = static_cast<const T*>(a.grad_y);
  const T* y = static_cast<const T*>(a.y);
  T* gx = static_cast<T*>(a.grad_x);
  const int64_t n = a.n;
  const C s = C(a.scale);
  if (split) {
    for (int64_t r = 0; r < a.rows; ++r) {
      const T* g = gy + r * n;
      const T* yr = y + r * n;
      const int64_t nseg = (n + kSegment - 1) / kSegment;
      std::vector<C> part(nseg);
      parallel_for(0, nseg, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t q = s0; q < s1; ++q) part[q] = dot_range(g, yr, q * kSegment, std::min(n, (q + 1) * kSegment));
      });
      C dot = 0;
      for (C p : part) dot += p;
      parallel_for(0, nseg, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t q = s0; q < s1; ++q)
          bwd_write(g, yr, gx + r * n, q * kSegment, std::min(n, (q + 1) * kSegment), dot, s, stream);
        if (stream) vstream_fence();
      });
    }
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElems / n);
  parallel_for(0, a.rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gy + r * n;
      const T* yr = y + r * n;
      const bool next = r + 1 < r1 && n <= kRowInCache;
      bwd_write(g, yr, gx + r * n, 0, n, dot_range(g, yr, 0, n), s, stream, next ? g + n : nullptr,
                next ? yr + n : nullptr);
    }
    if (stream) vstream_fence();
  });
}

template <typename T>
void bwd_strided(const SoftmaxBwdArgs& a, bool stream) {
  using C = compute_t<T>;
  using V = vec_t<C>;
  constexpr int N = lanes_v<C>;
  const T* gy = static_cast<const T*>(a.grad_y);
  const T* y = static_cast<const T*>(a.y);
  T* gx = static_cast<T*>(a.grad_x);
  const int64_t n = a.n, inner = a.inner;
  const ColumnBlocks<T> blocks(n, inner, gx, stream);
  const bool stream_ok = blocks.stream_ok;
  const C s = C(a.scale);
  parallel_for(0, a.rows * blocks.nblk, blocks.grain, [&](int64_t w0, int64_t w1) {
    alignas(64) C dot[kMaxBlock];
    for (int64_t w = w0; w < w1; ++w) {
      const auto it = blocks.item(w);
      const int64_t o = it.o, i0 = it.i0, cols = it.cols, nfull = it.nfull;
      const int rem = it.rem;
      const int64_t base = o * n * inner + i0;
      auto ld = [&](const T* p, int cnt) -> V { return cnt == N ? vload(p) : vload_n(p, cnt, C(0)); };
      for (int64_t i = 0; i < cols; i += N) vstore(dot + i, V{});
      for (int64_t k = 0; k < n; ++k) {
        const int64_t off = base + k * inner;
        for (int64_t i = 0; i < cols; i += N) {
          const int cnt = i < nfull ? N : rem;
          vstore(dot + i, vload(dot + i) + ld(gy + off + i, cnt) * ld(y + off + i, cnt));
        }
      }
      const V vs = vsplat<C>(s);
      for (int64_t k = 0; k < n; ++k) {
        const int64_t off = base + k * inner;
        int64_t i = 0;
        for (; i < nfull; i += N)
          put(gx + off + i, vload(y + off + i) * (vload(gy + off + i) - vload(dot + i)) * vs, stream_ok);
        if (rem) vstore_n(gx + off + i, ld(y + off + i, rem) * (ld(gy + off + i, rem) - vload(dot + i)) * vs, rem);
      }
    }
    if (stream_ok) vstream_fence();
  });
}

bool wants_stream(int64_t rows, int64_t n, int64_t inner, int64_t elem_bytes) {
  return rows * n * std::max<int64_t>(inner, 1) * elem_bytes >= kStreamMinBytes;
}
// few rows longer than a segment: spread each row over the threads
bool wants_split(int64_t rows, int64_t n) { return n >= 2 * kSegment && rows < num_threads(); }

template <typename T>
void softmax_fwd_impl(const SoftmaxFwdArgs& a) {
  const bool stream = wants_stream(a.rows, a.n, a.inner, sizeof(T));
  if (a.inner > 1) {
    switch (a.mask_kind) {
      case MaskKind::None:
        return fwd_strided<T, MaskKind::None>(a, stream);
      case MaskKind::Bool:
        return fwd_strided<T, MaskKind::Bool>(a, stream);
      case MaskKind::Float:
        return fwd_strided<T, MaskKind::Float>(a, stream);
    }
    return;
  }
  const bool split = wants_split(a.rows, a.n);
  switch (a.mask_kind) {
    case MaskKind::None:
      return a.scale >= 0 ? fwd_rows<T, Src::Raw>(a, stream, split) : fwd_rows<T, Src::Scaled>(a, stream, split);
    case MaskKind::Bool:
      return fwd_rows<T, Src::Keep>(a, stream, split);
    case MaskKind::Float:
      return a.mask_col_stride == 0 ? fwd_rows<T, Src::AddConst>(a, stream, split)
                                    : fwd_rows<T, Src::Add>(a, stream, split);
  }
}

}  // namespace

void softmax_fwd(const SoftmaxFwdArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) { softmax_fwd_impl<decltype(tag)>(a); });
}

void softmax_bwd(const SoftmaxBwdArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool stream = wants_stream(a.rows, a.n, a.inner, sizeof(T));
    if (a.inner > 1) {
      bwd_strided<T>(a, stream);
    } else {
      bwd_rows<T>(a, stream, wants_split(a.rows, a.n));
    }
  });
}

}  // namespace fusedformer::cpu::FF_ISA
