"""Shared test helpers: devices, the low-precision pass rule, instruction-set selection."""

import contextlib
import os

import pytest
import torch

import fusedformer

CUDA = torch.cuda.is_available() and fusedformer.built_with_cuda()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOWP = [torch.bfloat16, torch.float16]

# Every instruction set this CPU runs, best last; FUSEDFORMER_TEST_ALL_ISAS=0 keeps only the best.
ISAS = fusedformer.available_cpu_capabilities()
if os.environ.get("FUSEDFORMER_TEST_ALL_ISAS", "1") == "0":
    ISAS = ISAS[-1:]


@contextlib.contextmanager
def cpu_isa(name):
    """Run the CPU kernels with the given instruction set inside the block."""
    before = fusedformer.cpu_capability()
    fusedformer.set_cpu_capability(name)
    try:
        yield
    finally:
        fusedformer.set_cpu_capability(before)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_matches_reference(ours, ref64, peer=None, *, rtol=1e-5, atol=1e-5, abs_term=None, what=""):
    """The pass rule of the op tests: within a tolerance of the float64 reference, and in low
    precision no further from it than twice PyTorch's own error at that precision.

    float32 (peer is None or ours is float32): |ours - ref| <= atol + rtol * |ref| elementwise.
    bfloat16 / float16: max|ours - ref| <= 2 * max|peer - ref| + abs_term, where peer is PyTorch's
    own computation at the same precision and ref the float64 reference. NaN never passes.
    """
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(ours).any(), f"{what}: NaN in output"
    ref64 = ref64.double().to(ours.device)
    if ours.dtype == torch.float32 or peer is None:
        torch.testing.assert_close(ours.double(), ref64, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
        return
    peer_err = max_err(peer, ref64)
    ours_err = max_err(ours, ref64)
    if abs_term is None:
        eps = torch.finfo(ours.dtype).eps
        abs_term = eps * max(1.0, ref64.abs().max().item()) * 0.5
    assert ours_err <= 2 * peer_err + abs_term, (
        f"{what}: error {ours_err:.3e} > 2 x PyTorch's {peer_err:.3e} + {abs_term:.1e} ({ours.dtype})"
    )


def make(shape, dtype=torch.float32, device="cpu", *, scale=1.0, requires_grad=False, seed=None, noncontig=False):
    """Random normal tensor; with noncontig, a non-contiguous view with the same values' shape."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    if noncontig:
        big = torch.randn(*shape[:-1], shape[-1] * 2, generator=g, dtype=torch.float64) * scale
        t = big.to(dtype).to(device)[..., ::2]  # slice after converting: a conversion copies
        assert not t.is_contiguous()
    else:
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    if requires_grad:
        t.requires_grad_(True)
    return t


def skip_unless_cuda():
    return pytest.mark.skipif(not CUDA, reason="CUDA not available")
