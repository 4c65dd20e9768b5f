"""CUDA-only peers and cases: attention against SDPA's flash backend (bf16, head dim 128, 4096
tokens, batch x heads filling the GPU), softmax / layer_norm / rms_norm on large bf16 rows against
eager PyTorch and torch.compile of the eager composition, and decode attention (one query token
against an 8k-32k key/value cache) against SDPA. No cases on the CPU.
"""

import contextlib

import torch
import torch.nn.functional as F

import fusedformer
import fusedformer.reference as ref
from common import Case


def _flash():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    except Exception:  # pragma: no cover - older torch
        return contextlib.nullcontext()


def _sdpa_flash(q, k, v, causal):
    with _flash():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _close(ours, want, tol):
    torch.testing.assert_close(ours.double().cpu(), want.double().cpu(), rtol=tol, atol=tol)


def _attention_cases(quick):
    out = []
    B, H, L, E = (8, 16, 4096, 128) if not quick else (2, 16, 1024, 128)
    q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for causal in (False, True):
        flops = 4 * B * H * L * L * E / (2 if causal else 1)
        shape = f"({B}, {H}, {L}, {E}){' causal' if causal else ''}"

        def check(c=causal):
            # against SDPA in float32 (its error is far below bf16's)
            want = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float(), is_causal=c)
            _close(fusedformer.attention(q[:1], k[:1], v[:1], is_causal=c), want, 2e-2)

        out.append(Case(
            op="attention", direction="fwd", dtype="bf16", shape=shape,
            ours=lambda c=causal: fusedformer.attention(q, k, v, is_causal=c),
            peers={"sdpa flash": lambda c=causal: _sdpa_flash(q, k, v, c)},
            validate=check, flops=flops, target=1.0,
        ))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        g = torch.randn_like(q)

        def ours_fb(c=causal):
            return torch.autograd.grad(fusedformer.attention(qg, kg, vg, is_causal=c), (qg, kg, vg), g)

        def peer_fb(c=causal):
            return torch.autograd.grad(_sdpa_flash(qg, kg, vg, c), (qg, kg, vg), g)

        def check_fb(c=causal):
            # gradients of the first batch item against SDPA's in float32
            q1, k1, v1 = (t[:1].detach().float().requires_grad_() for t in (q, k, v))
            want = torch.autograd.grad(F.scaled_dot_product_attention(q1, k1, v1, is_causal=c), (q1, k1, v1), g[:1].float())
            q2, k2, v2 = (t[:1].detach().clone().requires_grad_() for t in (q, k, v))
            got = torch.autograd.grad(fusedformer.attention(q2, k2, v2, is_causal=c), (q2, k2, v2), g[:1])
            for a, b in zip(got, want):
                _close(a, b, 5e-2)

        out.append(Case(
            op="attention", direction="fwd+bwd", dtype="bf16", shape=shape, ours=ours_fb,
            peers={"sdpa flash": peer_fb}, validate=check_fb, flops=flops * 3.5, target=0.9,
        ))
    return out


def _decode_cases(quick):
    out = []
    B, Hq, Hkv, E = 8, 32, 8, 128
    for S in ([8192] if quick else [8192, 32768]):
        q = torch.randn(B, Hq, 1, E, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, S, E, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        nbytes = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()
        out.append(Case(
            op="decode_attention", direction="fwd", dtype="bf16", shape=f"q ({B}, {Hq}, 1, {E}) kv {Hkv} x {S}",
            ours=lambda q=q, k=k, v=v: fusedformer.attention(q, k, v, enable_gqa=True),
            peers={"F.sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)},
            validate=lambda q=q, k=k, v=v: _close(fusedformer.attention(q[:1], k[:1], v[:1], enable_gqa=True),
                                                  ref.attention(q[:1], k[:1], v[:1], enable_gqa=True), 2e-2),
            bytes=nbytes, note="target: >= 80% of copy bandwidth",
        ))
    return out


def _rowwise_cases(quick):
    out = []
    shapes = [(16384, 4096)] if quick else [(16384, 4096), (8192, 16384)]
    note = "targets: >= 85% of copy bandwidth, faster than eager and torch.compile"
    for rows, n in shapes:
        x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
        g = torch.randn_like(x)
        w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        es = x.element_size()
        fwd_bytes = 2 * x.numel() * es
        fb_bytes = 5 * x.numel() * es
        shape = f"({rows}, {n})"
        eps = torch.finfo(torch.bfloat16).eps
        # op: (ours, eager peer, float64 reference, differentiable float64 function for the gradients)
        comps = {
            "softmax": (lambda t: fusedformer.softmax(t, -1), lambda t: torch.softmax(t, -1),
                        lambda t: ref.softmax(t, -1), lambda t: torch.softmax(t, -1)),
            "layer_norm": (lambda t: fusedformer.layer_norm(t, n, w, b), lambda t: F.layer_norm(t, (n,), w, b),
                           lambda t: ref.layer_norm(t, n, w, b),
                           lambda t: F.layer_norm(t, (n,), w.double(), b.double())),
            "rms_norm": (lambda t: fusedformer.rms_norm(t, n, w), lambda t: F.rms_norm(t, (n,), w),
                         lambda t: ref.rms_norm(t, n, w), lambda t: F.rms_norm(t, (n,), w.double(), eps=eps)),
        }
        for op, (ours, eager, reference, differentiable) in comps.items():
            peers = {"eager": lambda eager=eager: eager(x)}
            if not quick:
                compiled = _compiled(eager)
                peers = {"torch.compile": lambda compiled=compiled: compiled(x), **peers}
            out.append(Case(
                op=op, direction="fwd", dtype="bf16", shape=shape, ours=lambda ours=ours: ours(x), peers=peers,
                validate=lambda ours=ours, reference=reference: _close(ours(x[:64]), reference(x[:64]), 3e-2),
                bytes=fwd_bytes, large=True, target=1.0, note=note,
            ))
            xg = x.clone().requires_grad_()

            def fb(fn, xg=xg):
                return torch.autograd.grad(fn(xg), (xg,), g)

            peers_fb = {"eager": lambda eager=eager: fb(eager)}
            if not quick:
                compiled_fb = _compiled(eager)
                peers_fb = {"torch.compile": lambda compiled_fb=compiled_fb: fb(compiled_fb), **peers_fb}
            def check_fb(ours=ours, differentiable=differentiable):
                x64 = x[:64].detach().double().requires_grad_()
                want = torch.autograd.grad(differentiable(x64), (x64,), g[:64].double())[0]
                x1 = x[:64].detach().clone().requires_grad_()
                _close(torch.autograd.grad(ours(x1), (x1,), g[:64])[0], want, 5e-2)

            out.append(Case(
                op=op, direction="fwd+bwd", dtype="bf16", shape=shape, ours=lambda ours=ours: fb(ours),
                peers=peers_fb, validate=check_fb, bytes=fb_bytes, large=True, target=1.0, note=note,
            ))
    return out


def cases(device, quick):
    if device != "cuda":
        return []
    return _rowwise_cases(quick) + _decode_cases(quick) + _attention_cases(quick)
