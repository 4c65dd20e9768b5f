// CUDA softmax kernels: y = softmax(x * scale + mask) over contiguous rows (with the causal rule),
// and its backward grad_x = scale * y * (grad_y - sum(grad_y * y)).
//
// Rows that fit in registers are handled by a team of threads each (rows.cuh): one read of x (and
// the mask), one write of y. Longer rows take a block each and read x twice (an online max/sum
// pass, then the normalizing pass).
#pragma once

#include "fusedformer/cuda/rows.cuh"

namespace fusedformer::cuda {

// z = x * scale (+ mask) for one element of the row, -inf where masked or past `limit`
template <typename C, MaskKind MK>
__device__ __forceinline__ C softmax_logit(C x, int64_t col, int64_t limit, C scale, const void* mask,
                                          int64_t mcol) {
  if (col >= limit) return -c_inf<C>();
  C z = x * scale;
  if constexpr (MK == MaskKind::Float) {
    z += static_cast<const C*>(mask)[col * mcol];
  } else if constexpr (MK == MaskKind::Bool) {
    if (!static_cast<const uint8_t*>(mask)[col * mcol]) z = -c_inf<C>();
  }
  return z;
}

// row r keeps the columns [0, limit): all of them, or those up to its query index when causal
__device__ __forceinline__ int64_t causal_limit(const SoftmaxFwdArgs& p, int64_t r) {
  return p.causal ? min(p.n, r % p.causal_rows + 1) : p.n;
}

// row r's mask (nullptr without one)
template <typename C, MaskKind MK>
__device__ __forceinline__ const void* row_mask(const SoftmaxFwdArgs& p, int64_t r) {
  if constexpr (MK == MaskKind::Float) return static_cast<const C*>(p.mask) + p.mask_row.offset(r);
  if constexpr (MK == MaskKind::Bool) return static_cast<const uint8_t*>(p.mask) + p.mask_row.offset(r);
  return nullptr;
}

template <typename T, MaskKind MK, int VEC, int MAXV>
__global__ void __launch_bounds__(kRowsMaxThreads) softmax_fwd_rows_kernel(SoftmaxFwdArgs p, int team, int nv) {
  using C = compute_t<T>;
  __shared__ C scratch[32];
  const RowThread rt(team);
  const int64_t r = rt.row < p.rows ? rt.row : p.rows - 1;  // spare teams redo the last row, unstored
  const T* x = static_cast<const T*>(p.x) + r * p.n;
  const int64_t limit = causal_limit(p, r);
  const void* mask = row_mask<C, MK>(p, r);
  const C scale = C(p.scale);

  C z[MAXV][VEC];
  C mx = -c_inf<C>();
  bool nan = false;
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    const int64_t col = (int64_t(k) * team + rt.lane) * VEC;
    if (k < nv) {
      load_vec<VEC>(x, col, limit, C(0), z[k]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        z[k][i] = softmax_logit<C, MK>(z[k][i], col + i, limit, scale, mask, p.mask_col_stride);
        nan |= z[k][i] != z[k][i];
        mx = c_max(mx, z[k][i]);
      }
    }
  }
  mx = team_reduce<C, true>(mx, team, scratch);
  const bool row_nan = team_reduce<C, true>(nan ? C(1) : C(0), team, scratch) > C(0);
  C sum = 0;
  if (!row_nan && mx != -c_inf<C>()) {
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      if (k < nv) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          z[k][i] = c_exp(z[k][i] - mx);  // exp(-inf) = 0 for masked entries
          sum += z[k][i];
        }
      }
    }
  }
  sum = team_reduce<C, false>(sum, team, scratch);
  // NaN anywhere: the row is NaN (as torch.softmax); every entry masked: zeros
  const C inv = row_nan ? c_nan<C>() : (sum > C(0) ? C(1) / sum : C(0));
  if (rt.row >= p.rows) return;
  T* y = static_cast<T*>(p.y) + r * p.n;
  store_row<VEC, MAXV>(y, p.n, team, rt.lane, nv, [&](int k, int i) { return row_nan ? inv : z[k][i] * inv; });
}

// One block per row, for rows longer than the register-resident kernel holds.
// Max and sum of exp(v - max) of a row of `limit` values v(col) spread over a block's threads (an
// online pass, then block reductions); NaN values mark the row, -inf ones count for nothing.
template <typename C>
struct BlockRowStats {
  C max, sum;
  bool nan;
};

template <typename C, typename F>
__device__ __forceinline__ BlockRowStats<C> block_row_stats(int64_t limit, int team, C* scratch, F&& v) {
  const C ninf = -c_inf<C>();
  C m = ninf, s = 0;
  bool nan = false;
  for (int64_t col = threadIdx.x; col < limit; col += team) {
    const C z = v(col);
    nan |= z != z;
    if (z == ninf || z != z) continue;
    if (z > m) {
      s = s * c_exp(m - z) + C(1);
      m = z;
    } else {
      s += c_exp(z - m);
    }
  }
  const C mx = team_reduce<C, true>(m, team, scratch);
  const bool row_nan = team_reduce<C, true>(nan ? C(1) : C(0), team, scratch) > C(0);
  const C sum = team_reduce<C, false>(m == ninf ? C(0) : s * c_exp(m - mx), team, scratch);
  return {mx, sum, row_nan};
}

template <typename T, MaskKind MK>
__global__ void __launch_bounds__(kLongRowThreads) softmax_fwd_long_kernel(SoftmaxFwdArgs p) {
  using C = compute_t<T>;
  __shared__ C scratch[32];
  const int64_t r = blockIdx.x;
  const int team = blockDim.x;
  const T* x = static_cast<const T*>(p.x) + r * p.n;
  const int64_t limit = causal_limit(p, r);
  const void* mask = row_mask<C, MK>(p, r);
  const C scale = C(p.scale);
  const C ninf = -c_inf<C>();
  const BlockRowStats<C> st = block_row_stats<C>(limit, team, scratch, [&](int64_t col) {
    return softmax_logit<C, MK>(C(to_f(x[col])), col, limit, scale, mask, p.mask_col_stride);
  });
  const C mx = st.max, sum = st.sum;
  const bool row_nan = st.nan;
  const C inv = row_nan ? c_nan<C>() : (sum > C(0) ? C(1) / sum : C(0));
  T* y = static_cast<T*>(p.y) + r * p.n;
  for (int64_t col = threadIdx.x; col < p.n; col += team) {
    C o;
    if (row_nan) {
      o = inv;
    } else if (mx == ninf) {
      o = 0;
    } else {
      const C z = col < limit ? softmax_logit<C, MK>(C(to_f(x[col])), col, limit, scale, mask, p.mask_col_stride)
                              : ninf;
      o = c_exp(z - mx) * inv;
    }
    y[col] = from_c<T>(o);
  }
}

template <typename T, int VEC, int MAXV>
__global__ void __launch_bounds__(kRowsMaxThreads) softmax_bwd_rows_kernel(SoftmaxBwdArgs p, int team, int nv) {
  using C = compute_t<T>;
  __shared__ C scratch[32];
  const RowThread rt(team);
  const int64_t r = rt.row < p.rows ? rt.row : p.rows - 1;
  const T* g = static_cast<const T*>(p.grad_y) + r * p.n;
  const T* y = static_cast<const T*>(p.y) + r * p.n;
  C gv[MAXV][VEC], yv[MAXV][VEC];
  C dot = 0;
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    if (k < nv) {
      const int64_t col = (int64_t(k) * team + rt.lane) * VEC;
      load_vec<VEC>(g, col, p.n, C(0), gv[k]);
      load_vec<VEC>(y, col, p.n, C(0), yv[k]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) dot += gv[k][i] * yv[k][i];
    }
  }
  dot = team_reduce<C, false>(dot, team, scratch);
  if (rt.row >= p.rows) return;
  const C scale = C(p.scale);
  T* gx = static_cast<T*>(p.grad_x) + r * p.n;
  store_row<VEC, MAXV>(gx, p.n, team, rt.lane, nv,
                       [&](int k, int i) { return yv[k][i] * (gv[k][i] - dot) * scale; });
}

template <typename T>
__global__ void __launch_bounds__(kLongRowThreads) softmax_bwd_long_kernel(SoftmaxBwdArgs p) {
  using C = compute_t<T>;
  __shared__ C scratch[32];
  const int64_t r = blockIdx.x;
  const int team = blockDim.x;
  const T* g = static_cast<const T*>(p.grad_y) + r * p.n;
  const T* y = static_cast<const T*>(p.y) + r * p.n;
  C dot = 0;
  for (int64_t col = threadIdx.x; col < p.n; col += team) dot += C(to_f(g[col])) * C(to_f(y[col]));
  dot = team_reduce<C, false>(dot, team, scratch);
  const C scale = C(p.scale);
  T* gx = static_cast<T*>(p.grad_x) + r * p.n;
  for (int64_t col = threadIdx.x; col < p.n; col += team)
    gx[col] = from_c<T>(C(to_f(y[col])) * (C(to_f(g[col])) - dot) * scale);
}

}  // namespace fusedformer::cuda
