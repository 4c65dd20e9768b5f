"""Decode speed of a quantized model (``python bench/bench_quantized_generation.py [--quick]``, a table on stdout):
the shipped model (``python -m fusedformer generate``'s) quantized int8, int4 and nf4 (group 32), greedy
decode at batch 1 and 8, against the same model in float32 and with bfloat16 weights.
tokens/s = new tokens x batch / time. Each case is validated first: the quantized model's next-token
distribution on the prompt stays close to float32's (cosine of the logits >= 0.99)."""

import copy
import sys

import torch

import fusedformer
from fusedformer.textgen import load_model

from common import Case, format_table, measure_ceilings, run_case


def cases(device, quick):
    if device != "cpu":
        return []
    base, _ = load_model()
    new = 16 if quick else 64
    models = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for scheme, group in (("int8", None), ("int4", 32), ("nf4", 32)):
        models[scheme] = fusedformer.quantize(copy.deepcopy(base), scheme, group_size=group)
    out = []
    for batch in (1, 8):
        ids = torch.randint(1, base.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch))

        def run(model, ids=ids):
            return fusedformer.generate(model, ids, max_new_tokens=new, eos_token_id=[])

        for scheme in ("int8", "int4", "nf4"):
            model = models[scheme]

            def validate(model=model, ids=ids):
                with torch.no_grad():
                    got, want = model(ids)[:, -1].float(), base(ids)[:, -1]
                cos = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
                if cos < 0.99:
                    raise AssertionError(f"quantized logits cosine {cos:.4f} < 0.99")
                if run(model).shape != (ids.shape[0], ids.shape[1] + new):
                    raise AssertionError("wrong number of generated tokens")

            out.append(Case(
                op="generate_quantized", direction="decode", dtype=scheme, shape=f"shipped b{batch} 16+{new}",
                ours=lambda model=model: run(model),
                peers={"ours fp32": lambda: run(models["fp32"]), "ours bf16": lambda: run(models["bf16"])},
                validate=validate, peer_dtype="fp32", note=f"{new * batch} new tokens per call",
            ))
    return out


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    ceilings = measure_ceilings("cpu", quick)
    print(format_table([run_case(c, "cpu", quick, ceilings) for c in cases("cpu", quick)]))
