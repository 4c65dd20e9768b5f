// CUDA LayerNorm / RMSNorm kernels, with the fused residual form (h = x + residual, rounded to the
// input dtype as the unfused code has it, then normalized).
//
// Forward: a team of threads per row holds the row in registers (rows.cuh): one read of x (and the
// residual), one write of y (and h). Backward: the same for grad_x; the weight and bias gradients
// are summed per block over the block's rows (a fixed set: blocks stride over the rows), written as
// one partial row per block, and a second kernel sums the partials in block order. Both are
// deterministic. Rows too long for registers take the *_long kernels (a block per row, several
// passes over global memory).
#pragma once

#include "fusedformer/cuda/rows.cuh"

namespace fusedformer::cuda {

// the backward keeps four register rows per thread (x-hat, weighted gradient and the two partial
// sums): its blocks are at most this large, so that each thread can have up to 255 registers
constexpr int kNormBwdMaxThreads = 256;

template <typename C>
__device__ __forceinline__ C param_at(const void* p, int64_t j, C dflt) {
  return p ? static_cast<const C*>(p)[j] : dflt;
}

template <typename T, bool RMS, bool RES, int VEC, int MAXV>
__global__ void __launch_bounds__(kRowsMaxThreads) norm_fwd_rows_kernel(NormFwdArgs p, int team, int nv) {
  using C = compute_t<T>;
  __shared__ C scratch[32];
  const RowThread rt(team);
  const int64_t r = rt.row < p.rows ? rt.row : p.rows - 1;
  const bool store = rt.row < p.rows;
  const int64_t n = p.n;
  const T* x = static_cast<const T*>(p.x) + r * n;
  C v[MAXV][VEC];
  C s = 0;
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    if (k < nv) {
      const int64_t col = (int64_t(k) * team + rt.lane) * VEC;
      load_vec<VEC>(x, col, n, C(0), v[k]);
      if constexpr (RES) {
        C rv[VEC];
        load_vec<VEC>(static_cast<const T*>(p.residual) + r * n, col, n, C(0), rv);
        T hv[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          hv[i] = from_c<T>(v[k][i] + rv[i]);
          v[k][i] = col + i < n ? C(to_f(hv[i])) : C(0);  // the rounded h
        }
        if (store) {
          C hc[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) hc[i] = v[k][i];
          store_vec<VEC>(static_cast<T*>(p.h_out) + r * n, col, n, hc);
        }
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) s += v[k][i];
    }
  }
  C mean = 0;
  if constexpr (!RMS) mean = team_reduce<C, false>(s, team, scratch) / C(n);
  C s2 = 0;
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    if (k < nv) {
      const int64_t col = (int64_t(k) * team + rt.lane) * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const C d = col + i < n ? v[k][i] - mean : C(0);
        s2 += d * d;
      }
    }
  }
  s2 = team_reduce<C, false>(s2, team, scratch);
  const C rstd = c_rsqrt(s2 / C(n) + C(p.eps));
  if (!store) return;
  if (rt.lane == 0) {
    if constexpr (!RMS) static_cast<C*>(p.mean)[r] = mean;
    static_cast<C*>(p.rstd)[r] = rstd;
  }
  T* y = static_cast<T*>(p.y) + r * n;
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    if (k < nv) {
      const int64_t col = (int64_t(k) * team + rt.lane) * VEC;
      C o[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int64_t j = col + i < n ? col + i : 0;
        o[i] = (v[k][i] - mean) * rstd * param_at<C>(p.weight, j, C(1)) + param_at<C>(p.bias, j, C(0));
      }
      store_vec<VEC>(y, col, n, o);
    }
  }
}

// a block per row, rows of any length: x (and the residual) are read three times
template <typename T, bool RMS, bool RES>
__global__ void __launch_bounds__(kLongRowThreads) norm_fwd_long_kernel(NormFwdArgs p) {
  using C = compute_t<T>;
  __shared__ C scratch[32];
  const int64_t r = blockIdx.x, n = p.n;
  const int team = blockDim.x;
  const T* x = static_cast<const T*>(p.x) + r * n;
  const T* res = RES ? static_cast<const T*>(p.residual) + r * n : nullptr;
  T* h = RES ? static_cast<T*>(p.h_out) + r * n : nullptr;
  auto value = [&](int64_t j) -> C {
    if constexpr (RES) {
      return C(to_f(from_c<T>(C(to_f(x[j])) + C(to_f(res[j])))));
    } else {
      return C(to_f(x[j]));
    }
  };
  C s = 0;
  for (int64_t j = threadIdx.x; j < n; j += team) {
    const C v = value(j);
    if constexpr (RES) h[j] = from_c<T>(v);
    s += v;
  }
  C mean = 0;
  if constexpr (!RMS) mean = team_reduce<C, false>(s, team, scratch) / C(n);
  C s2 = 0;
  for (int64_t j = threadIdx.x; j < n; j += team) {
    const C d = value(j) - mean;
    s2 += d * d;
  }
  s2 = team_reduce<C, false>(s2, team, scratch);
  const C rstd = c_rsqrt(s2 / C(n) + C(p.eps));
  if (threadIdx.x == 0) {
    if constexpr (!RMS) static_cast<C*>(p.mean)[r] = mean;
    static_cast<C*>(p.rstd)[r] = rstd;
  }
  T* y = static_cast<T*>(p.y) + r * n;
  for (int64_t j = threadIdx.x; j < n; j += team)
    y[j] = from_c<T>((value(j) - mean) * rstd * param_at<C>(p.weight, j, C(1)) + param_at<C>(p.bias, j, C(0)));
}

// Backward. Block b handles rows (b + k * gridDim.x) * rows_per_block + team index; its teams add
// their weight/bias partials into shared memory one team after the other (a fixed order), then the
// block writes its partial row.
template <typename T, bool RMS, int VEC, int MAXV>
__global__ void __launch_bounds__(kNormBwdMaxThreads) norm_bwd_rows_kernel(NormBwdArgs p, int team, int nv) {
  using C = compute_t<T>;
  __shared__ C scratch[32];
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rpb = blockDim.x / team;
  const int t = threadIdx.x / team, lane = threadIdx.x % team;
  const int64_t n = p.n;
  const bool want_w = p.grad_weight != nullptr, want_b = p.grad_bias != nullptr;
  C pw[MAXV][VEC], pb[MAXV][VEC];
#pragma unroll
  for (int k = 0; k < MAXV; ++k)
#pragma unroll
    for (int i = 0; i < VEC; ++i) pw[k][i] = pb[k][i] = C(0);

  for (int64_t base = int64_t(blockIdx.x) * rpb; base < p.rows; base += int64_t(gridDim.x) * rpb) {
    const bool valid = base + t < p.rows;
    const int64_t r = valid ? base + t : p.rows - 1;
    const T* x = static_cast<const T*>(p.x) + r * n;
    const T* g = static_cast<const T*>(p.grad_y) + r * n;
    const C mean = RMS ? C(0) : static_cast<const C*>(p.mean)[r];
    const C rstd = static_cast<const C*>(p.rstd)[r];
    C xh[MAXV][VEC], gw[MAXV][VEC];
    C s1 = 0, s2 = 0;
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      if (k < nv) {
        const int64_t col = (int64_t(k) * team + lane) * VEC;
        C gv[VEC];
        load_vec<VEC>(x, col, n, C(0), xh[k]);
        load_vec<VEC>(g, col, n, C(0), gv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const bool in = col + i < n;
          const int64_t j = in ? col + i : 0;
          xh[k][i] = in ? (xh[k][i] - mean) * rstd : C(0);
          if (valid) {
            pw[k][i] += gv[i] * xh[k][i];
            pb[k][i] += gv[i];
          }
          gw[k][i] = gv[i] * param_at<C>(p.weight, j, C(1));
          s1 += gw[k][i];
          s2 += gw[k][i] * xh[k][i];
        }
      }
    }
    if constexpr (!RMS) s1 = team_reduce<C, false>(s1, team, scratch);
    s2 = team_reduce<C, false>(s2, team, scratch);
    const C m1 = RMS ? C(0) : s1 / C(n), m2 = s2 / C(n);
    if (valid) {
      T* gx = static_cast<T*>(p.grad_x) + r * n;
      const T* gh = p.grad_h ? static_cast<const T*>(p.grad_h) + r * n : nullptr;
#pragma unroll
      for (int k = 0; k < MAXV; ++k) {
        if (k < nv) {
          const int64_t col = (int64_t(k) * team + lane) * VEC;
          C o[VEC], hv[VEC];
          if (gh) load_vec<VEC>(gh, col, n, C(0), hv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) o[i] = (gw[k][i] - m1 - xh[k][i] * m2) * rstd + (gh ? hv[i] : C(0));
          store_vec<VEC>(gx, col, n, o);
        }
      }
    }
  }
  if (!want_w && !want_b) return;
  // the block's partial: teams add in order into shared memory (one team: straight to global)
  C* acc_w = reinterpret_cast<C*>(smem_raw);
  C* acc_b = acc_w + (want_w ? n : 0);
  for (int turn = 0; turn < rpb; ++turn) {
    if (t == turn) {
#pragma unroll
      for (int k = 0; k < MAXV; ++k) {
        if (k < nv) {
          const int64_t col = (int64_t(k) * team + lane) * VEC;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const int64_t j = col + i;
            if (j >= n) continue;
            if (rpb == 1) {
              if (want_w) static_cast<C*>(p.grad_weight)[blockIdx.x * n + j] = pw[k][i];
              if (want_b) static_cast<C*>(p.grad_bias)[blockIdx.x * n + j] = pb[k][i];
            } else {
              if (want_w) acc_w[j] = turn == 0 ? pw[k][i] : acc_w[j] + pw[k][i];
              if (want_b) acc_b[j] = turn == 0 ? pb[k][i] : acc_b[j] + pb[k][i];
            }
          }
        }
      }
    }
    if (rpb > 1) __syncthreads();
  }
  if (rpb > 1) {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      if (want_w) static_cast<C*>(p.grad_weight)[blockIdx.x * n + j] = acc_w[j];
      if (want_b) static_cast<C*>(p.grad_bias)[blockIdx.x * n + j] = acc_b[j];
    }
  }
}

// Rows of any length: block b handles rows b, b + gridDim.x, ...; each thread owns the columns
// threadIdx.x + k * blockDim.x of the block's partial rows (in global memory).
template <typename T, bool RMS>
__global__ void __launch_bounds__(kLongRowThreads) norm_bwd_long_kernel(NormBwdArgs p) {
  using C = compute_t<T>;
  __shared__ C scratch[32];
  const int64_t n = p.n;
  const int team = blockDim.x;
  C* part_w = p.grad_weight ? static_cast<C*>(p.grad_weight) + blockIdx.x * n : nullptr;
  C* part_b = p.grad_bias ? static_cast<C*>(p.grad_bias) + blockIdx.x * n : nullptr;
  for (int64_t j = threadIdx.x; j < n; j += team) {
    if (part_w) part_w[j] = C(0);
    if (part_b) part_b[j] = C(0);
  }
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + r * n;
    const T* g = static_cast<const T*>(p.grad_y) + r * n;
    const C mean = RMS ? C(0) : static_cast<const C*>(p.mean)[r];
    const C rstd = static_cast<const C*>(p.rstd)[r];
    C s1 = 0, s2 = 0;
    for (int64_t j = threadIdx.x; j < n; j += team) {
      const C xh = (C(to_f(x[j])) - mean) * rstd;
      const C gv = C(to_f(g[j]));
      const C gw = gv * param_at<C>(p.weight, j, C(1));
      s1 += gw;
      s2 += gw * xh;
      if (part_w) part_w[j] += gv * xh;
      if (part_b) part_b[j] += gv;
    }
    if constexpr (!RMS) s1 = team_reduce<C, false>(s1, team, scratch);
    s2 = team_reduce<C, false>(s2, team, scratch);
    const C m1 = RMS ? C(0) : s1 / C(n), m2 = s2 / C(n);
    T* gx = static_cast<T*>(p.grad_x) + r * n;
    const T* gh = p.grad_h ? static_cast<const T*>(p.grad_h) + r * n : nullptr;
    for (int64_t j = threadIdx.x; j < n; j += team) {
      const C xh = (C(to_f(x[j])) - mean) * rstd;
      const C gw = C(to_f(g[j])) * param_at<C>(p.weight, j, C(1));
      gx[j] = from_c<T>((gw - m1 - xh * m2) * rstd + (gh ? C(to_f(gh[j])) : C(0)));
    }
  }
}

// out[j] = sum over parts of part[q * n + j], in part order
template <typename C>
__global__ void sum_partials_kernel(const C* __restrict__ part, C* __restrict__ out, int64_t parts, int64_t n) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  C s = 0;
  for (int64_t q = 0; q < parts; ++q) s += part[q * n + j];
  out[j] = s;
}

}  // namespace fusedformer::cuda
