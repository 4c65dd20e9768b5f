"""Training (python -m fusedformer train on a tiny config), its parts, and the shipped model: it loads,
streams text, its held-out perplexity on the standard library is the one its metrics.json records, and
its held-out files are disjoint from the training files."""

import json
import math
import os
import platform
import subprocess
import sys

import pytest
import torch

from fusedformer import cli, corpus, demo
from fusedformer.models import GPT
from fusedformer.textgen import SHIPPED_MODEL, load_model, stream_text
from fusedformer.tokenizer import IncrementalText, TextDecoder, load_tokenizer, train_bpe
from fusedformer import train as train_mod
from fusedformer.train import TrainConfig, evaluate, lr_at


def test_lr_schedule():
    cfg = TrainConfig(lr=1e-3, warmup=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.55e-3)  # half-way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_unigram_perplexity():
    ids = torch.arange(10).repeat(100)
    assert corpus.unigram_perplexity(ids, ids, 10) == pytest.approx(10.0, rel=1e-6)
    skewed = torch.tensor([0] * 90 + [1] * 10)
    assert corpus.unigram_perplexity(skewed, skewed, 2) < 1.5


def test_tokenizer_round_trip_and_streaming_decoder():
    tok = train_bpe(["def f(x):\n    return x + 1\n"] * 20 + ["naïve café ✓"], vocab_size=300)
    text = "def g(y):\n    return 'naïve ✓'\n"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    dec = TextDecoder(tok)
    assert "".join(dec.push(i) for i in ids) == text
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        train_bpe(["x"], vocab_size=100)


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_incremental_text_decodes_a_window_not_the_whole_stream(kind):
    """IncrementalText gives the text of every prefix of a stream (an unfinished UTF-8 character held
    back) while decoding a few tokens per step, not the whole stream; also for a tokenizer that drops
    the leading space of a decoded text (SentencePiece's metaspace)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = ["naïve café ✓ 日本語 and plain words"] * 20
    if kind == "byte-level":
        tok = train_bpe(corpus, vocab_size=300)
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    ids = tok.encode(" ".join(["naïve café ✓ 日本語 and words"] * 30)).ids
    decoded = []

    def decode(x):
        decoded.append(len(x))
        return tok.decode(x)

    inc = IncrementalText(decode)
    for k in range(1, len(ids) + 1):
        assert inc.update(ids[:k]) == tok.decode(ids[:k]).rstrip("\ufffd"), k
    assert len(ids) > 100 and sum(decoded) < 8 * len(ids)  # whole: len(ids)^2 / 2


def _write_corpus(folder):
    folder.mkdir()
    lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(60)]
    for k in range(12):
        (folder / f"m{k}.py").write_text("".join(lines[k * 5:(k + 1) * 5] * 3))
    (folder / "blob.bin").write_bytes(bytes(range(256)) * 4)  # not UTF-8: skipped


def test_train_command_tiny(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _write_corpus(data)
    rc = cli.main(["train", "--data", str(data), "--out", str(out), "--vocab-size", "300", "--context", "32",
                   "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--steps", "40", "--batch-size", "8",
                   "--warmup", "5", "--eval-every", "20", "--eval-batches", "2", "--lr", "3e-3", "--no-progress"])
    assert rc == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json", "loss.png"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    s, h = m["summary"], m["history"]
    assert len(h["train"]) == 40 and [v["step"] for v in h["val"]] == [20, 40]
    assert s["final_train_loss"] < h["train"][0]["loss"] - 1.0
    assert s["heldout_perplexity"] < s["unigram_perplexity"]
    model = GPT.from_pretrained(str(out))
    assert model.config.n_positions == 32 and model.config.vocab_size == 300
    # the generate command on that checkpoint
    r = subprocess.run([sys.executable, "-m", "fusedformer", "generate", "--model", str(out), "--prompt", "def f",
                        "--max-new-tokens", "8", "--seed", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def f") and "tokens/s" in r.stderr


def test_train_bf16_matmul_and_fused_adamw(tmp_path, monkeypatch):
    """--bf16-matmul trains with the bfloat16 precision set for the run only (512-row batches: the
    products take the op's blocked product), the preset turns it on and --no-bf16-matmul off; the
    optimizer is torch's fused AdamW on CPU parameters, and make_optimizer(fused=False) the default loop."""
    data, out = tmp_path / "data", tmp_path / "out"
    _write_corpus(data)
    seen = []
    real = train_mod._LossModule.forward

    def spy(self, *a, **k):
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        return real(self, *a, **k)

    monkeypatch.setattr(train_mod._LossModule, "forward", spy)
    before = torch.backends.mkldnn.matmul.fp32_precision
    rc = cli.main(["train", "--data", str(data), "--out", str(out), "--vocab-size", "300", "--context", "32",
                   "--d-model", "64", "--n-layer", "1", "--n-head", "2", "--steps", "30", "--batch-size", "16",
                   "--warmup", "5", "--eval-every", "30", "--eval-batches", "2", "--lr", "3e-3", "--no-progress",
                   "--bf16-matmul"])
    assert rc == 0
    assert seen and set(seen) == {"bf16"}
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    s = json.loads((out / "metrics.json").read_text())["summary"]
    assert s["config"]["bf16_matmul"] is True
    assert s["final_train_loss"] < json.loads((out / "metrics.json").read_text())["history"]["train"][0]["loss"] - 1.0
    parser = cli.build_parser()
    for argv, want in ((["--preset", "shakespeare-char"], True), (["--preset", "shakespeare-char", "--no-bf16-matmul"], False),
                       ([], False)):
        assert cli.train_config(parser.parse_args(["train", *argv])).bf16_matmul is want, argv
    model = GPT.from_pretrained(str(out))
    assert train_mod.make_optimizer(model, TrainConfig()).defaults["fused"] is True
    assert not train_mod.make_optimizer(model, TrainConfig(), fused=False).defaults["fused"]


def test_train_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        corpus.folder_files(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="no UTF-8 text file"):
        corpus.folder_files(str(tmp_path / "empty"))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="at least two documents"):
        corpus.split_files(corpus.folder_files(str(tmp_path / "one")))
    with pytest.raises(ValueError, match="none of the 1 held-out files"):
        corpus.split_files(corpus.folder_files(str(tmp_path / "one")), ["b.py"], tmp_path / "one")


def test_shipped_model_files():
    files = {n: os.path.getsize(os.path.join(SHIPPED_MODEL, n))
             for n in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json")}
    assert sum(files.values()) <= 10 * 2**20, files


def _shipped_heldout():
    with open(os.path.join(SHIPPED_MODEL, "metrics.json")) as f:
        heldout = json.load(f)["heldout"]
    version = heldout["corpus"].split()[1]
    if version != platform.python_version():
        pytest.skip(f"the shipped model's held-out files are from Python {version}'s standard library, "
                    f"this is {platform.python_version()}")
    return heldout


def test_shipped_heldout_files_are_disjoint_from_training_files():
    heldout = _shipped_heldout()
    train_files, val_files = corpus.split_files(corpus.default_corpus_files(), heldout["files"])
    assert corpus.relative_names(val_files) == heldout["files"]  # every listed file is there
    assert not set(train_files) & set(val_files)
    assert len(train_files) > 10 * len(val_files)
    # generated codec tables (near-copies of one another) are in neither part
    assert not any(corpus.is_generated(f) for f in train_files + val_files)
    assert any(corpus.is_generated(p) for p in (corpus.stdlib_root() / "encodings").glob("cp*.py"))


def test_train_reads_only_training_files_for_training(monkeypatch):
    """prepare_data (what train runs) fits the tokenizer and the training ids on the training files and
    evaluates on the shipped held-out list, on the default corpus."""
    heldout = set(_shipped_heldout()["files"])
    calls = []
    real = corpus.read_texts

    def spy(files, max_chars=None):
        calls.append([str(f) for f in files])
        return real(files[:40], max_chars)

    monkeypatch.setattr(corpus, "read_texts", spy)
    _, train_ids, val_ids, names = train_mod.prepare_data(TrainConfig(vocab_size=300), log=lambda *a: None)
    assert len(calls) == 2 and train_ids.numel() > 0 and val_ids.numel() > 0
    assert not set(corpus.relative_names(calls[0])) & heldout
    assert set(corpus.relative_names(calls[1])) == heldout == set(names)


def test_shipped_model_heldout_perplexity_is_the_recorded_one():
    """Held-out perplexity of the shipped model, on the windows its metrics.json names, within 10% of
    the recorded figure, and far below the unigram baseline of its training files."""
    heldout = _shipped_heldout()
    model, tok = load_model()
    _, val_files = corpus.split_files(corpus.default_corpus_files(), heldout["files"])
    val_ids = corpus.encode_stream(tok, corpus.read_texts(val_files))
    assert val_ids.numel() == heldout["tokens"]
    ppl = math.exp(evaluate(model, val_ids, heldout["context"], n_batches=heldout["eval_batches"]))
    assert abs(ppl - heldout["perplexity"]) <= 0.1 * heldout["perplexity"], (ppl, heldout["perplexity"])
    assert ppl < 0.2 * heldout["unigram_perplexity"], (ppl, heldout["unigram_perplexity"])


def test_shipped_model_streams_reproducibly():
    model, tok = load_model()
    runs = []
    for _ in range(2):
        pieces = []
        stats = stream_text(model, tok, "import os\n\ndef ", max_new_tokens=30, seed=1, temperature=0.8, top_p=0.95,
                            do_sample=True, write=pieces.append)
        runs.append("".join(pieces))
        assert 1 <= stats["tokens"] <= 30
    assert runs[0] == runs[1] and len(runs[0]) > 0
    assert load_tokenizer(SHIPPED_MODEL).get_vocab_size() == model.config.vocab_size


def test_demo_streams_from_the_shipped_model_and_compares_decode_speed():
    lines = []

    def out(*args, end="\n", flush=False):
        lines.append(" ".join(map(str, args)) + end)

    res = demo.run(batch=1, seq=16, d_model=32, heads=2, reps=1, new_tokens=12, timed_tokens=8, out=out,
                   requests=6, max_request_len=12)
    text = "".join(lines)
    assert "import os" in text and "tokens/s" in text
    # the serving part: the engine's greedy tokens equal static batching's (checked inside), both timed
    assert "serving 6 requests at once" in text and res["serving_tok_s"] > 0 and res["static_tok_s"] > 0
    assert res["same_tokens"], "greedy tokens of the fused and the plain-PyTorch model differ"
    assert res["gen_tokens_per_s"] > 0 and res["plain_tokens_per_s"] > 0
    assert res["err_out"] < 1e-4
