"""CUDA cases, the GPU targets of the project side by side with their peers in one run (none on the CPU):

- attention, bf16, head dims 64 and 128, causal and not, 1k / 4k / 16k tokens (batch x heads filling
  the GPU), forward and forward+backward, against SDPA's flash backend;
- decode attention (one query token against an 8k-32k cache, GQA) against SDPA, and paged attention
  over a 32k context in a shuffled block pool against SDPA on the gathered cache: bytes of the cache;
- softmax, layer_norm, rms_norm with a residual, the cross-entropy row op and GELU on large bf16 rows
  against eager PyTorch: bytes of every tensor read and written once;
- quantized linear (int8, int4, nf4) at 1 and 16 rows against the bf16 product: bytes of the packed weights.

Every case is checked against a float32/float64 reference on a slice of its inputs before it is timed.
"""

import contextlib

import torch
import torch.nn.functional as F

import fusedformer
import fusedformer.reference as ref
from fusedformer.ops.quantized_linear import quantize_weight
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


def _close(ours, want, tol):
    torch.testing.assert_close(ours.double().cpu(), want.double().cpu(), rtol=tol, atol=tol)


def _attention_cases(quick):
    out = []
    tokens = [1024, 4096] if quick else [1024, 4096, 16384]
    for E in (64, 128):
        for L in tokens:
            B, H = max(1, 32768 // L), 16  # 32k tokens x 16 heads per launch: every SM busy
            q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            g = torch.randn_like(q)
            for causal in (False, True):
                flops = 4 * B * H * L * L * E / (2 if causal else 1)
                shape = f"({B}, {H}, {L}, {E}){' causal' if causal else ''}"

                def check(q=q, k=k, v=v, c=causal):
                    # two heads of the first batch item against SDPA in float32 (far below bf16's error)
                    q1, k1, v1 = (t[:1, :2] for t in (q, k, v))
                    want = F.scaled_dot_product_attention(q1.float(), k1.float(), v1.float(), is_causal=c)
                    _close(fusedformer.attention(q1, k1, v1, is_causal=c), want, 2e-2)

                out.append(Case(
                    op="attention", direction="fwd", dtype="bf16", shape=shape,
                    ours=lambda q=q, k=k, v=v, c=causal: fusedformer.attention(q, k, v, is_causal=c),
                    peers={"sdpa flash": lambda q=q, k=k, v=v, c=causal: _sdpa_flash(q, k, v, c)},
                    validate=check, flops=flops, target=1.0,
                ))
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

                def ours_fb(qg=qg, kg=kg, vg=vg, g=g, c=causal):
                    return torch.autograd.grad(fusedformer.attention(qg, kg, vg, is_causal=c), (qg, kg, vg), g)

                def peer_fb(qg=qg, kg=kg, vg=vg, g=g, c=causal):
                    return torch.autograd.grad(_sdpa_flash(qg, kg, vg, c), (qg, kg, vg), g)

                def check_fb(q=q, k=k, v=v, g=g, c=causal):
                    q1, k1, v1 = (t[:1, :2].detach().float().requires_grad_() for t in (q, k, v))
                    want = torch.autograd.grad(F.scaled_dot_product_attention(q1, k1, v1, is_causal=c),
                                               (q1, k1, v1), g[:1, :2].float())
                    q2, k2, v2 = (t[:1, :2].detach().clone().requires_grad_() for t in (q, k, v))
                    got = torch.autograd.grad(fusedformer.attention(q2, k2, v2, is_causal=c), (q2, k2, v2),
                                              g[:1, :2])
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
            bytes=nbytes, copy_target=0.8,
        ))
    return out


def _paged_cases(quick):
    """Decode over a long context whose blocks are scattered through the pool."""
    B, Hq, Hkv, E, bs = 8, 32, 8, 128, 16
    S = 8192 if quick else 32768
    nb = S // bs
    g = torch.Generator().manual_seed(S)
    tables = torch.randperm(B * nb + 16, generator=g)[: B * nb].view(B, nb).cuda()
    kc, vc = (torch.randn(B * nb + 16, Hkv, bs, E, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(B, Hq, E, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.full((B,), S, device="cuda", dtype=torch.int64)
    starts = torch.arange(B + 1, device="cuda", dtype=torch.int64)
    args = (q, kc, vc, tables, seq_lens, starts)

    def ours():
        with torch.no_grad():
            return fusedformer.ops.paged_attention(*args)

    def gathered():
        kk = kc[tables.flatten()].view(B, nb, Hkv, bs, E).transpose(1, 2).flatten(2, 3)
        vv = vc[tables.flatten()].view(B, nb, Hkv, bs, E).transpose(1, 2).flatten(2, 3)
        return F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, enable_gqa=True).squeeze(2)

    def check():
        # the first sequence against the float64 reference on a pool of its own blocks
        table = torch.arange(nb).view(1, nb)
        kc1, vc1 = kc[tables[0]].cpu(), vc[tables[0]].cpu()
        want = ref.paged_attention(q[:1].cpu(), kc1, vc1, table, seq_lens[:1].cpu(), torch.tensor([0, 1]))
        got = fusedformer.ops.paged_attention(q[:1], kc, vc, tables[:1], seq_lens[:1], starts[:2])
        _close(got, want, 2e-2)

    nbytes = 2 * B * Hkv * S * E * 2 + 2 * q.numel() * 2
    return [Case(
        op="paged_attention", direction="fwd", dtype="bf16", shape=f"q ({B}, {Hq}, {E}) kv {Hkv} x {S} blocks {bs}",
        ours=ours, peers={"gather + F.sdpa": gathered}, validate=check, bytes=nbytes,
        copy_target=0.8,
    )]


def _rowwise_cases(quick):
    out = []
    rows, n = (8192, 4096) if quick else (16384, 4096)
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    g = torch.randn_like(x)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    nb = x.numel() * x.element_size()  # bytes of one (rows, n) tensor
    shape = f"({rows}, {n})"
    eps = torch.finfo(torch.bfloat16).eps

    def rms_res(t, res, w=w):
        # the pre-norm block: h = t + res, y = rms_norm(h) * w; returns (y, h)
        return fusedformer.ops.rms_norm(t, (n,), w, eps, residual=res)

    def rms_res_eager(t, res, w=w):
        h = t + res
        return F.rms_norm(h, (n,), w, eps), h

    # op: (ours, eager peer, float64 reference, differentiable float64 function, fwd bytes, fwd+bwd bytes)
    comps = {
        "softmax": (lambda t: fusedformer.softmax(t, -1), lambda t: torch.softmax(t, -1),
                    lambda t: ref.softmax(t, -1), lambda t: torch.softmax(t, -1), 2 * nb, 5 * nb),
        "layer_norm": (lambda t: fusedformer.layer_norm(t, n, w, b), lambda t: F.layer_norm(t, (n,), w, b),
                       lambda t: ref.layer_norm(t, n, w, b),
                       lambda t: F.layer_norm(t, (n,), w.double(), b.double()), 2 * nb, 5 * nb),
        "gelu": (lambda t: fusedformer.gelu(t, approximate="tanh"), lambda t: F.gelu(t, approximate="tanh"),
                 lambda t: F.gelu(t.double(), approximate="tanh"), lambda t: F.gelu(t, approximate="tanh"),
                 2 * nb, 5 * nb),
    }
    for op, (ours, eager, reference, differentiable, fwd_bytes, fb_bytes) in comps.items():
        out.append(Case(
            op=op, direction="fwd", dtype="bf16", shape=shape, ours=lambda ours=ours: ours(x),
            peers={"eager": lambda eager=eager: eager(x)},
            validate=lambda ours=ours, reference=reference: _close(ours(x[:64]), reference(x[:64]), 3e-2),
            bytes=fwd_bytes, large=True, copy_target=0.85,
        ))
        xg = x.clone().requires_grad_()

        def fb(fn, xg=xg):
            return torch.autograd.grad(fn(xg), (xg,), g)

        def check_fb(ours=ours, differentiable=differentiable):
            x64 = x[:64].detach().double().requires_grad_()
            want = torch.autograd.grad(differentiable(x64), (x64,), g[:64].double())[0]
            x1 = x[:64].detach().clone().requires_grad_()
            _close(torch.autograd.grad(ours(x1), (x1,), g[:64])[0], want, 5e-2)

        out.append(Case(
            op=op, direction="fwd+bwd", dtype="bf16", shape=shape, ours=lambda ours=ours: fb(ours),
            peers={"eager": lambda eager=eager: fb(eager)}, validate=check_fb, bytes=fb_bytes, large=True,
            copy_target=0.85,
        ))

    # rms_norm with a residual: reads x, r; writes y, h
    def check_rms():
        y, h = rms_res(x[:64], r[:64])
        h64 = x[:64].double() + r[:64].double()
        _close(h, h64, 2e-2)
        _close(y, ref.rms_norm(h64, n, w, eps), 3e-2)

    out.append(Case(
        op="rms_norm", direction="fwd", dtype="bf16", shape=shape + " + residual",
        ours=lambda: rms_res(x, r), peers={"eager": lambda: rms_res_eager(x, r)}, validate=check_rms,
        bytes=4 * nb, large=True, copy_target=0.85,
    ))
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()

    def rms_fb(fn):
        y, h = fn(xg, rg)
        return torch.autograd.grad((y, h), (xg, rg), (g, g))

    def check_rms_fb():
        x64, r64 = (t[:64].detach().double().requires_grad_() for t in (x, r))
        h64 = x64 + r64
        y64 = F.rms_norm(h64, (n,), w.double(), eps)
        want = torch.autograd.grad((y64, h64), (x64, r64), (g[:64].double(), g[:64].double()))
        x1, r1 = (t[:64].detach().clone().requires_grad_() for t in (x, r))
        y1, h1 = rms_res(x1, r1)
        got = torch.autograd.grad((y1, h1), (x1, r1), (g[:64], g[:64]))
        for a, b_ in zip(got, want):
            _close(a, b_, 5e-2)

    # forward 4 tensors; backward reads dy, dh, h (or x, r), writes dx and dr (one tensor: dx = dr)
    out.append(Case(
        op="rms_norm", direction="fwd+bwd", dtype="bf16", shape=shape + " + residual",
        ours=lambda: rms_fb(rms_res), peers={"eager": lambda: rms_fb(rms_res_eager)}, validate=check_rms_fb,
        bytes=8 * nb, large=True, copy_target=0.85,
    ))

    # cross-entropy rows: losses and d loss / d logits in one pass (reads the logits, writes the gradient)
    vocab = 32768
    logits = torch.randn(rows * n // vocab, vocab, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, vocab, (logits.size(0),), device="cuda")
    scale = torch.tensor(1.0 / logits.size(0), device="cuda")
    lg = logits.clone().requires_grad_()

    def ce_ours():
        loss, grad = torch.ops.fusedformer.cross_entropy_rows(logits, target, scale, -100, True)
        return loss, grad

    def ce_peer():
        loss = F.cross_entropy(lg, target)
        return loss, torch.autograd.grad(loss, (lg,))[0]

    def check_ce():
        l64 = logits[:16].double().requires_grad_()
        loss = F.cross_entropy(l64, target[:16], reduction="sum") * scale.item()
        want = torch.autograd.grad(loss, (l64,))[0]
        got_loss, got_grad = torch.ops.fusedformer.cross_entropy_rows(logits[:16], target[:16], scale, -100, True)
        _close(got_loss.sum() * scale, loss.detach(), 1e-3)
        _close(got_grad, want, 1e-4)

    out.append(Case(
        op="cross_entropy", direction="fwd+bwd", dtype="bf16", shape=f"rows ({logits.size(0)}, {vocab})",
        ours=ce_ours, peers={"F.cross_entropy + backward": ce_peer}, validate=check_ce,
        bytes=2 * logits.numel() * logits.element_size(), large=True, copy_target=0.85,
    ))
    return out


def _quantized_cases(quick):
    out = []
    N, K = (8192, 8192) if quick else (16384, 8192)
    w = torch.randn(N, K) * K ** -0.5
    wb = w.to("cuda", torch.bfloat16)
    for scheme, group in (("int8", None), ("int4", 128), ("nf4", 128)):
        qw, sc = (t.cuda() for t in quantize_weight(w, scheme, group))
        nbytes = qw.numel() * qw.element_size() + sc.numel() * sc.element_size()
        for M in (1, 16):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)

            def check(x=x, qw=qw, sc=sc, scheme=scheme):
                want = ref.quantized_linear(x.cpu(), qw.cpu(), sc.cpu(), None, scheme)
                got = fusedformer.ops.quantized_linear(x, qw, sc, None, scheme)
                _close(got, want, 3e-2)

            out.append(Case(
                op="quantized_linear", direction="fwd", dtype="bf16", shape=f"{scheme} ({M}, {K}) x ({N}, {K})",
                ours=lambda x=x, qw=qw, sc=sc, scheme=scheme: fusedformer.ops.quantized_linear(x, qw, sc, None, scheme),
                peers={"F.linear bf16": lambda x=x: F.linear(x, wb)}, validate=check,
                bytes=nbytes + x.numel() * 2 + M * N * 2, copy_target=0.8, note="bytes: the packed weights, the input and the output",
            ))
    return out


def cases(device, quick):
    if device != "cuda":
        return []
    return (_rowwise_cases(quick) + _decode_cases(quick) + _paged_cases(quick) + _quantized_cases(quick)
            + _attention_cases(quick))
