"""paged_attention decode over long contexts (a GPT-2-small-shaped layer: 12 heads of 64, a batch of
8 sequences, blocks of 16 tokens in a shuffled pool) against the dense decode path of
fusedformer.attention on a contiguous cache of the same keys and values, and against
F.scaled_dot_product_attention on the cache gathered from its blocks (what plain PyTorch must do).
Bytes are those of the keys and values read. Every case is checked against the float64 reference
before it is timed."""

import torch
import torch.nn.functional as F

import fusedformer
import fusedformer.reference as ref
from common import Case, check_result

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _paged_problem(B, H, E, S, bs, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb_seq = -(-S // bs)
    num_blocks = B * nb_seq + 8
    tables = torch.randperm(num_blocks, generator=g)[: B * nb_seq].view(B, nb_seq)
    kc = torch.randn(num_blocks, H, bs, E, generator=g).to(device, dtype)
    vc = torch.randn(num_blocks, H, bs, E, generator=g).to(device, dtype)
    q = torch.randn(B, H, E, generator=g).to(device, dtype)
    seq_lens = torch.full((B,), S, dtype=torch.int64)
    starts = torch.arange(B + 1, dtype=torch.int64)
    return q, kc, vc, tables.to(device), seq_lens.to(device), starts.to(device)


def _gather(cache, tables, S):
    """(B, H, S, E): each sequence's blocks laid end to end."""
    B, nb = tables.shape
    blocks = cache[tables.flatten()].view(B, nb, *cache.shape[1:])  # (B, nb, H, bs, E)
    return blocks.transpose(1, 2).flatten(2, 3)[:, :, :S]


def cases(device, quick):
    out = []
    B, H, E, bs = 8, 12, 64, 16
    contexts = [1024] if quick else [1024, 4096]
    dtypes = ["fp32"] if quick or device != "cpu" else ["fp32", "bf16"]
    if device != "cpu":
        dtypes = ["bf16"]
    for dt in dtypes:
        dtype = DT[dt]
        for S in contexts:
            q, kc, vc, tables, seq_lens, starts = args = _paged_problem(B, H, E, S, bs, dtype, device)
            k_dense, v_dense = _gather(kc, tables, S).contiguous(), _gather(vc, tables, S).contiguous()
            q4 = q.unsqueeze(2)  # (B, H, 1, E)

            def ours(args=args):
                with torch.no_grad():
                    return fusedformer.ops.paged_attention(*args)

            def dense(q4=q4, k=k_dense, v=v_dense):
                with torch.no_grad():
                    return fusedformer.ops.attention(q4, k, v).squeeze(2)

            def sdpa_gathered(q4=q4, kc=kc, vc=vc, tables=tables, S=S):
                with torch.no_grad():
                    k, v = _gather(kc, tables, S), _gather(vc, tables, S)
                    return F.scaled_dot_product_attention(q4, k, v).squeeze(2)

            def validate(args=args, dtype=dtype, o=ours, p=sdpa_gathered):
                check_result(o(), p(), ref.paged_attention(*args), dtype, 1e-4)

            nbytes = 2 * B * H * S * E * kc.element_size()
            out.append(Case(
                op="paged_attention", direction="fwd", dtype=dt, shape=f"decode B={B} H={H} E={E} S={S} block={bs}",
                ours=ours, peers={"dense decode (fusedformer.attention)": dense, "F.sdpa on gathered cache":
                                  sdpa_gathered},
                validate=validate, bytes=nbytes, flops=4.0 * B * H * S * E,
                note="keys read through a shuffled block table; the dense peer reads a contiguous cache",
            ))
    return out
