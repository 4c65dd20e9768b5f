"""Weight import from HuggingFace transformers models (GPT2LMHeadModel, LlamaForCausalLM, BertModel).

transformers is only needed by the caller who has such a model; this module reads its config and
state dict and maps the names onto ours.
"""

import torch

from .checkpoint import load_state
from .config import EncoderConfig, GPTConfig


def _cfg(hf, *names, default=None):
    for n in names:
        v = getattr(hf, n, None)
        if v is not None:
            return v
    return default


def _rope_theta(hf):
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    if isinstance(params, dict):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(f"GPT.from_hf: rope type {kind!r} is not supported (only the default rotary embedding)")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(_cfg(hf, "rope_theta", default=10000.0))


def _gpt2(hf_model):
    hf = hf_model.config
    act = hf.activation_function
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"GPT.from_hf: GPT-2 activation {act!r} is not supported")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(hf, flag, False):
            raise ValueError(f"GPT.from_hf: GPT-2 option {flag}=True is not supported")
    config = GPTConfig(
        vocab_size=hf.vocab_size, n_positions=hf.n_positions, d_model=hf.n_embd, n_layer=hf.n_layer,
        n_head=hf.n_head, d_ff=hf.n_inner or 4 * hf.n_embd, norm="layernorm", norm_eps=hf.layer_norm_epsilon,
        activation="gelu" if act == "gelu" else "gelu_tanh", positions="learned", attn_bias=True, out_bias=True,
        mlp_bias=True, tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id)
    sd = hf_model.state_dict()
    out = {"embed.weight": sd["transformer.wte.weight"], "pos_embed.weight": sd["transformer.wpe.weight"],
           "norm.weight": sd["transformer.ln_f.weight"], "norm.bias": sd["transformer.ln_f.bias"]}
    out["head.weight"] = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    for i in range(hf.n_layer):
        p, q = f"transformer.h.{i}.", f"blocks.{i}."
        # GPT-2's Conv1D stores weights as (in, out)
        for src, dst in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.out"), ("mlp.c_fc", "mlp.up"),
                         ("mlp.c_proj", "mlp.down")):
            out[q + dst + ".weight"] = sd[p + src + ".weight"].t()
            out[q + dst + ".bias"] = sd[p + src + ".bias"]
        for src, dst in (("ln_1", "norm_attn"), ("ln_2", "norm_mlp")):
            out[q + dst + ".weight"] = sd[p + src + ".weight"]
            out[q + dst + ".bias"] = sd[p + src + ".bias"]
    return config, out


def _llama(hf_model):
    hf = hf_model.config
    if hf.hidden_act != "silu":
        raise ValueError(f"GPT.from_hf: Llama activation {hf.hidden_act!r} is not supported")
    n_kv = hf.num_key_value_heads or hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    eos = hf.eos_token_id[0] if isinstance(hf.eos_token_id, (list, tuple)) else hf.eos_token_id
    config = GPTConfig(
        vocab_size=hf.vocab_size, n_positions=hf.max_position_embeddings, d_model=hf.hidden_size,
        n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads, n_kv_head=n_kv, head_dim=head_dim,
        d_ff=hf.intermediate_size, norm="rmsnorm", norm_eps=hf.rms_norm_eps, activation="swiglu",
        positions="rotary", rope_theta=_rope_theta(hf), attn_bias=bool(getattr(hf, "attention_bias", False)),
        out_bias=bool(getattr(hf, "attention_bias", False)), mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        bos_token_id=hf.bos_token_id, eos_token_id=eos, pad_token_id=hf.pad_token_id)
    sd = hf_model.state_dict()
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for i in range(hf.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        a = p + "self_attn."
        out[q + "attn.qkv.weight"] = torch.cat([sd[a + f"{n}_proj.weight"] for n in "qkv"])
        if config.attn_bias:
            out[q + "attn.qkv.bias"] = torch.cat([sd[a + f"{n}_proj.bias"] for n in "qkv"])
            out[q + "attn.out.bias"] = sd[a + "o_proj.bias"]
        out[q + "attn.out.weight"] = sd[a + "o_proj.weight"]
        m = p + "mlp."
        out[q + "mlp.up.weight"] = torch.cat([sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]])
        out[q + "mlp.down.weight"] = sd[m + "down_proj.weight"]
        if config.mlp_bias:
            out[q + "mlp.up.bias"] = torch.cat([sd[m + "gate_proj.bias"], sd[m + "up_proj.bias"]])
            out[q + "mlp.down.bias"] = sd[m + "down_proj.bias"]
        out[q + "norm_attn.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "norm_mlp.weight"] = sd[p + "post_attention_layernorm.weight"]
    return config, out


def gpt_from_hf(cls, hf_model):
    kind = getattr(hf_model.config, "model_type", None)
    if kind == "gpt2":
        config, state = _gpt2(hf_model)
    elif kind == "llama":
        config, state = _llama(hf_model)
    else:
        raise ValueError(f"GPT.from_hf: expected a GPT2LMHeadModel or LlamaForCausalLM, got model_type {kind!r}")
    p = next(hf_model.parameters())
    model = cls(config).to(p.dtype)
    load_state(model, state, f"HF {type(hf_model).__name__}")
    return model.to(p.device).eval()


def encoder_from_hf(cls, hf_model, pooling="mean"):
    hf = hf_model.config
    if getattr(hf, "model_type", None) != "bert":
        raise ValueError(f"Encoder.from_hf: expected a BertModel, got model_type {getattr(hf, 'model_type', None)!r}")
    if hf.hidden_act not in ("gelu", "relu", "gelu_new"):
        raise ValueError(f"Encoder.from_hf: activation {hf.hidden_act!r} is not supported")
    pet = getattr(hf, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise ValueError(f"Encoder.from_hf: position_embedding_type {pet!r} is not supported")
    sd = hf_model.state_dict()
    prefix = "bert." if any(k.startswith("bert.") for k in sd) else ""
    has_pooler = prefix + "pooler.dense.weight" in sd
    if pooling == "pooler" and not has_pooler:
        raise ValueError("Encoder.from_hf: pooling='pooler' but the model has no pooler")
    config = EncoderConfig(
        vocab_size=hf.vocab_size, n_positions=hf.max_position_embeddings, type_vocab_size=hf.type_vocab_size,
        d_model=hf.hidden_size, n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
        d_ff=hf.intermediate_size, norm_eps=hf.layer_norm_eps,
        activation={"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh"}[hf.hidden_act],
        pooling=pooling, pad_token_id=hf.pad_token_id or 0)
    e = prefix + "embeddings."
    out = {"embed.weight": sd[e + "word_embeddings.weight"], "pos_embed.weight": sd[e + "position_embeddings.weight"],
           "type_embed.weight": sd[e + "token_type_embeddings.weight"],
           "embed_norm.weight": sd[e + "LayerNorm.weight"], "embed_norm.bias": sd[e + "LayerNorm.bias"]}
    for i in range(hf.num_hidden_layers):
        p, q = f"{prefix}encoder.layer.{i}.", f"blocks.{i}."
        s = p + "attention.self."
        for t in ("weight", "bias"):
            out[q + f"attn.qkv.{t}"] = torch.cat([sd[s + f"{n}.{t}"] for n in ("query", "key", "value")])
            out[q + f"attn.out.{t}"] = sd[p + f"attention.output.dense.{t}"]
            out[q + f"norm_attn.{t}"] = sd[p + f"attention.output.LayerNorm.{t}"]
            out[q + f"mlp.up.{t}"] = sd[p + f"intermediate.dense.{t}"]
            out[q + f"mlp.down.{t}"] = sd[p + f"output.dense.{t}"]
            out[q + f"norm_mlp.{t}"] = sd[p + f"output.LayerNorm.{t}"]
    if pooling == "pooler":
        out["pooler.weight"] = sd[prefix + "pooler.dense.weight"]
        out["pooler.bias"] = sd[prefix + "pooler.dense.bias"]
    p = next(hf_model.parameters())
    model = cls(config).to(p.dtype)
    load_state(model, state=out, source=f"HF {type(hf_model).__name__}")
    return model.to(p.device).eval()
