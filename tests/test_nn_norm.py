"""fusedformer.nn.LayerNorm / RMSNorm against torch.nn: outputs, gradients, the residual form,
state_dict round trips."""

import pytest
import torch

import fusedformer.nn as fnn


def _grads(module, x, g, *extra):
    params = [p for p in module.parameters()]
    return torch.autograd.grad(module(x, *extra) if extra else module(x), [x] + params, g)


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("shape", [(3, 7, 40), (5, 96)])
def test_layer_norm_matches_torch(affine, bias, shape):
    ref = torch.nn.LayerNorm(shape[-1], eps=1e-6, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            if bias:
                ref.bias.normal_()
    ours = fnn.LayerNorm(shape[-1], eps=1e-6, elementwise_affine=affine, bias=bias)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(ours, x, g), _grads(ref, x, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_matches_torch(eps):
    ref = torch.nn.RMSNorm(48, eps=eps)
    with torch.no_grad():
        ref.weight.normal_()
    ours = fnn.RMSNorm(48, eps=eps)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 9, 48, requires_grad=True)
    g = torch.randn(4, 9, 48)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(ours, x, g), _grads(ref, x, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls,ref_cls", [(fnn.LayerNorm, torch.nn.LayerNorm), (fnn.RMSNorm, torch.nn.RMSNorm)])
def test_residual_form(cls, ref_cls):
    """norm(x, residual) == (norm(x + residual), x + residual), gradients to both."""
    ours = cls(32)
    ref = ref_cls(32)
    with torch.no_grad():
        ref.weight.normal_()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 32, requires_grad=True)
    r = torch.randn(6, 32, requires_grad=True)
    out, h = ours(x, r)
    h_ref = x + r
    out_ref = ref(h_ref)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    g1, g2 = torch.randn(6, 32), torch.randn(6, 32)
    got = torch.autograd.grad((out * g1).sum() + (h * g2).sum(), [x, r, ours.weight])
    want = torch.autograd.grad((out_ref * g1).sum() + (h_ref * g2).sum(), [x, r, ref.weight])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_norm_is_a_torch_norm():
    assert isinstance(fnn.LayerNorm(8), torch.nn.LayerNorm)
    assert isinstance(fnn.RMSNorm(8), torch.nn.RMSNorm)
    assert "eps=" in repr(fnn.LayerNorm(8))
