"""bench/report.py: the published figures are rendered from bench/results/*.json, and `--check` (run by
CI) fails on a block whose figures were edited by hand or went stale."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "bench", "report.py")
DOCS = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "bench", "README.md")]


def _report(*args):
    return subprocess.run([sys.executable, REPORT, *args], capture_output=True, text=True, timeout=120)


def _a_block(name):
    return f"<!-- report:begin {name} -->\n<!-- report:end -->\n"


def test_committed_documents_match_the_results():
    r = _report("--check")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["headline", "table:cpu-prune", "summary:cpu-finetune-shakespeare",
                                  "summary:cpu-quantized-peers", "headline:cuda-h200-kernels-quick"])
def test_a_hand_edited_figure_fails_the_check(tmp_path, name):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n\n" + _a_block(name))
    assert _report(str(doc)).returncode == 0  # renders the block from the JSON
    text = doc.read_text()
    assert "bench/results/" in text and text.count("\n") > 6
    assert _report("--check", str(doc)).returncode == 0
    # change one figure inside the block, as a hand edit would
    digits = [i for i, c in enumerate(text) if c.isdigit() and "report:end" in text[i:]]
    i = digits[len(digits) // 2]
    doc.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])
    r = _report("--check", str(doc))
    assert r.returncode == 1 and "figures differ" in r.stdout


def test_every_committed_result_is_rendered_somewhere():
    text = "".join(open(p).read() for p in DOCS)
    for name in sorted(os.listdir(os.path.join(ROOT, "bench", "results"))):
        if name.endswith(".json"):
            stem = name[:-5]
            assert stem in text, f"bench/results/{name} is rendered in no document"
