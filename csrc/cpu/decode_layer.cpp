// decode_layer for the CPU dispatch key: one pre-norm decoder block for one new token per sequence,
// composed in C++ of the CPU implementations of the norm, (quantized) linear, attention and GELU ops,
// which check their own arguments.
#include <torch/library.h>

#include <cmath>
#include <string>
#include <string_view>
#include <vector>

#include "common/glue.h"
#include "common/layernorm.h"
#include "cpu/ops.h"
#include "fusedformer/cpu/kernels.h"

namespace fusedformer::cpu {
namespace {

constexpr const char* kOp = "fusedformer.decode_layer";
constexpr size_t kParams = 16, kLinears = 4;
// rows up to which the exact GELU is the fused kernel, as in fusedformer.models.MLP (FUSED_GELU_ROWS
// in python/fusedformer/ops/decode_layer.py); beyond, ATen's, which sets up a oneDNN primitive per call
constexpr int64_t kFusedGeluRows = 16;

// a norm's weight and bias, params[first] and params[first + 1]
struct Norm {
  std::optional<at::Tensor> weight, bias;
  Norm(const c10::List<std::optional<at::Tensor>>& params, size_t first)
      : weight(params.get(first)), bias(params.get(first + 1)) {}
};

// (norm(x + residual), x + residual), or (norm(x), x) without residual
std::pair<at::Tensor, at::Tensor> norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const Norm& n,
                                       bool rms, double eps) {
  const int64_t d = x.size(-1);
  NormFwd f = norm_fwd_args(rms, x, {d}, n.weight, rms ? std::nullopt : n.bias, eps, residual);
  kernels().norm_fwd(f.args);
  return {f.y, residual.has_value() ? f.h : x};
}

struct Projection {
  const c10::List<std::optional<at::Tensor>>& params;
  size_t first;  // index of the weight in params
  std::string_view scheme;

  at::Tensor operator()(const at::Tensor& x) const {
    const std::optional<at::Tensor> w = params.get(first), scale = params.get(first + 1),
                                    bias = params.get(first + 2);
    TORCH_CHECK_VALUE(w.has_value(), kOp, ": params[", first, "] (a projection's weight) must be a tensor");
    if (scheme.empty()) return cpu::linear(x, *w, bias);
    if (scheme == "torch") return at::linear(x, *w, bias);
    TORCH_CHECK_VALUE(scale.has_value(), kOp, ": params[", first + 1, "] (the scale of a ", scheme,
                      " projection) must be a tensor");
    return cpu::quantized_linear(x, *w, *scale, bias, c10::string_view(scheme.data(), scheme.size()));
  }
};

// x (B, H, 1, E) rotated: x * cos + rotate_half(x) * sin, as fusedformer.models.blocks.apply_rotary
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor rotated = at::cat({x.narrow(-1, half, x.size(-1) - half).neg(), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

std::tuple<at::Tensor, at::Tensor> decode_layer(const at::Tensor& h, const std::optional<at::Tensor>& delta,
                                                const c10::List<std::optional<at::Tensor>>& params,
                                                const std::vector<std::string>& schemes, const at::Tensor& k_cache,
                                                const at::Tensor& v_cache, int64_t position,
                                                const std::optional<at::Tensor>& key_mask,
                                                const std::optional<at::Tensor>& rope_cos,
                                                const std::optional<at::Tensor>& rope_sin, int64_t n_head, bool rms,
                                                double eps, c10::string_view activation) {
  check_float_dtype(h, kOp, "h");
  TORCH_CHECK_VALUE(h.dim() == 3 && h.size(1) == 1, kOp, ": h must be (batch, 1, d_model), got ", h.sizes());
  if (delta.has_value()) {
    TORCH_CHECK_VALUE(delta->sizes() == h.sizes(), kOp, ": delta must have h's shape ", h.sizes(), ", got ",
                      delta->sizes());
    check_same_dtype(h, "h", *delta, "delta", kOp);
  }
  TORCH_CHECK_VALUE(params.size() == kParams, kOp, ": params must hold ", kParams, " entries, got ", params.size());
  TORCH_CHECK_VALUE(schemes.size() == kLinears, kOp, ": schemes must hold ", kLinears, " entries, got ",
                    schemes.size());
  for (const char* name : {"k_cache", "v_cache"}) {
    const at::Tensor& c = name[0] == 'k' ? k_cache : v_cache;
    TORCH_CHECK_VALUE(c.dim() == 4 && c.size(0) == h.size(0), kOp, ": ", name, " must be (batch=", h.size(0),
                      ", kv_heads, max_len, head_dim), got ", c.sizes());
    check_same_dtype(h, "h", c, name, kOp);
    check_same_device(h, "h", c, name, kOp);
  }
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), kOp, ": v_cache must have k_cache's shape ",
                    k_cache.sizes(), ", got ", v_cache.sizes());
  const int64_t B = h.size(0), Hkv = k_cache.size(1), max_len = k_cache.size(2), E = k_cache.size(3);
  TORCH_CHECK_VALUE(position >= 0 && position < max_len, kOp, ": position must be in [0, ", max_len,
                    ") (the cache's max_len), got ", position);
  TORCH_CHECK_VALUE(n_head > 0 && n_head % Hkv == 0, kOp, ": n_head must be a positive multiple of the cache's ",
                    Hkv, " kv heads, got ", n_head);
  TORCH_CHECK_VALUE(rope_cos.has_value() == rope_sin.has_value(), kOp,
                    ": rope_cos and rope_sin must be given together");
  const std::string_view act(activation.data(), activation.size());
  TORCH_CHECK_VALUE(act == "gelu" || act == "gelu_tanh" || act == "relu" || act == "swiglu", kOp,
                    ": activation must be gelu, gelu_tanh, relu or swiglu, got ", act);
  // params: the attention norm at 0, the projections qkv, out at 2 and 5, the MLP norm at 8, the
  // projections up and down at 10 and 13
  constexpr size_t kFirst[kLinears] = {2, 5, 10, 13};
  auto proj = [&](size_t i) { return Projection{params, kFirst[i], schemes[i]}; };

  // attention: a = norm(h + delta); q, k, v = qkv(a)
  const std::optional<at::Tensor> residual = delta.has_value() ? std::optional<at::Tensor>(h) : std::nullopt;
  auto [a, h1] = norm(delta.has_value() ? *delta : h, residual, Norm(params, 0), rms, eps);
  const at::Tensor qkv = proj(0)(a);
  const int64_t Hq = n_head;
  TORCH_CHECK_VALUE(qkv.size(-1) == (Hq + 2 * Hkv) * E, kOp, ": the qkv projection gives ", qkv.size(-1),
                    " features; n_head ", Hq, " and the cache's ", Hkv, " kv heads of ", E, " need ",
                    (Hq + 2 * Hkv) * E);
  auto heads = [&](int64_t from, int64_t n) {  // (B, 1, n * E) -> (B, n, 1, E), a view
    return qkv.narrow(-1, from, n * E).view({B, 1, n, E}).transpose(1, 2);
  };
  at::Tensor q = heads(0, Hq), k = heads(Hq * E, Hkv), v = heads((Hq + Hkv) * E, Hkv);
  if (rope_cos.has_value()) {
    q = rotate(q, *rope_cos, *rope_sin);
    k = rotate(k, *rope_cos, *rope_sin);
  }
  k_cache.narrow(2, position, 1).copy_(k);
  v_cache.narrow(2, position, 1).copy_(v);
  const at::Tensor y =
      std::get<0>(cpu::attention_fwd(q, k_cache.narrow(2, 0, position + 1), v_cache.narrow(2, 0, position + 1),
                                     key_mask, 0.0, false, 1.0 / std::sqrt(static_cast<double>(E)), std::nullopt));
  const at::Tensor attn_out = proj(1)(y.transpose(1, 2).reshape({B, 1, Hq * E}));

  // MLP: a = norm(h1 + attn_out); down(act(up(a)))
  auto [a2, h2] = norm(attn_out, h1, Norm(params, 8), rms, eps);
  at::Tensor u = proj(2)(a2);
  if (act == "swiglu") {
    const int64_t f = u.size(-1) / 2;
    u = at::silu(u.narrow(-1, 0, f)).mul_(u.narrow(-1, f, f));
  } else if (act == "gelu_tanh" || (act == "gelu" && B <= kFusedGeluRows)) {
    cpu::gelu_inplace(u, act == "gelu" ? "none" : "tanh");
  } else if (act == "gelu") {
    at::gelu_(u, "none");
  } else {
    at::relu_(u);
  }
  return {h2, proj(3)(u)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) { m.impl("decode_layer", &decode_layer); }

}  // namespace fusedformer::cpu
