"""Token shards: a corpus tokenized once (``python -m fusedformer prepare``) into flat binary files of
token ids (uint16 when the vocabulary fits, else uint32) that training reads by memory map, so a
corpus larger than memory trains at the speed of one in memory: a batch touches only its windows.

A shard folder holds ``index.json`` (dtype, vocabulary size, tokenizer kind, the files of each
split with their token counts, the documents of each split), ``tokenizer.json``, and
``train-00000.bin ...`` / ``val-00000.bin ...``. Every document is followed by ``<|endoftext|>``
(id 0). Documents are split into training and validation by file: every ``k``-th file
(k = round(1 / val_fraction)) is held out; a single-file corpus is split at 1 - val_fraction of its
characters."""

import json
import os

import numpy as np
import torch

from . import corpus
from .checkpointing import atomic_write_text
from .errors import UserError

INDEX_NAME = "index.json"
SPLITS = ("train", "val")


def dtype_for(vocab_size):
    """The smallest unsigned dtype that holds every id: uint16 for vocabularies up to 65535 tokens, else uint32."""
    return np.uint16 if vocab_size <= 65535 else np.uint32


def split_documents(files, val_fraction=0.1):
    """{"train": [(name, text)], "val": [...]} of the files' texts (empty files skipped)."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive); got {val_fraction}")
    texts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            t = fh.read()
        if t.strip():
            texts.append((f, t))
    if not texts:
        raise UserError("prepare: every text file is empty")
    if len(texts) == 1:
        name, t = texts[0]
        cut = int(len(t) * (1 - val_fraction))
        if not t[:cut].strip() or not t[cut:].strip():
            raise UserError(f"prepare: {name} is too short to split into training and validation text")
        return {"train": [(name, t[:cut])], "val": [(name, t[cut:])]}
    k = max(2, round(1 / val_fraction))
    val_idx = set(range(k // 2, len(texts), k)) or {len(texts) - 1}
    if len(val_idx) == 0 or len(val_idx) == len(texts):
        val_idx = {len(texts) - 1}
    return {"train": [d for i, d in enumerate(texts) if i not in val_idx],
            "val": [d for i, d in enumerate(texts) if i in val_idx]}


def prepare(data, out, tokenizer="bpe", vocab_size=4096, val_fraction=0.1, shard_tokens=100_000_000, log=print):
    """Tokenize the text files under ``data`` into shards in ``out``; returns the index dict."""
    from .tokenizer import train_tokenizer

    if shard_tokens <= 0:
        raise UserError(f"shard_tokens must be positive; got {shard_tokens}")
    try:
        files = corpus.folder_files(data)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e).replace("corpus: ", "prepare: ")) from None
    docs = split_documents(files, val_fraction)
    tok = train_tokenizer(tokenizer, (t for _, t in docs["train"] + (docs["val"] if tokenizer == "char" else [])),
                          vocab_size)
    V = tok.get_vocab_size()
    dt = dtype_for(V)
    os.makedirs(out, exist_ok=True)
    index = {"format": 1, "dtype": np.dtype(dt).name, "vocab_size": V, "tokenizer": tokenizer,
             "source": os.path.abspath(data), "eos_id": 0}
    root = os.path.abspath(data)
    for split in SPLITS:
        shards, names = [], []
        f, n_in_shard = None, 0
        for name, text in docs[split]:
            names.append(os.path.relpath(os.path.abspath(name), root))
            ids = np.asarray(tok.encode(text).ids + [0], dtype=dt)
            pos = 0
            while pos < ids.size:
                if f is None:
                    shards.append({"file": f"{split}-{len(shards):05d}.bin", "tokens": 0})
                    f = open(os.path.join(out, shards[-1]["file"]), "wb")
                    n_in_shard = 0
                take = min(ids.size - pos, shard_tokens - n_in_shard)
                ids[pos:pos + take].tofile(f)
                pos += take
                n_in_shard += take
                shards[-1]["tokens"] += take
                if n_in_shard == shard_tokens:
                    f.close()
                    f = None
        if f is not None:
            f.close()
        index[split] = {"shards": shards, "tokens": sum(s["tokens"] for s in shards), "documents": names}
    tok.save(os.path.join(out, "tokenizer.json"))
    atomic_write_text(os.path.join(out, INDEX_NAME), json.dumps(index, indent=1))
    log(f"prepare: {len(docs['train'])} training and {len(docs['val'])} validation documents; {tokenizer} tokenizer "
        f"with {V} tokens ({index['dtype']}); {index['train']['tokens']:,} training and {index['val']['tokens']:,} "
        f"validation tokens in {out}")
    return index


def read_index(folder):
    path = os.path.join(folder, INDEX_NAME)
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder")
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no {INDEX_NAME}: make it with `python -m fusedformer prepare --out {folder}`")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None


class TokenStream:
    """A split's token ids as one stream over memory-mapped shards: ``len(stream)`` tokens,
    ``stream.windows(starts, length)`` -> int64 tensor (len(starts), length) read from the maps."""

    def __init__(self, folder, split):
        index = read_index(folder)
        if split not in SPLITS or split not in index:
            raise UserError(f"{folder}/{INDEX_NAME} has no {split!r} split")
        dt = np.dtype(index["dtype"])
        self.maps, self.offsets = [], [0]
        for s in index[split]["shards"]:
            path = os.path.join(folder, s["file"])
            if not os.path.isfile(path) or os.path.getsize(path) != s["tokens"] * dt.itemsize:
                raise UserError(f"shard {path} is missing or not {s['tokens']} tokens long; prepare the data again")
            if s["tokens"]:
                self.maps.append(np.memmap(path, dtype=dt, mode="r"))
                self.offsets.append(self.offsets[-1] + s["tokens"])
        self.total = self.offsets[-1]
        self.vocab_size = index["vocab_size"]

    def __len__(self):
        return self.total

    def numel(self):
        return self.total

    def read(self, start, length):
        """Tokens [start, start + length) of the stream (crossing shard boundaries as needed)."""
        out, pos = [], start
        i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        while length > 0:
            lo = pos - self.offsets[i]
            take = min(length, len(self.maps[i]) - lo)
            out.append(self.maps[i][lo:lo + take])
            pos += take
            length -= take
            i += 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def windows(self, starts, length):
        return torch.from_numpy(np.stack([self.read(int(s), length) for s in starts]).astype(np.int64))

    def to_tensor(self):
        """The whole stream as an int64 tensor (for small splits)."""
        return torch.from_numpy(self.read(0, self.total).astype(np.int64)) if self.total else torch.zeros(0, dtype=torch.long)


def load_tokenizer_of(folder):
    from .tokenizer import load_tokenizer

    return load_tokenizer(os.path.join(folder, "tokenizer.json"))
