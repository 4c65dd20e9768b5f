"""The OpenAI-compatible server as users run it: `python -m fusedformer serve` in its own process on the
shipped model, driven by the real `openai` client and httpx. Streamed and plain answers agree, usage
counts are right, concurrent requests give what they give alone, bad input is a 4xx in OpenAI's shape
(and the server keeps serving), a client that leaves mid-stream frees its KV blocks, an API key is
enforced, a full waiting queue answers 503, and SIGTERM lets the request in flight finish and exits 0."""

import json
import re
import signal
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from _server import MODEL, Server  # noqa: E402
from fusedformer.textgen import SHIPPED_MODEL  # noqa: E402
from fusedformer.tokenizer import load_tokenizer  # noqa: E402

KEY = "sk-test-key"
PROMPTS = ["def main(", "import os\n", "class Parser:\n    def", "for i in range(", "return self.", "x = [",
           "with open(", "if __name__"]
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"), "main", "--kv-cache-memory", str(32 << 20), "--max-num-seqs", "64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A server with an API key that runs one sequence at a time and lets one request wait."""
    s = Server(tmp_path_factory.mktemp("strict"), "strict", "--api-key", KEY, "--max-num-seqs", "1",
               "--max-waiting", "1", "--kv-cache-memory", str(8 << 20))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SHIPPED_MODEL)


def test_health_models_playground_and_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/completions" in page.text and "getReader" in page.text
    m = server.metrics()
    assert m["fusedformer_kv_blocks_total"] > 0 and m["fusedformer_kv_blocks_in_use"] == 0
    for name in ("fusedformer_requests_running", "fusedformer_requests_waiting", "fusedformer_prompt_tokens_total",
                 "fusedformer_generation_tokens_total", "fusedformer_time_to_first_token_seconds_count",
                 "fusedformer_time_per_output_token_seconds_count", "fusedformer_kv_utilization",
                 "fusedformer_kv_peak_blocks_in_use", "fusedformer_kv_utilization_at_peak",
                 "fusedformer_kv_utilization_mean"):
        assert name in m, name


def test_completion_streamed_equals_plain_and_usage_counts(server, tok):
    c = server.client()
    prompt = PROMPTS[2]
    plain = c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, **GREEDY)
    assert plain.object == "text_completion" and plain.id.startswith("cmpl-") and plain.model == MODEL
    (choice,) = plain.choices
    assert choice.finish_reason == "length" and choice.text
    n_prompt = len(tok.encode(prompt).ids)
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens) == \
        (n_prompt, 10, n_prompt + 10)
    chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == choice.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == n_prompt
    # token ids as the prompt give the same answer
    again = c.completions.create(model=MODEL, prompt=tok.encode(prompt).ids, max_tokens=10, **GREEDY)
    assert again.choices[0].text == choice.text


def test_completion_of_a_batch_of_prompts(server, tok):
    """A list of prompts runs as one request per prompt, side by side: prompt p's sample j is choice
    p * n + j, each choice what the prompt gives alone, usage summed; the same when streamed."""
    c = server.client()
    prompts = [PROMPTS[0], tok.encode(PROMPTS[4]).ids, PROMPTS[6]]
    alone = [c.completions.create(model=MODEL, prompt=p, max_tokens=8, **GREEDY).choices[0].text for p in prompts]
    texts = [PROMPTS[0], PROMPTS[6]]
    as_ids = [tok.encode(p).ids for p in (PROMPTS[0], PROMPTS[4], PROMPTS[6])]
    r = c.completions.create(model=MODEL, prompt=as_ids, max_tokens=8, n=2, **GREEDY)
    assert [ch.index for ch in r.choices] == list(range(6))
    assert [ch.text for ch in r.choices] == [t for t in alone for _ in range(2)]
    n_prompt = sum(map(len, as_ids))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 48, n_prompt + 48)
    r = c.completions.create(model=MODEL, prompt=texts, max_tokens=8, **GREEDY)
    assert [ch.text for ch in r.choices] == [alone[0], alone[2]]
    got, reasons = {}, {}
    chunks = list(c.completions.create(model=MODEL, prompt=texts, max_tokens=8, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY))
    for ch in chunks:
        for choice in ch.choices:
            got[choice.index] = got.get(choice.index, "") + choice.text
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert got == {0: alone[0], 1: alone[2]} and reasons == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == sum(len(tok.encode(t).ids) for t in texts)
    assert server.metrics()["fusedformer_kv_blocks_in_use"] == 0


def test_completion_logprobs_stop_and_n(server):
    c = server.client()
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 6
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    full = c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, **GREEDY).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    for stream in (False, True):
        kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=16, stop=[stop], **GREEDY)
        if stream:
            text = "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices)
        else:
            r = c.completions.create(**kw)
            text = r.choices[0].text
            assert r.choices[0].finish_reason == "stop"
        assert text == full[:full.index(stop)]
    r = c.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=5, n=3, temperature=1.0, seed=1)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2] and r.usage.completion_tokens <= 15


def test_chat_streamed_equals_plain(server, tok):
    c = server.client()
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    plain = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, **GREEDY)
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    msg = plain.choices[0].message
    assert msg.role == "assistant" and msg.content and plain.choices[0].finish_reason == "length"
    expected = "system: You write Python.\nuser: def add(a, b):\nassistant:"
    assert plain.usage.prompt_tokens == len(tok.encode(expected).ids) and plain.usage.completion_tokens == 8
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == msg.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, logprobs=True, top_logprobs=2,
                                  **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 2 for e in content)


def test_32_concurrent_requests_match_the_same_requests_alone(server):
    c = server.client()
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 4 + i % 5) for i in range(32)]
    alone = [c.completions.create(model=MODEL, prompt=p, max_tokens=m, **GREEDY).choices[0].text for p, m in jobs]
    results, errors = [None] * len(jobs), []

    def run(i):
        try:
            p, m = jobs[i]
            if i % 2:
                results[i] = "".join(ch.choices[0].text for ch in c.completions.create(
                    model=MODEL, prompt=p, max_tokens=m, stream=True, **GREEDY) if ch.choices)
            else:
                results[i] = c.completions.create(model=MODEL, prompt=p, max_tokens=m, **GREEDY).choices[0].text
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == alone
    m = server.metrics()
    assert m["fusedformer_requests_running"] == 0 and m["fusedformer_kv_blocks_in_use"] == 0
    assert m['fusedformer_requests_finished_total{finish_reason="length"}'] >= 64
    # every request's prompt and output fit one block of 16, and several ran at once
    assert 2 <= m["fusedformer_kv_peak_blocks_in_use"] <= 32
    for name in ("fusedformer_kv_utilization_at_peak", "fusedformer_kv_utilization_mean"):
        assert 0 < m[name] <= 1, (name, m[name])


BAD = [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=100000), "max_tokens"),
    (dict(max_tokens="many"), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(n=10000), "n"),
    (dict(logprobs=50), "logprobs"),
    (dict(presence_penalty=5.0), "presence_penalty"),
    (dict(prompt="x " * 2000), "prompt"),
    (dict(prompt=[1, 2, 999999]), "prompt"),
    (dict(prompt=["def f(", ""]), "prompt"),  # prompt[1]: no token
    (dict(prompt=[[1, 2], [3, 999999]]), "prompt"),
    (dict(prompt=["a", [1, 2]]), "prompt"),  # strings and token ids mixed
    (dict(prompt=["a", "x " * 2000]), "prompt"),  # one prompt of a batch too long: nothing runs
    (dict(prompt=[]), "prompt"),
    (dict(prompt=None), "prompt"),
]


@pytest.mark.parametrize("kw,param", BAD, ids=[f"{k}={str(v)[:12]}" for kw, _ in BAD for k, v in kw.items()])
def test_bad_completion_requests_are_400_naming_the_parameter(server, kw, param):
    args = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=4)
    args.update(kw)
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(**args)
    assert e.value.status_code == 400
    body = e.value.body
    assert body["param"] == param and param in body["message"], body
    assert body["type"] == "invalid_request_error"


def test_other_bad_requests_and_the_server_keeps_serving(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["param"] == "model" and "no-such-model" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 500}])
    assert e.value.body["param"] == "messages" and "context" in e.value.body["message"]
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "x", "prompt": ', timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert httpx.get(server.url + "/v1/nothing-here", timeout=10).status_code == 404
    assert c.completions.create(model=MODEL, prompt="ok", max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.parametrize("prompts", [1, 3])
def test_a_client_that_leaves_mid_stream_frees_its_blocks(server, prompts):
    """Every request of the stream (one per prompt of a batch) is aborted and its blocks freed."""
    before = server.metrics().get('fusedformer_requests_finished_total{finish_reason="abort"}', 0.0)
    body = {"model": MODEL, "prompt": PROMPTS[4] if prompts == 1 else PROMPTS[4:4 + prompts], "max_tokens": 200,
            "stream": True, "ignore_eos": True, "temperature": 0.0}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    assert json.loads(line[6:])["choices"]
                    break
    deadline = time.monotonic() + 10
    while True:
        m = server.metrics()
        done = m["fusedformer_requests_running"] == 0 and m["fusedformer_kv_blocks_in_use"] == 0
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert done, m
    assert m['fusedformer_requests_finished_total{finish_reason="abort"}'] == before + prompts


def test_api_key_is_required_when_set(strict):
    with pytest.raises(openai.AuthenticationError) as e:
        strict.client(api_key="wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert e.value.status_code == 401
    assert httpx.get(strict.url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(strict.url + "/health", timeout=10).status_code == 200
    r = strict.client(api_key=KEY).completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_a_full_waiting_queue_answers_503(strict):
    statuses = []
    lock = threading.Lock()

    def run():
        r = httpx.post(strict.url + "/v1/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 40, "ignore_eos": True})
        with lock:
            statuses.append((r.status_code, r.json()))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(s for s, _ in statuses)
    assert len(codes) == 8 and 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    busy = next(body for s, body in statuses if s == 503)
    assert "max_waiting" in busy["error"]["message"]
    assert httpx.get(strict.url + "/health", timeout=10).status_code == 200
    r = strict.client(api_key=KEY).completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_sigterm_finishes_the_request_in_flight_and_exits_0(strict):
    got = {}

    def run():
        chunks = list(strict.client(api_key=KEY).completions.create(
            model=MODEL, prompt=PROMPTS[5], max_tokens=200, stream=True, stream_options={"include_usage": True},
            **GREEDY))
        got["chunks"] = chunks

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while strict.metrics()["fusedformer_requests_running"] < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)
    strict.proc.send_signal(signal.SIGTERM)
    assert strict.proc.wait(60) == 0, strict.output()
    t.join(30)
    chunks = got["chunks"]
    assert chunks[-1].usage.completion_tokens == 200
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert re.search(r"serving \S+ at http://127\.0\.0\.1:\d+", strict.output())


def test_start_server_reports_a_server_that_cannot_start(tmp_path):
    """start_server raises with the server's own error line when it exits before serving, and a
    process that never answers /health is stopped after the timeout, the wait reported."""
    import sys

    from fusedformer.serving.process import ServerProcess, start_server

    with pytest.raises(RuntimeError, match=r"(?s)exited with status 2.*error: .*missing"):
        start_server(["--model", str(tmp_path / "missing")], tmp_path / "bad.log", timeout=120)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not answer http://127\.0\.0\.1:9/health within 1 s"):
        ServerProcess([sys.executable, "-c", "import time; time.sleep(120)"], "http://127.0.0.1:9",
                      tmp_path / "silent.log", timeout=1)
    assert time.monotonic() - t0 < 60  # stopped, not waited for
    with pytest.raises(ValueError, match="timeout must be positive"):
        ServerProcess(["true"], "http://127.0.0.1:9", tmp_path / "x.log", timeout=0)
