"""The LLM engine on the shipped model in float32 (text in, text out): greedy output equal to
fusedformer.generate, stop strings left out of the text, and SamplingParams' checks."""

import pytest
import torch

import fusedformer
from fusedformer.serving import SamplingParams

PROMPTS = ["def main(", "import os\n", "class Parser:\n    def"]


@pytest.fixture(scope="module")
def llm():
    return fusedformer.LLM(kv_cache_memory=8 << 20)


def test_lazy_exports():
    from fusedformer.serving import LLM

    assert fusedformer.LLM is LLM and fusedformer.SamplingParams is SamplingParams


def test_greedy_equals_generate_on_the_shipped_model(llm):
    model, tok = llm.engine.model, llm.get_tokenizer()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, o in zip(PROMPTS, outs):
        ids = tok.encode(prompt)
        assert o.prompt == prompt and o.prompt_token_ids == ids
        ref = fusedformer.generate(model, torch.tensor([ids]), max_new_tokens=12, eos_token_id=[])[0, len(ids):]
        assert o.outputs[0].token_ids == ref.tolist()
        assert o.outputs[0].text == tok.decode(ref.tolist())
    assert llm.engine.pool.num_held == 0


def test_stop_strings_end_the_text_before_them(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    (full,) = llm.generate(PROMPTS[:1], greedy, use_tqdm=False)
    text = full.outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop and stop in text
    (o,) = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                    stop=[stop, "\x00never"]), use_tqdm=False)
    c = o.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[:text.index(stop)] and stop not in c.text
    assert c.token_ids == full.outputs[0].token_ids[:len(c.token_ids)]


def test_a_prompt_as_text_or_as_token_ids_gives_the_same_output(llm):
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    p = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    a, b = llm.generate([PROMPTS[1], ids], p, use_tqdm=False)
    assert b.prompt is None and a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].text == b.outputs[0].text


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n must be"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(min_tokens=5, max_tokens=3), "min_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(seed="x"), "seed"),
    (dict(logprobs=-1), "logprobs"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_bad_sampling_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_their_fields():
    p = SamplingParams(stop="##", top_k=-1, temperature=0)
    assert p.stop == ["##"] and p.top_k == 0 and p.greedy and isinstance(p.temperature, float)
