"""Invalid input, each case run in a child process: every case must end in a Python exception whose
message names the offending argument (or, for the few inputs with a defined result, in that
result) and never in a signal. Cases run in batches, one child per batch, so a crash names the case
that was running."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype).to(device)


def _ops():
    import fusedformer

    return fusedformer.ops


def _raw():
    import fusedformer  # noqa: F401

    return torch.ops.fusedformer


def _nan_weight_columns():
    """NaN/Inf in a norm weight is not an error: it reaches exactly the output columns it scales."""
    ops = _ops()
    w = torch.ones(8)
    w[3] = float("nan")
    w[5] = float("inf")
    y = ops.layer_norm(_t(4, 8), 8, w)
    bad = ~torch.isfinite(y)
    assert bad[:, 3].all() and bad[:, 5].all() and not bad[:, [0, 1, 2, 4, 6, 7]].any(), y
    y = ops.rms_norm(_t(4, 8), 8, w)
    bad = ~torch.isfinite(y)
    assert bad[:, 3].all() and bad[:, 5].all() and not bad[:, [0, 1, 2, 4, 6, 7]].any(), y


def _meta_inputs():
    """Meta tensors (no data) give meta results of the right shape: the ops' fake implementations."""
    ops = _ops()
    m = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    assert ops.softmax(m(2, 5)).shape == (2, 5) and ops.softmax(m(2, 5)).device.type == "meta"
    assert ops.layer_norm(m(3, 8), 8, m(8), m(8)).shape == (3, 8)
    assert ops.rms_norm(m(3, 8), 8, m(8)).shape == (3, 8)
    assert ops.attention(m(1, 2, 4, 16), m(1, 2, 6, 16), m(1, 2, 6, 8)).shape == (1, 2, 4, 8)


def _paged(q_len=1, seq_len=9, tables=None, slots=None):
    """Arguments of the raw paged ops (past the Python wrappers): a cache of 4 blocks of 4 tokens, 2
    key/value heads of 8 features, one sequence."""
    kc, vc = _t(4, 2, 4, 8), _t(4, 2, 4, 8)
    tables = torch.tensor([[2, 0, 3]]) if tables is None else tables
    attn = (_t(q_len, 4, 8), kc, vc, tables, torch.tensor([seq_len]), torch.tensor([0, q_len]), 0.5)
    write = (_t(2, 2, 8), _t(2, 2, 8), kc, vc, torch.tensor([1, 5]) if slots is None else slots)
    return attn, write


def _paged_meta():
    """Meta tensors give meta results of the right shape (the fake implementations)."""
    ops = _ops()
    m = lambda *s, dtype=torch.float32: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    out = ops.paged_attention(m(3, 4, 8), m(4, 2, 4, 8), m(4, 2, 4, 8), m(2, 3, dtype=torch.int64),
                              m(2, dtype=torch.int64), m(3, dtype=torch.int64))
    assert out.shape == (3, 4, 8) and out.device.type == "meta"
    ops.paged_cache_write(m(3, 2, 8), m(3, 2, 8), m(4, 2, 4, 8), m(4, 2, 4, 8), m(3, dtype=torch.int64))


# name -> (callable, expected exception type or None for "returns normally", message substrings)
CASES = {
    # softmax
    "softmax int input": (lambda: _ops().softmax(torch.arange(6).view(2, 3)), TypeError, ["x", "Long"]),
    "softmax complex input": (lambda: _ops().softmax(torch.ones(2, 3, dtype=torch.complex64)), TypeError, ["x"]),
    "softmax scalar input": (lambda: _ops().softmax(torch.tensor(1.0)), ValueError, ["x", "dimension"]),
    "softmax empty input": (lambda: _ops().softmax(torch.empty(0, 3)), ValueError, ["x", "empty"]),
    "softmax dim out of range": (lambda: _ops().softmax(_t(2, 3), dim=2), IndexError, ["dim", "2"]),
    "softmax mask shape": (lambda: _ops().softmax(_t(2, 3), mask=torch.ones(4, dtype=torch.bool)), ValueError, ["mask", "[4]"]),
    "softmax mask int": (lambda: _ops().softmax(_t(2, 3), mask=torch.ones(2, 3, dtype=torch.int32)), TypeError, ["mask", "Int"]),
    "softmax causal 1d": (lambda: _ops().softmax(_t(5), is_causal=True), ValueError, ["is_causal"]),
    "softmax mask device": (lambda: _ops().softmax(_t(2, 3), mask=torch.ones(2, 3, device="meta")), RuntimeError, ["mask", "meta"]),
    "softmax not a tensor": (lambda: _ops().softmax([1.0, 2.0]), TypeError, ["x"]),
    "softmax huge": (lambda: _ops().softmax(torch.zeros(1).expand(2**41)), RuntimeError, ["alloc"]),
    "softmax_bwd shape": (lambda: _raw().softmax_bwd(_t(2, 3), _t(2, 4), -1, 1.0), ValueError, ["grad_output", "[2, 4]"]),
    "softmax_bwd dtype": (
        lambda: _raw().softmax_bwd(_t(2, 3, dtype=torch.float16), _t(2, 3), -1, 1.0), TypeError, ["grad_output", "Half"]),
    # layer_norm / rms_norm
    "layer_norm int input": (lambda: _ops().layer_norm(torch.ones(2, 4, dtype=torch.int64), 4), TypeError, ["input", "Long"]),
    "layer_norm shape": (lambda: _ops().layer_norm(_t(2, 4), 5), ValueError, ["normalized_shape", "[5]", "[2, 4]"]),
    "layer_norm empty shape": (lambda: _ops().layer_norm(_t(2, 4), []), ValueError, ["normalized_shape"]),
    "layer_norm too many dims": (lambda: _ops().layer_norm(_t(4), [1, 4]), ValueError, ["normalized_shape"]),
    "layer_norm weight shape": (lambda: _ops().layer_norm(_t(2, 4), 4, _t(5)), ValueError, ["weight", "[5]"]),
    "layer_norm weight int": (lambda: _ops().layer_norm(_t(2, 4), 4, torch.ones(4, dtype=torch.int32)), TypeError, ["weight", "Int"]),
    "layer_norm bias shape": (lambda: _ops().layer_norm(_t(2, 4), 4, _t(4), _t(3)), ValueError, ["bias", "[3]"]),
    "layer_norm weight device": (lambda: _ops().layer_norm(_t(2, 4), 4, torch.ones(4, device="meta")), RuntimeError, ["weight", "meta"]),
    "layer_norm eps": (lambda: _ops().layer_norm(_t(2, 4), 4, eps=-1.0), ValueError, ["eps", "-1"]),
    "layer_norm empty": (lambda: _ops().layer_norm(torch.empty(0, 4), 4), ValueError, ["input", "empty"]),
    "layer_norm residual shape": (lambda: _ops().layer_norm(_t(2, 4), 4, residual=_t(3, 4)), ValueError, ["residual", "[3, 4]"]),
    "layer_norm residual dtype": (
        lambda: _ops().layer_norm(_t(2, 4), 4, residual=_t(2, 4, dtype=torch.bfloat16)), TypeError, ["residual", "BFloat16"]),
    "layer_norm huge": (lambda: _ops().layer_norm(torch.zeros(1, 1).expand(2**36, 64), 64), RuntimeError, ["alloc"]),
    "layer_norm not a tensor": (lambda: _ops().layer_norm(3.0, 1), TypeError, ["input", "float"]),
    "rms_norm not a tensor": (lambda: _ops().rms_norm(None, 1), TypeError, ["input", "NoneType"]),
    "rms_norm int input": (lambda: _ops().rms_norm(torch.ones(2, 4, dtype=torch.int32), 4), TypeError, ["input", "Int"]),
    "rms_norm weight shape": (lambda: _ops().rms_norm(_t(2, 4), 4, _t(2, 2)), ValueError, ["weight", "[2, 2]"]),
    "rms_norm residual device": (
        lambda: _ops().rms_norm(_t(2, 4), 4, residual=torch.ones(2, 4, device="meta")), RuntimeError, ["residual", "meta"]),
    "rms_norm eps": (lambda: _ops().rms_norm(_t(2, 4), 4, eps=-0.5), ValueError, ["eps"]),
    "layer_norm_bwd rstd": (
        lambda: _raw().layer_norm_bwd(_t(2, 4), None, _t(2, 4), _t(2), _t(3), None, False, [4]), ValueError, ["rstd", "[3]"]),
    "layer_norm_bwd mean dtype": (
        lambda: _raw().layer_norm_bwd(_t(2, 4), None, _t(2, 4), _t(2, dtype=torch.float16), _t(2), None, False, [4]),
        ValueError, ["mean", "Half"]),
    "rms_norm_bwd grad shape": (
        lambda: _raw().rms_norm_bwd(_t(2, 5), None, _t(2, 4), _t(2), None, [4]), ValueError, ["grad_out", "[2, 5]"]),
    "nan weight columns": (_nan_weight_columns, None, []),
    # attention
    "attention rank 1": (lambda: _ops().attention(_t(4), _t(4), _t(4)), ValueError, ["query", "2 dimensions"]),
    "attention ranks differ": (lambda: _ops().attention(_t(1, 2, 4, 8), _t(2, 4, 8), _t(2, 4, 8)), ValueError, ["number of dimensions"]),
    "attention heads no gqa": (lambda: _ops().attention(_t(1, 4, 3, 8), _t(1, 2, 3, 8), _t(1, 2, 3, 8)), ValueError, ["heads", "enable_gqa"]),
    "attention heads not multiple": (
        lambda: _ops().attention(_t(1, 3, 3, 8), _t(1, 2, 3, 8), _t(1, 2, 3, 8), enable_gqa=True), ValueError, ["multiple", "(3)", "(2)"]),
    "attention kv heads": (lambda: _ops().attention(_t(1, 2, 3, 8), _t(1, 2, 3, 8), _t(1, 1, 3, 8), enable_gqa=True), ValueError, ["heads", "value"]),
    "attention head dim": (lambda: _ops().attention(_t(1, 1, 3, 257), _t(1, 1, 3, 257), _t(1, 1, 3, 8)), ValueError, ["head dim", "257"]),
    "attention value head dim": (lambda: _ops().attention(_t(1, 1, 3, 8), _t(1, 1, 3, 8), _t(1, 1, 3, 300)), ValueError, ["value", "300"]),
    "attention key head dim": (lambda: _ops().attention(_t(1, 1, 3, 8), _t(1, 1, 3, 9), _t(1, 1, 3, 8)), ValueError, ["key", "9"]),
    "attention value length": (lambda: _ops().attention(_t(1, 1, 3, 8), _t(1, 1, 5, 8), _t(1, 1, 4, 8)), ValueError, ["sequence length", "5", "4"]),
    "attention batch": (lambda: _ops().attention(_t(2, 1, 3, 8), _t(3, 1, 3, 8), _t(3, 1, 3, 8)), ValueError, ["batch", "key"]),
    "attention dtype mix": (
        lambda: _ops().attention(_t(1, 3, 8), _t(1, 3, 8, dtype=torch.bfloat16), _t(1, 3, 8)), TypeError, ["key", "BFloat16"]),
    "attention int": (
        lambda: _ops().attention(*(torch.ones(1, 3, 8, dtype=torch.int64),) * 3), TypeError, ["query", "Long"]),
    "attention empty": (lambda: _ops().attention(_t(1, 0, 8), _t(1, 3, 8), _t(1, 3, 8)), ValueError, ["query", "empty"]),
    "attention mask shape": (
        lambda: _ops().attention(_t(1, 3, 8), _t(1, 5, 8), _t(1, 5, 8), attn_mask=torch.ones(3, 4, dtype=torch.bool)),
        ValueError, ["attn_mask", "[3, 4]"]),
    "attention mask int": (
        lambda: _ops().attention(_t(1, 3, 8), _t(1, 5, 8), _t(1, 5, 8), attn_mask=torch.ones(3, 5, dtype=torch.int64)),
        TypeError, ["attn_mask", "Long"]),
    "attention mask device": (
        lambda: _ops().attention(_t(1, 3, 8), _t(1, 5, 8), _t(1, 5, 8), attn_mask=torch.ones(3, 5, device="meta")),
        RuntimeError, ["attn_mask", "meta"]),
    "attention key device": (
        lambda: _ops().attention(_t(1, 3, 8), torch.ones(1, 5, 8, device="meta"), _t(1, 5, 8)), RuntimeError, ["key", "meta"]),
    "attention mask requires grad": (
        lambda: _ops().attention(_t(1, 3, 8), _t(1, 5, 8), _t(1, 5, 8), attn_mask=_t(3, 5).requires_grad_()),
        ValueError, ["attn_mask", "grad"]),
    "attention dropout 1": (lambda: _ops().attention(_t(1, 3, 8), _t(1, 3, 8), _t(1, 3, 8), dropout_p=1.0), ValueError, ["dropout_p", "1"]),
    "attention dropout negative": (
        lambda: _ops().attention(_t(1, 3, 8), _t(1, 3, 8), _t(1, 3, 8), dropout_p=-0.5), ValueError, ["dropout_p", "-0.5"]),
    "attention dropout nan": (
        lambda: _ops().attention(_t(1, 3, 8), _t(1, 3, 8), _t(1, 3, 8), dropout_p=math.nan), ValueError, ["dropout_p", "nan"]),
    "attention not a tensor": (lambda: _ops().attention(_t(1, 3, 8), None, _t(1, 3, 8)), TypeError, ["key"]),
    "attention huge": (
        lambda: _ops().attention(*(torch.zeros(1, 1, 1, 1).expand(1, 1, 2**34, 64),) * 3), RuntimeError, ["alloc"]),
    "attention_bwd lse": (
        lambda: _raw().attention_bwd(_t(1, 3, 8), _t(1, 3, 8), _t(1, 3, 8), _t(1, 3, 8), _t(1, 3, 8), _t(1, 4), None,
                                     0.0, False, 1.0, None), ValueError, ["lse", "[1, 4]"]),
    "attention dropout seed": (
        lambda: _raw().attention_fwd(_t(1, 3, 8), _t(1, 3, 8), _t(1, 3, 8), None, 0.5, False, 1.0, None), ValueError, ["seed"]),
    "attention dropout float seed": (
        lambda: _raw().attention_fwd(_t(1, 3, 8), _t(1, 3, 8), _t(1, 3, 8), None, 0.5, False, 1.0, torch.tensor(1.5)),
        TypeError, ["seed", "Float"]),
    # paged attention / cache write, through the raw ops
    "paged_attention block id": (
        lambda: _raw().paged_attention(*_paged(tables=torch.tensor([[2, 7, 3]]))[0]), ValueError, ["block_tables", "7"]),
    "paged_attention negative block id": (
        lambda: _raw().paged_attention(*_paged(tables=torch.tensor([[2, -1, 3]]))[0]), ValueError, ["block_tables"]),
    "paged_attention seq_lens beyond table": (
        lambda: _raw().paged_attention(*_paged(seq_len=13)[0]), ValueError, ["seq_lens", "13"]),
    "paged_attention q_len beyond seq_len": (
        lambda: _raw().paged_attention(*_paged(q_len=5, seq_len=4)[0]), ValueError, ["seq_lens", "query"]),
    "paged_attention tables float": (
        lambda: _raw().paged_attention(*_paged(tables=torch.tensor([[2.0, 0.0, 3.0]]))[0]), TypeError, ["block_tables"]),
    "paged_attention head dim": (
        lambda: _raw().paged_attention(_t(1, 4, 16), *_paged()[0][1:]), ValueError, ["key_cache", "head dim"]),
    "paged_attention query int": (
        lambda: _raw().paged_attention(torch.ones(1, 4, 8, dtype=torch.int64), *_paged()[0][1:]), TypeError, ["query"]),
    "paged_attention caches differ": (
        lambda: _raw().paged_attention(*(lambda a: (a[0], a[1], a[2][:, :1]) + a[3:])(_paged()[0])), ValueError,
        ["value_cache"]),
    "paged_cache_write slot": (
        lambda: _raw().paged_cache_write(*_paged(slots=torch.tensor([1, 16]))[1]), ValueError, ["slot_mapping", "16"]),
    "paged_cache_write slot int32": (
        lambda: _raw().paged_cache_write(*_paged(slots=torch.tensor([1, 2], dtype=torch.int32))[1]), TypeError,
        ["slot_mapping"]),
    "paged_cache_write key shape": (
        lambda: _raw().paged_cache_write(_t(2, 3, 8), *_paged()[1][1:]), ValueError, ["key"]),
    "paged meta inputs": (_paged_meta, None, []),
    # quantized_linear: the C++ checks, reached through the raw op
    "quantized_linear scheme": (
        lambda: _raw().quantized_linear(_t(2, 64), torch.zeros(3, 64, dtype=torch.int8), torch.ones(3), None, "nf4"),
        ValueError, ["scheme", "nf4"]),
    "quantized_linear qweight dtype": (
        lambda: _raw().quantized_linear(_t(2, 64), torch.zeros(3, 64), torch.ones(3), None, "int8"),
        ValueError, ["qweight", "int8"]),
    "quantized_linear int4 width": (
        lambda: _raw().quantized_linear(_t(2, 64), torch.zeros(3, 64, dtype=torch.uint8), torch.ones(3, 2), None,
                                        "int4"), ValueError, ["qweight.shape[1]", "64"]),
    "quantized_linear group size": (
        lambda: _raw().quantized_linear(_t(2, 96), torch.zeros(3, 48, dtype=torch.uint8), torch.ones(3, 2), None,
                                        "int4"), ValueError, ["group size", "48"]),
    "quantized_linear scale shape": (
        lambda: _raw().quantized_linear(_t(2, 64), torch.zeros(3, 64, dtype=torch.int8), torch.ones(4), None, "int8"),
        ValueError, ["scale", "[4]"]),
    "quantized_linear scale dtype": (
        lambda: _raw().quantized_linear(_t(2, 64), torch.zeros(3, 64, dtype=torch.int8), torch.ones(3).half(), None,
                                        "int8"), ValueError, ["scale", "float32"]),
    "quantized_linear bias": (
        lambda: _raw().quantized_linear(_t(2, 64), torch.zeros(3, 64, dtype=torch.int8), torch.ones(3), _t(2),
                                        "int8_dynamic"), ValueError, ["bias", "[2]"]),
    "quantized_linear empty features": (
        lambda: _raw().quantized_linear(_t(2, 0), torch.zeros(3, 0, dtype=torch.int8), torch.ones(3), None, "int8"),
        ValueError, ["in_features", "positive"]),
    # meta tensors and the instruction-set switch
    "meta inputs": (_meta_inputs, None, []),
    "unknown cpu capability": (lambda: __import__("fusedformer").set_cpu_capability("sse9"), ValueError, ["sse9"]),
}


def _child(names):
    """Runs the named cases in this process; one JSON line per case on stdout."""
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        fn, _, _ = CASES[name]
        try:
            fn()
            res = {"case": name, "exc": None, "msg": ""}
        except Exception as e:  # noqa: BLE001 - the type is what the parent checks
            res = {"case": name, "exc": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__], "msg": str(e)}
        print(json.dumps(res), flush=True)


def _run_batch(names):
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_errors_isolated as m; m._child({names!r})"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    results, started = {}, None
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if "start" in rec:
            started = rec["start"]
        else:
            results[rec["case"]] = rec
    assert proc.returncode == 0, (
        f"child exited with {proc.returncode} (signal {-proc.returncode if proc.returncode < 0 else None}) "
        f"while running case {started!r}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return results


BATCHES = {
    "softmax": [n for n in CASES if n.startswith("softmax")],
    "norm": [n for n in CASES if n.startswith(("layer_norm", "rms_norm", "nan weight"))],
    "attention": [n for n in CASES if n.startswith("attention")],
    "other": [n for n in CASES if n in ("meta inputs", "unknown cpu capability")],
    "paged": [n for n in CASES if n.startswith("paged")],
    "quantized_linear": [n for n in CASES if n.startswith("quantized_linear")],
}


def test_every_case_in_a_batch():
    assert sorted(n for b in BATCHES.values() for n in b) == sorted(CASES)


@pytest.mark.parametrize("batch", list(BATCHES))
def test_invalid_inputs_raise(batch):
    results = _run_batch(BATCHES[batch])
    failures = []
    for name in BATCHES[batch]:
        _, exc, needles = CASES[name]
        r = results.get(name)
        if r is None:
            failures.append(f"{name}: no result")
        elif exc is None:
            if r["exc"] is not None:
                failures.append(f"{name}: raised {r['exc']}: {r['msg'][:300]}")
        elif r["exc"] is None:
            failures.append(f"{name}: no exception, expected {exc.__name__}")
        elif exc.__name__ not in r["mro"]:
            failures.append(f"{name}: raised {r['exc']}, expected {exc.__name__}: {r['msg'][:300]}")
        else:
            first = r["msg"].split("\n")[0] if "alloc" not in needles else r["msg"]
            missing = [s for s in needles if s.lower() not in first.lower()]
            if missing:
                failures.append(f"{name}: message lacks {missing}: {first[:300]}")
    assert not failures, "\n".join(failures)
