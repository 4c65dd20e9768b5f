"""Training corpora: the Python standard library's own source files (present on every machine), or any
folder of text files; split by file into training and held-out parts; tokenized into one id stream."""

import os
import pathlib
import sysconfig

import torch

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def default_corpus_files():
    """The standard library's .py files, test suites excluded, in a fixed order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(str(p) for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts)))


def folder_files(folder):
    """Every file under ``folder`` that is UTF-8 text, in a fixed order."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"corpus: {folder} is not a folder")
    out = []
    for p in sorted(pathlib.Path(folder).rglob("*")):
        if p.is_file() and not (_SKIP_DIRS & set(p.parts)):
            try:
                with open(p, encoding="utf-8") as f:
                    f.read(4096)
            except (UnicodeDecodeError, OSError):
                continue
            out.append(str(p))
    if not out:
        raise ValueError(f"corpus: no UTF-8 text file under {folder}")
    return out


def read_texts(files, max_chars=None):
    texts, n = [], 0
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            t = fh.read()
        if not t.strip():
            continue
        texts.append(t)
        n += len(t)
        if max_chars and n >= max_chars:
            break
    return texts


def split_texts(texts, heldout_every=20):
    """Every ``heldout_every``-th document is held out (at least one, when there are two or more)."""
    if len(texts) < 2:
        raise ValueError("corpus: need at least two documents (one is held out)")
    val = texts[heldout_every // 2::heldout_every] or texts[-1:]
    val_ids = {id(t) for t in val}
    return [t for t in texts if id(t) not in val_ids], val


def encode_stream(tokenizer, texts, eos_id=0):
    """All documents' ids, each followed by the end-of-text id, as one int64 tensor."""
    ids = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def unigram_perplexity(train_ids, val_ids, vocab_size):
    """Perplexity on ``val_ids`` of the unigram distribution of ``train_ids`` (add-one smoothed): the
    baseline a language model has to beat."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(torch.exp(-logp[val_ids].mean()))
