"""Forward speed of a structurally pruned GPT (``python bench/bench_prune.py [--quick]``): a GPT-2-small-shaped
fusedformer GPT (12 layers, d_model 768, 12 heads, d_ff 3072; float32, batch 4 x 256 tokens, CPU) with
50% of its feed-forward neurons and 25% of its attention heads removed (``fusedformer.prune(model,
"structured", ffn=0.5, heads=0.25)``), against the same model unpruned. Target: >= 1.5x. Validated
first: the pruned model's logits equal those of the unpruned model with the removed heads' and
neurons' output columns zeroed. Timed twice: the logits (the unpruned LM head included) and the blocks
alone (the hidden states before the LM head). Writes bench/results/cpu-prune.{json,md} (``--quick``: a small model,
a table on stdout only)."""

import os
import sys

import torch

import fusedformer
from fusedformer.models import GPT
from fusedformer.pruning import structured

from common import Case, format_table, machine_info, run_case, write_results

HEADS, FFN = 0.25, 0.5


def cases(device, quick):
    if device != "cpu":
        return []
    torch.manual_seed(0)
    if quick:
        cfg, (batch, length) = dict(vocab_size=512, n_positions=64, d_model=128, n_layer=2, n_head=4), (2, 32)
    else:
        cfg, (batch, length) = dict(n_positions=256), (4, 256)  # GPT-2 small's shape
    dense = GPT(**cfg).eval()
    kept = structured.plan(dense, heads=HEADS, ffn=FFN)
    masked = structured.zeroed(dense, kept)
    pruned = structured.zeroed(dense, kept)
    fusedformer.prune(pruned, "structured", heads=HEADS, ffn=FFN)
    ids = torch.randint(0, dense.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))

    def forward(model):
        with torch.no_grad():
            return model(ids)

    def validate():
        got, want = forward(pruned), forward(masked)
        err = (got - want).abs().max().item()
        if err > 1e-4 * want.abs().max().item():
            raise AssertionError(f"pruned logits differ from the masked model's by {err:.3g}")
        n_dense = sum(p.numel() for p in dense.parameters())
        n_pruned = sum(p.numel() for p in pruned.parameters())
        print(f"parameters: {n_dense / 1e6:.1f}M -> {n_pruned / 1e6:.1f}M", file=sys.stderr)

    def body(model):
        with torch.no_grad():
            return model.hidden(ids)

    c = pruned.config
    note = f"heads {dense.config.n_head}->{c.n_head}, d_ff {dense.config.d_ff}->{c.d_ff}"
    shape = f"L{c.n_layer} d{c.d_model} b{batch}x{length}"
    # the logits' LM head (d_model x vocab, a third of GPT-2 small's forward) is not pruned; the
    # second row times the blocks alone (the final-norm hidden states), which pruning shrinks
    return [Case(op="gpt_structured_prune", direction="fwd", dtype="fp32", shape=shape + " logits",
                 ours=lambda: forward(pruned), peers={"unpruned": lambda: forward(dense)}, validate=validate,
                 target=1.5, note=note),
            Case(op="gpt_structured_prune", direction="fwd", dtype="fp32", shape=shape + " blocks",
                 ours=lambda: body(pruned), peers={"unpruned": lambda: body(dense)}, validate=validate,
                 target=1.5, note=note)]


def main():
    quick = "--quick" in sys.argv
    results = [run_case(case, "cpu", quick, {}) for case in cases("cpu", quick)]
    print(format_table(results))
    if not quick:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        write_results(results, {}, machine_info("cpu"), out, "cpu-prune",
                      "Structured pruning: GPT forward, 50% FFN + 25% heads removed, vs unpruned")


if __name__ == "__main__":
    main()
