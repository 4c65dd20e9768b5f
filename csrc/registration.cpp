// Every fusedformer op schema, declared once. Forward and backward are separate ops; the device
// implementations live in csrc/cpu and csrc/cuda, autograd and fake (meta) registrations in
// python/fusedformer/ops.
#include <torch/library.h>

TORCH_LIBRARY(fusedformer, m) {
  // softmax(x * scale + mask) along dim; mask is bool (True = keep) or additive; is_causal masks
  // the last two dims (query i keeps key j <= i). Fully masked rows give zeros.
  m.def("softmax_fwd(Tensor x, int dim, float scale, Tensor? mask, bool is_causal) -> Tensor");
  m.def("softmax_bwd(Tensor grad_y, Tensor y, int dim, float scale) -> Tensor");

  // layer_norm / rms_norm; with residual, the input is h = input + residual and h is returned as
  // residual_out (an empty tensor without residual). mean and rstd are float32, one per row.
  m.def(
      "layer_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps, "
      "Tensor? residual) -> (Tensor out, Tensor residual_out, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor input, Tensor mean, Tensor rstd, "
      "Tensor? weight, bool has_bias, int[] normalized_shape) -> (Tensor grad_input, Tensor grad_weight, "
      "Tensor grad_bias)");
  m.def(
      "rms_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, float eps, Tensor? residual) -> "
      "(Tensor out, Tensor residual_out, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor input, Tensor rstd, Tensor? weight, "
      "int[] normalized_shape) -> (Tensor grad_input, Tensor grad_weight)");

  // scaled dot-product attention, (..., H, L, E) layout, top-left causal alignment, GQA when the
  // query has a multiple of the key/value heads. lse is float32 (..., H, L). seed (an integer
  // tensor) keys the dropout mask so that the backward recomputes the same one.
  m.def(
      "attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, "
      "bool is_causal, float scale, Tensor? seed) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
      "Tensor? attn_mask, float dropout_p, bool is_causal, float scale, Tensor? seed) -> "
      "(Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  // attention within each of several packed sequences (inference): query (T, Hq, E), key / value
  // (T, Hkv, E|Ev), sequence b the rows [cu_seqlens[b], cu_seqlens[b + 1]) (cu_seqlens int64, from 0 to T,
  // nondecreasing). Returns (T, Hq, Ev). CPU only.
  m.def(
      "attention_varlen_fwd(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens, bool is_causal, "
      "float scale) -> Tensor");

  // input @ weight.T + bias (nn.Linear), weight (out_features, in_features). The CPU kernel streams
  // the weights once for all rows: the path for few rows (generation); the backward is composed of
  // matmuls.
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");

  // input @ dequant(qweight).T + bias with quantized weights (inference; symmetric, zero point 0).
  // scheme "int8": qweight int8 (N, K), scale float32 (N,) per output channel, W = q * scale.
  // scheme "int4": qweight uint8 (N, K / 2), two values a byte, scale float32 (N, K / group_size),
  //   group_size a multiple of 32: in each block of 32 consecutive k, byte j holds element j in its
  //   low nibble and element j + 16 in its high nibble, stored as q + 8 (q in [-8, 7]).
  // scheme "nf4": the layout and scales of "int4"; a nibble c stands for level c of the 16 NF4 levels
  //   (kNF4Levels, csrc/include/fusedformer/quant_scheme.h) times the group's scale.
  // scheme "int8_dynamic": the weights of "int8"; each input row is quantized on the fly to int8
  //   (scale max|x| / 127) and the products are int8 x int8 with int32 accumulation.
  // scheme "int4_dynamic": the weights of "int4"; each input row is quantized to int8 in blocks of 32
  //   (a scale max|x| / 127 per block) and each block's products are summed in int32, then scaled by
  //   the block's and the group's scales.
  m.def("quantized_linear(Tensor input, Tensor qweight, Tensor scale, Tensor? bias, str scheme) -> Tensor");

  // GELU (torch.nn.functional.gelu): approximate is "none" (x * Phi(x), Phi the standard normal
  // CDF) or "tanh" (its tanh approximation). gelu_bwd returns grad * gelu'(input).
  m.def("gelu(Tensor input, str approximate) -> Tensor");
  m.def("gelu_bwd(Tensor grad, Tensor input, str approximate) -> Tensor");
  // gelu in place on a contiguous input (CPU)
  m.def("gelu_(Tensor(a!) input, str approximate) -> ()");

  // cross-entropy of logits rows (rows, n) against int64 class indices target (rows,): loss per row
  // (float32; float64 for float64 logits) logsumexp - logit of the target, and with compute_grad the
  // gradient of scale * sum(loss) (softmax - one_hot) * scale in logits' dtype (else an empty tensor);
  // rows whose target is ignore_index: loss 0, zero gradient. scale: a one-element tensor.
  m.def(
      "cross_entropy_rows(Tensor logits, Tensor target, Tensor scale, int ignore_index, bool compute_grad) -> "
      "(Tensor loss, Tensor grad)");

  // One pre-norm decoder block of the GPT models (fusedformer.models.Block) for one new token per
  // sequence, with a dense KV cache (inference, CPU): the block's ten or so ops in one call, for
  // decoding, where each op's Python and dispatch costs more than its work. h and delta (B, 1, D):
  // the residual stream and the last block's pending output (none before the first block); returns
  // (h + delta, the MLP's output). params, 16 entries: the attention norm's weight and bias, then
  // the qkv projection's [weight or qweight, scale, bias], the output projection's, the MLP norm's
  // weight and bias, the MLP's up and down projections'; schemes (4): "" for a float projection on
  // fusedformer.linear, "torch" for one on torch's (at::linear), else its quantized_linear scheme. The new key and value go to position
  // `position` of k_cache / v_cache (B, Hkv, max_len, E), and attention reads positions 0 ..
  // position with the bool key_mask (B, 1, 1, position + 1) when given. rope_cos / rope_sin (B, 1,
  // 1, E): rotary embedding of q and k (rotate-half). activation: gelu, gelu_tanh, relu or swiglu.
  m.def(
      "decode_layer(Tensor h, Tensor? delta, Tensor?[] params, str[] schemes, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, int position, Tensor? key_mask, Tensor? rope_cos, Tensor? rope_sin, int n_head, "
      "bool rms, float eps, str activation) -> (Tensor h_out, Tensor delta_out)");

  // Paged KV cache (serving). Caches (num_blocks, num_kv_heads, block_size, head_dim), one per layer
  // for keys and one for values. paged_cache_write stores token t's key and value rows (T,
  // num_kv_heads, head_dim) at slot_mapping[t] (int64; block slot // block_size, offset slot %
  // block_size; negative: skipped). paged_attention: packed queries (T, num_heads, head_dim) of B
  // sequences, sequence b the rows [query_start_loc[b], query_start_loc[b + 1]) (int64, B + 1), with a
  // context of seq_lens[b] tokens (int64, B) in blocks block_tables[b, :] (int64 or int32); its queries
  // are the last tokens of its context and attend causally (bottom-right aligned), GQA when num_heads
  // is a multiple of num_kv_heads. Returns (T, num_heads, head_dim) in the query dtype. Inference only.
  m.def(
      "paged_cache_write(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor seq_lens, Tensor query_start_loc, float scale) -> Tensor");
}
