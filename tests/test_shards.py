"""Token shards (python -m fusedformer prepare): they decode back to the text, use uint16 or uint32 by the
vocabulary's size, split documents into disjoint training and validation parts, cut across shard
files, and train --data-dir trains from them by memory map."""

import json
import os

import numpy as np
import pytest
import torch

from fusedformer import cli, shards
from fusedformer.errors import UserError
from fusedformer.tokenizer import load_tokenizer

DOCS = {f"d{k:02d}.txt": "".join(f"Line {i} of document {k}: naïve café ✓ {'xyz' * (i % 4)}\n" for i in range(40))
        for k in range(12)}


def _write(folder, docs):
    folder.mkdir()
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    return str(folder)


def _decoded_documents(out, split, tok):
    """The split's documents: its token stream cut at the end-of-text ids, decoded."""
    ids = shards.TokenStream(out, split).to_tensor().tolist()
    docs, cur = [], []
    for i in ids:
        if i == 0:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert not cur, "the stream does not end with an end-of-text id"
    return docs


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_shards_round_trip_the_text(tmp_path, kind):
    data = _write(tmp_path / "data", DOCS)
    out = str(tmp_path / "shards")
    index = shards.prepare(data, out, tokenizer=kind, vocab_size=300, val_fraction=0.25, shard_tokens=997,
                           log=lambda *a: None)
    assert index["dtype"] == "uint16" and index["tokenizer"] == kind
    tok = load_tokenizer(out)
    assert index["vocab_size"] == tok.get_vocab_size()
    # the documents are split, disjoint and complete
    train_docs, val_docs = index["train"]["documents"], index["val"]["documents"]
    assert not set(train_docs) & set(val_docs) and sorted(train_docs + val_docs) == sorted(DOCS)
    assert len(val_docs) == 3
    # several shard files of at most 997 tokens, whose sizes are what the index says
    assert len(index["train"]["shards"]) > 2
    for split in ("train", "val"):
        for s in index[split]["shards"]:
            assert 0 < s["tokens"] <= 997 and os.path.getsize(os.path.join(out, s["file"])) == 2 * s["tokens"]
        # decoding a split's stream gives its documents back, in order
        assert _decoded_documents(out, split, tok) == [DOCS[n] for n in index[split]["documents"]]
    # windows read across shard boundaries equal the same tokens of the whole stream
    stream = shards.TokenStream(out, "train")
    whole = stream.to_tensor()
    starts = [0, 990, 996, len(stream) - 40]
    torch.testing.assert_close(stream.windows(starts, 40), torch.stack([whole[s:s + 40] for s in starts]))
    assert json.loads(open(os.path.join(out, "index.json")).read()) == index


def test_dtype_follows_the_vocabulary(tmp_path):
    assert shards.dtype_for(256) == np.uint16 and shards.dtype_for(65535) == np.uint16
    assert shards.dtype_for(65536) == np.uint32 and shards.dtype_for(200_000) == np.uint32
    # a character vocabulary of more than 65535 characters: uint32 shards that still round-trip
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 72000) if not 0xD800 <= c <= 0xDFFF]
    docs = {"a.txt": "".join(chars[: len(chars) // 2]), "b.txt": "".join(chars[len(chars) // 2:]),
            "c.txt": "".join(chars[::7])}
    data = _write(tmp_path / "data", docs)
    out = str(tmp_path / "shards")
    index = shards.prepare(data, out, tokenizer="char", val_fraction=0.3, log=lambda *a: None)
    assert index["vocab_size"] > 65535 and index["dtype"] == "uint32"
    tok = load_tokenizer(out)
    for split in ("train", "val"):
        assert _decoded_documents(out, split, tok) == [docs[n] for n in index[split]["documents"]]


def test_single_file_is_split_by_characters(tmp_path):
    text = "".join(f"to be or not to be, line {i}\n" for i in range(200))
    data = _write(tmp_path / "data", {"only.txt": text})
    out = str(tmp_path / "shards")
    shards.prepare(data, out, tokenizer="char", val_fraction=0.1, log=lambda *a: None)
    tok = load_tokenizer(out)
    train_text = _decoded_documents(out, "train", tok)[0]
    val_text = _decoded_documents(out, "val", tok)[0]
    assert train_text + val_text == text and len(val_text) == len(text) - int(len(text) * 0.9)


def test_prepare_errors(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        shards.prepare(str(tmp_path / "missing"), str(tmp_path / "o"), log=lambda *a: None)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        shards.prepare(str(tmp_path / "blank"), str(tmp_path / "o"), log=lambda *a: None)
    with pytest.raises(UserError, match="no index.json"):
        shards.TokenStream(str(tmp_path / "blank"), "train")


def test_train_from_shards(tmp_path):
    data = _write(tmp_path / "data", DOCS)
    out, run = str(tmp_path / "shards"), tmp_path / "run"
    assert cli.main(["prepare", "--data", data, "--out", out, "--tokenizer", "char"]) == 0
    rc = cli.main(["train", "--data-dir", out, "--out", str(run), "--context", "32", "--d-model", "32",
                   "--n-layer", "1", "--n-head", "2", "--steps", "30", "--batch-size", "8", "--warmup", "5",
                   "--eval-every", "15", "--eval-batches", "2", "--lr", "3e-3", "--no-progress"])
    assert rc == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["summary"]["final_train_loss"] < m["history"]["train"][0]["loss"] - 0.5
    assert m["heldout"]["files"] == json.loads(open(os.path.join(out, "index.json")).read())["val"]["documents"]
    assert m["summary"]["heldout_perplexity"] < m["summary"]["unigram_perplexity"]


def test_train_bf16_autocast(tmp_path):
    data = _write(tmp_path / "data", DOCS)
    run = tmp_path / "run"
    rc = cli.main(["train", "--data", data, "--tokenizer", "char", "--out", str(run), "--context", "32", "--d-model",
                   "32", "--n-layer", "1", "--n-head", "2", "--steps", "20", "--batch-size", "8", "--warmup", "2",
                   "--eval-every", "10", "--eval-batches", "2", "--lr", "3e-3", "--bf16", "--no-progress"])
    assert rc == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["summary"]["config"]["bf16"] and m["summary"]["config"]["tokenizer"] == "char"
    assert m["summary"]["final_train_loss"] < m["history"]["train"][0]["loss"]
