"""Generation and training benchmarks (suite ``generation``): fusedformer against HuggingFace
transformers' generate with the same weights, and one training step against the same model built from
torch.nn.

Cases (full run): a GPT-2-124M-shaped model with random weights, prompt 32 tokens, 128 new tokens, greedy:
batch 1 fp32, batch 1 with bf16 weights (against HF fp32), batch 8 (left-padded prompts); prefill of a
1024-token prompt (generate one token); one training step (AdamW, clipping) of the default
``python -m fusedformer train`` model (4 x 256, vocab 4096, context 256, batch 16) against
torch.nn.TransformerEncoderLayer blocks with the same weights, each with its loss as
``fusedformer.train.lm_loss`` computes it (ours: ``GPT.loss``, the LM head fused into the cross-entropy;
the peer: logits, then ``F.cross_entropy``). Decode tokens/s = new tokens x batch / time.
``--quick`` runs the same cases on a small model.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import Case, check_vs_peer, max_error, near_greedy

import fusedformer
from fusedformer.models import GPT
from fusedformer.train import TrainConfig, lm_loss, make_optimizer


_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _hf_gpt2(quick):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=1000, n_positions=256) if quick \
        else transformers.GPT2Config()  # 124M: 12 x 768, vocab 50257, 1024 positions
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.generation_config.eos_token_id = None  # random weights: no early stop, every run makes all tokens
    hf.generation_config.pad_token_id = 0
    return hf


def _prompts(vocab, batch, length, padded):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # rows shorter by 0, 4, 8, ... tokens, left-padded
        for i in range(batch):
            mask[i, :(4 * i) % length] = 0
        ids[mask == 0] = 0
    return ids, mask


def _equal_tokens(a, b, what):
    def check():
        x, y = a(), b()
        if not torch.equal(x, y):
            n = (x != y).nonzero()
            raise AssertionError(f"{what}: tokens differ from HF's (first at {n[0].tolist()})")
    return check


def _low_precision_check(hf, model, run_ours, ids, dtype, prompt):
    """Low-precision decode: the prompt's logits within twice HF's own error at that precision
    (against HF in float64), and every generated token a greedy choice of the model run without the
    KV cache (its logit within that error of the row's best), so the cached decode path is checked too."""
    def check():
        with torch.no_grad():
            want = copy.deepcopy(hf).double()(ids).logits
            theirs = copy.deepcopy(hf).to(dtype)(ids).logits
            got = model(ids)
            check_vs_peer(got, theirs, want, 1e-2, f"{dtype} prompt logits")
            tol = 2 * max_error(theirs, want) + 1e-2
            near_greedy(model, run_ours(), prompt, tol, f"{dtype} decode")
    return check


def _decode_case(hf, ours, shape, batch, prompt, new, dtype, quick, target):
    ids, mask = _prompts(hf.config.vocab_size, batch, prompt, padded=batch > 1)
    model = ours if dtype == torch.float32 else copy.deepcopy(ours).to(dtype)
    m = mask if batch > 1 else None

    def run_ours():
        return fusedformer.generate(model, ids, m, max_new_tokens=new, eos_token_id=[])

    def run_hf():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)

    peers = {"HF generate fp32": run_hf}
    if dtype == torch.float32:
        validate = _equal_tokens(run_ours, run_hf, f"greedy batch {batch}")
    else:
        validate = _low_precision_check(hf, model, run_ours, ids, dtype, prompt)
        hf_low = copy.deepcopy(hf).to(dtype)  # HF's own low-precision run, for reference
        peers["HF generate " + _NAMES[dtype]] = lambda: hf_low.generate(ids, attention_mask=mask, max_new_tokens=new,
                                                                        do_sample=False)
    return Case(op="generate", direction="decode", dtype=_NAMES[dtype], shape=f"{shape} b{batch} {prompt}+{new}",
                ours=run_ours, peers=peers, validate=validate, target=target, peer_dtype="fp32",
                note=f"{new * batch} new tokens per call; tokens/s = {new * batch} / time")


def _prefill_case(hf, ours, shape, length, target):
    ids, _ = _prompts(hf.config.vocab_size, 1, length, padded=False)

    def run_ours():
        return fusedformer.generate(ours, ids, max_new_tokens=1, eos_token_id=[])

    def run_hf():
        return hf.generate(ids, max_new_tokens=1, do_sample=False)

    return Case(op="generate", direction="prefill", dtype="fp32", shape=f"{shape} b1 {length}+1", ours=run_ours,
                peers={"HF generate fp32": run_hf}, validate=_equal_tokens(run_ours, run_hf, "prefill"),
                target=target, note="time to the first token")


class _TorchNNGPT(nn.Module):
    """The default training model built from torch.nn: nn.Embedding, nn.TransformerEncoderLayer
    (pre-norm, tanh-GELU, causal mask), nn.LayerNorm, nn.Linear tied to the embedding; weights copied
    from a fusedformer GPT."""

    def __init__(self, gpt):
        super().__init__()
        c = gpt.config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.n_positions, c.d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(c.d_model, c.n_head, c.d_ff, dropout=0.0, activation=nn.GELU("tanh"),
                                       batch_first=True, norm_first=True, layer_norm_eps=c.norm_eps)
            for _ in range(c.n_layer))
        self.norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.embed.weight
        with torch.no_grad():
            self.embed.weight.copy_(gpt.embed.weight)
            self.pos.weight.copy_(gpt.pos_embed.weight)
            self.norm.weight.copy_(gpt.norm.weight)
            self.norm.bias.copy_(gpt.norm.bias)
            for mine, blk in zip(self.layers, gpt.blocks):
                pairs = [(mine.self_attn.in_proj_weight, blk.attn.qkv.weight), (mine.self_attn.in_proj_bias, blk.attn.qkv.bias),
                         (mine.self_attn.out_proj.weight, blk.attn.out.weight), (mine.self_attn.out_proj.bias, blk.attn.out.bias),
                         (mine.linear1.weight, blk.mlp.up.weight), (mine.linear1.bias, blk.mlp.up.bias),
                         (mine.linear2.weight, blk.mlp.down.weight), (mine.linear2.bias, blk.mlp.down.bias),
                         (mine.norm1.weight, blk.norm_attn.weight), (mine.norm1.bias, blk.norm_attn.bias),
                         (mine.norm2.weight, blk.norm_mlp.weight), (mine.norm2.bias, blk.norm_mlp.bias)]
                for a, b in pairs:
                    a.copy_(b)

    def forward(self, x):
        L = x.shape[1]
        h = self.embed(x) + self.pos(torch.arange(L))
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        for layer in self.layers:
            h = layer(h, src_mask=causal, is_causal=True)
        return self.head(self.norm(h))


def _train_case(quick, target):
    d = TrainConfig()
    cfg = dict(vocab_size=d.vocab_size, n_positions=d.context, d_model=d.d_model, n_layer=d.n_layer, n_head=d.n_head)
    batch, ctx = d.batch_size, d.context
    if quick:
        cfg.update(vocab_size=512, n_positions=64, d_model=64, n_layer=2, n_head=4)
        batch, ctx = 4, 64
    torch.manual_seed(0)
    ours = GPT(**cfg, bos_token_id=0, eos_token_id=0)
    peer = _TorchNNGPT(ours)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg["vocab_size"], (batch, ctx), generator=g)
    y = torch.randint(0, cfg["vocab_size"], (batch, ctx), generator=g)
    opts = {id(m): make_optimizer(m, d) for m in (ours, peer)}

    def step(model):
        loss = lm_loss(model, x, y)  # ours: GPT.loss (head fused into the loss); the peer: F.cross_entropy
        opt = opts[id(model)]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), d.grad_clip)
        opt.step()
        return loss

    def validate():
        with torch.no_grad():
            a = lm_loss(ours, x, y)
            b = lm_loss(peer, x, y)
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-5):
            raise AssertionError(f"training loss {a.item()} != torch.nn model's {b.item()}")

    shape = f"{cfg['n_layer']}x{cfg['d_model']} V{cfg['vocab_size']} b{batch}x{ctx}"
    return Case(op="train_step", direction="fwd+bwd", dtype="fp32", shape=shape, ours=lambda: step(ours),
                peers={"torch.nn model": lambda: step(peer)}, validate=validate, target=target,
                note="forward, cross-entropy, backward, clip, AdamW step")


def cases(device, quick):
    if device != "cpu":
        return []
    hf = _hf_gpt2(quick)
    ours = GPT.from_hf(hf)
    shape = "gpt2-tiny" if quick else "gpt2-124M"
    prompt, new = (16, 16) if quick else (32, 128)
    return [
        _decode_case(hf, ours, shape, 1, prompt, new, torch.float32, quick, 1.0),
        _decode_case(hf, ours, shape, 1, prompt, new, torch.bfloat16, quick, 1.8),
        _decode_case(hf, ours, shape, 8, prompt, new, torch.float32, quick, 1.5),
        _prefill_case(hf, ours, shape, 128 if quick else 1024, 1.2),
        _train_case(quick, 1.2),
    ]
