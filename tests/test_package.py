"""The package imports, reports its build and selects its CPU instruction set."""

import subprocess
import sys

import pytest
import torch

import fusedformer


def test_capabilities():
    caps = fusedformer.available_cpu_capabilities()
    assert caps[0] == "generic"
    assert fusedformer.cpu_capability() in caps
    before = fusedformer.cpu_capability()
    try:
        fusedformer.set_cpu_capability("generic")
        assert fusedformer.cpu_capability() == "generic"
    finally:
        fusedformer.set_cpu_capability(before)


def test_unknown_capability_is_a_clear_error():
    with pytest.raises(ValueError, match="not available"):
        fusedformer.set_cpu_capability("sse9")


def test_env_selects_capability():
    code = "import fusedformer; print(fusedformer.cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "FUSEDFORMER_CPU_CAPABILITY": "generic"})
    assert out.stdout.strip() == "generic"


def test_ops_registered():
    for name in ["softmax_fwd", "softmax_bwd", "layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd",
                 "attention_fwd", "attention_bwd"]:
        assert hasattr(torch.ops.fusedformer, name)


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "fusedformer", "info"], capture_output=True, text=True, check=True)
    assert "CPU kernels" in out.stdout
