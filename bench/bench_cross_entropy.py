"""cross-entropy: ``linear_cross_entropy`` (a language model's head and loss without the logits)
forward + backward against ``F.cross_entropy(F.linear(...))``, and the row op it runs on
(``fusedformer::cross_entropy_rows``: row losses and the logits' gradient in one pass) against
``F.cross_entropy`` with its backward. Every case is checked against float64 before it is timed."""

import torch
import torch.nn.functional as F

import fusedformer
from common import Case, check_result, grads

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rows_cases(device, quick, dt):
    dtype = DT[dt]
    out = []
    for rows, vocab in ([(1024, 4096)] if quick else [(1024, 4096), (512, 50257)]):
        gen = torch.Generator().manual_seed(vocab)
        logits = torch.randn(rows, vocab, generator=gen).to(device, dtype)
        target = torch.randint(0, vocab, (rows,), generator=gen).to(device)
        scale = torch.tensor(1.0 / rows, device=device)

        def ours(logits=logits, target=target, scale=scale):
            loss, grad = torch.ops.fusedformer.cross_entropy_rows(logits, target, scale, -100, True)
            return loss.sum() * scale, grad

        lg = logits.clone().requires_grad_()

        def peer(lg=lg, target=target):
            loss = F.cross_entropy(lg, target)
            return loss, torch.autograd.grad(loss, (lg,))[0]

        def validate(o=ours, p=peer, logits=logits, target=target, dtype=dtype):
            loss64 = lambda t: F.cross_entropy(t, target)  # noqa: E731
            want_grad = grads(loss64, [logits], torch.ones((), dtype=torch.float64), torch.float64)[0]
            want = (loss64(logits.double()), want_grad)
            got, theirs = o(), p()
            check_result(got[0], theirs[0].float(), want[0], dtype, 1e-5, 1e-3, "loss")
            check_result(got[1], theirs[1], want[1], dtype, 1e-5, 1e-4, "logits gradient")

        out.append(Case(
            op="cross_entropy", direction="fwd+bwd", dtype=dt, shape=f"rows ({rows}, {vocab})", ours=ours,
            peers={"F.cross_entropy + backward": peer}, validate=validate,
            bytes=2 * logits.numel() * logits.element_size(),
            note="the row op: losses and d loss / d logits in one pass",
        ))
    return out


def _linear_ce_cases(device, quick, dt):
    dtype = DT[dt]
    out = []
    for tokens, d, vocab in ([(256, 128, 4096)] if quick else [(4096, 256, 4096), (1024, 768, 50257)]):
        gen = torch.Generator().manual_seed(tokens + vocab)
        x = torch.randn(tokens, d, generator=gen).to(device, dtype)
        w = (torch.randn(vocab, d, generator=gen) * d ** -0.5).to(device, dtype)
        t = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

        def ours(xg=xg, wg=wg, t=t):
            loss = fusedformer.ops.linear_cross_entropy(xg, wg, t)
            return (loss, *torch.autograd.grad(loss, (xg, wg)))

        def peer(xg=xg, wg=wg, t=t):
            loss = F.cross_entropy(F.linear(xg, wg), t)
            return (loss, *torch.autograd.grad(loss, (xg, wg)))

        def validate(o=ours, p=peer, x=x, w=w, t=t, dtype=dtype):
            xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
            loss = F.cross_entropy(F.linear(xd, wd), t)
            want = (loss, *torch.autograd.grad(loss, (xd, wd)))
            check_result(o(), p(), want, dtype, 1e-4, 1e-2, "loss and gradients")

        out.append(Case(
            op="linear_cross_entropy", direction="fwd+bwd", dtype=dt, shape=f"({tokens}, {d}) x ({vocab}, {d})",
            ours=ours, peers={"F.cross_entropy(F.linear)": peer}, validate=validate,
            flops=3 * 2.0 * tokens * d * vocab, note="head + loss + gradients of input and weight",
        ))
    return out


def cases(device, quick):
    out = []
    for dt in (["fp32"] if quick else ["fp32", "bf16"]):
        out += _rows_cases(device, quick, dt) + _linear_ce_cases(device, quick, dt)
    return out
