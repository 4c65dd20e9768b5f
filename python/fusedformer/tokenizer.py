"""Tokenizers (the ``tokenizers`` package): byte-level BPE trained on a corpus, or characters (one token
per character of the corpus, as nanoGPT's character-level models); loading from a checkpoint folder.
Every text round-trips (a character-level tokenizer: every text made of the corpus's characters);
``<|endoftext|>`` (id 0) separates documents."""

import os

EOS = "<|endoftext|>"
UNK = "<unk>"


def train_bpe(texts, vocab_size: int = 4096, min_frequency: int = 2):
    """A byte-level BPE tokenizer with ``vocab_size`` tokens trained on an iterable of strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"train_bpe: vocab_size must be at least 257 (256 bytes + {EOS}); got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def train_char(texts):
    """A character-level tokenizer: ``<|endoftext|>`` (id 0), ``<unk>`` (id 1), then every character of
    ``texts`` in code-point order. Saved and loaded as any ``tokenizers`` JSON file."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = set()
    for t in texts:
        chars.update(t)
    vocab = {EOS: 0, UNK: 1}
    for c in sorted(chars):
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS])
    return tok


def train_tokenizer(kind, texts, vocab_size=4096):
    """``kind`` "bpe" (``vocab_size`` tokens) or "char"."""
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    if kind == "char":
        return train_char(texts)
    raise ValueError(f"tokenizer must be 'bpe' or 'char'; got {kind!r}")


def load_tokenizer(path: str):
    """The tokenizer of a checkpoint folder (its tokenizer.json) or of a tokenizer.json file."""
    from tokenizers import Tokenizer

    from .models.checkpoint import TOKENIZER_NAME

    file = os.path.join(path, TOKENIZER_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"load_tokenizer: {file} does not exist")
    try:
        return Tokenizer.from_file(file)
    except Exception as e:
        raise ValueError(f"load_tokenizer: {file} is not a tokenizers JSON file ({e})") from None


class IncrementalText:
    """The text of a growing list of token ids, decoding only the tokens since the last point where the
    text was complete rather than all of them at every step (decoding a stream whole at each token
    costs time quadratic in its length). ``update(ids)`` returns the text of ``ids`` (each call's
    list extends the previous one's) less an unfinished UTF-8 character at its end (a byte-level token
    may end inside one). ``decode``: ids -> text.

    The window starts one step back (``ids[prefix:]``, its first part ``ids[prefix:read]`` already in
    the text), so that tokenizers whose decoding of a token depends on its left neighbour (a leading
    space dropped at the start of a text) give the same increments; where the window's text does not
    extend its first part's, everything is decoded again."""

    def __init__(self, decode):
        self.decode = decode
        self.text = ""  # the text of ids[:read]
        self.prefix = 0
        self.read = 0

    def update(self, ids) -> str:
        head = self.decode(ids[self.prefix:self.read]) if self.read > self.prefix else ""
        window = self.decode(ids[self.prefix:])
        if not window.startswith(head):
            self.text, self.prefix, self.read, head = "", 0, 0, ""
            window = self.decode(ids)
        new = window[len(head):]
        if new.endswith("\ufffd"):
            return self.text + new.rstrip("\ufffd")
        self.text += new
        self.prefix, self.read = self.read, len(ids)
        return self.text


class TextDecoder:
    """Turns a growing list of token ids into text increments, holding back an incomplete UTF-8 character
    (a byte-level token may end inside one)."""

    def __init__(self, tokenizer):
        self.ids = []
        self.emitted = 0
        self._text = IncrementalText(tokenizer.decode)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._text.update(self.ids)
        new = text[self.emitted:]
        self.emitted = len(text)
        return new
