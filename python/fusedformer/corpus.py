"""Training corpora: the Python standard library's own source files (present on every machine), or any
folder of text files; split by file into training and held-out parts; tokenized into one id stream.

The held-out part is a fixed list of files where one is given (the shipped model's ``metrics.json``
names its own), so that which files a model was evaluated on does not depend on the installed
Python's file list; otherwise every ``HELDOUT_EVERY``-th file of the sorted list."""

import os
import pathlib
import sysconfig

import torch

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
# One file in HELDOUT_EVERY is held out when no list is given.
HELDOUT_EVERY = 20
# The marker of the standard library's generated codec tables (encodings/cp*.py and their kin): 65
# near-identical files, which would put copies of the held-out text into the training text.
_GENERATED_MARKER = "with gencodec.py"


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def is_generated(path) -> bool:
    """A machine-generated file (a codec table) rather than written source."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return _GENERATED_MARKER in f.read(2048)


def default_corpus_files():
    """The standard library's .py files, test suites and generated codec tables excluded, in a fixed order."""
    root = stdlib_root()
    return sorted(str(p) for p in root.rglob("*.py")
                  if not (_SKIP_DIRS & set(p.relative_to(root).parts)) and not is_generated(p))


def split_files(files, heldout=None, root=None):
    """(training files, held-out files). ``heldout``: paths relative to ``root`` (a fixed list; those
    present are held out, every other file trains); without it every ``HELDOUT_EVERY``-th file of
    the non-empty ones is held out (at least one, when there are two or more)."""
    files = [f for f in files if os.path.getsize(f) > 0]
    if heldout is not None:
        root = pathlib.Path(root) if root is not None else stdlib_root()
        wanted = {(root / h).resolve() for h in heldout}
        val = [f for f in files if pathlib.Path(f).resolve() in wanted]
        if not val:
            raise ValueError(f"corpus: none of the {len(wanted)} held-out files is under {root}")
    else:
        if len(files) < 2:
            raise ValueError("corpus: need at least two documents (one is held out)")
        val = files[HELDOUT_EVERY // 2::HELDOUT_EVERY] or files[-1:]
    held = set(val)
    return [f for f in files if f not in held], val


def relative_names(files, root=None):
    """``files`` as POSIX paths relative to ``root`` (the standard library by default)."""
    root = pathlib.Path(root) if root is not None else stdlib_root()
    return [pathlib.Path(f).resolve().relative_to(root.resolve()).as_posix() for f in files]


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
