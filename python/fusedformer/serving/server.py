"""The OpenAI-compatible HTTP server: a thin FastAPI layer over the engine thread (async_engine).

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent events
with ``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus) and ``GET /``
(a playground page). Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
``serve`` runs it with uvicorn; ``python -m fusedformer serve`` is its command line."""

import asyncio
import json
import os
import secrets
import signal
import socket
import time
import uuid
from contextlib import asynccontextmanager
from typing import Dict, List, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api_models import ChatCompletionRequest, CompletionRequest, SamplingRequest
from .async_engine import AsyncEngine, Overloaded
from .engine import LLMEngine
from .metrics import Metrics
from ..tokenizer import IncrementalText
from .outputs import CompletionOutput, RequestOutput

PLAYGROUND = os.path.join(os.path.dirname(os.path.abspath(__file__)), "playground.html")
DEFAULT_MAX_WAITING = 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _default_chat_prompt(messages) -> str:
    """The prompt of a chat for a tokenizer without a chat template: one ``role: content`` line per
    message, then ``assistant:``."""
    return "".join(f"{m.role}: {m.text()}\n" for m in messages) + "assistant:"


class _Server:
    """What the routes share: the engine, its thread, the tokenizer and the served model's name."""

    def __init__(self, engine: LLMEngine, model_name: str, max_waiting: Optional[int]):
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer
        self.metrics = Metrics()
        self.core = AsyncEngine(engine, self.metrics, max_waiting)

    # ---- checks and prompts -------------------------------------------------------------------------------
    def check_model(self, model: Optional[str]):
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           "model", "model_not_found")

    def encode(self, text: str, param: str) -> List[int]:
        name = param.split("[")[0]  # the body's field, for the error object
        if self.tokenizer is None:
            raise APIError(400, f"{param}: the model has no tokenizer; give the prompt as token ids", name)
        ids = self.tokenizer.encode(text)
        if not ids:
            raise APIError(400, f"{param}: the text has no token", name)
        return ids

    def completion_prompts(self, prompt) -> List[List[int]]:
        """The token ids of each prompt of a /v1/completions body: a string or a list of token ids (one
        prompt), or a list of strings or of token-id lists (a batch, each prompt its own request)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return [self._prompt_ids(p, f"prompt[{i}]" if len(prompt) > 1 else "prompt")
                    for i, p in enumerate(prompt)]
        return [self._prompt_ids(prompt, "prompt")]

    def _prompt_ids(self, prompt, param: str) -> List[int]:
        if isinstance(prompt, str):
            return self.encode(prompt, param)
        if not prompt:
            raise APIError(400, f"{param}: an empty list of token ids", "prompt")
        vocab = self.engine.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is not in [0, {vocab})", "prompt")
        return list(prompt)

    def chat_prompt(self, messages) -> List[int]:
        tok = getattr(self.tokenizer, "tokenizer", None)
        if getattr(tok, "chat_template", None) and hasattr(tok, "apply_chat_template"):
            text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                           tokenize=False, add_generation_prompt=True)
        else:
            text = _default_chat_prompt(messages)
        return self.encode(text, "messages")

    def sampling_params(self, body: SamplingRequest, prompt_len: int, max_tokens: Optional[int],
                        logprobs: Optional[int], prompt_param: str):
        context = self.engine.max_model_len
        has = "the prompt has" if prompt_param == "prompt" else f"the {prompt_param} have"
        if prompt_len >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; {has} {prompt_len} "
                                "tokens, leaving none to generate.", prompt_param)
        if max_tokens is None:
            max_tokens = context - prompt_len
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1; got {max_tokens}", "max_tokens")
        if prompt_len + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; {has} {prompt_len} "
                                f"tokens and max_tokens asks for {max_tokens} more. Lower max_tokens.", "max_tokens")
        try:
            params = body.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            msg = str(e).removeprefix("SamplingParams: ")
            raise APIError(400, msg, msg.split(" ", 1)[0]) from None
        max_seqs = self.engine.scheduler.max_num_seqs
        if params.n > max_seqs:
            raise APIError(400, f"n: {params.n} samples exceed the server's max_num_seqs {max_seqs}", "n")
        pool = self.engine.pool
        shared = prompt_len // pool.block_size
        needed = shared + params.n * (pool.blocks_for(prompt_len + max_tokens) - shared)
        if needed > pool.num_blocks:
            param = "n" if params.n > 1 else "max_tokens"
            raise APIError(400, f"{param}: {params.n} sample(s) of up to {prompt_len + max_tokens} tokens need "
                                f"{needed} KV blocks; the pool has {pool.num_blocks}", param)
        return params

    # ---- running a request --------------------------------------------------------------------------------
    async def start(self, request_id: str, prompt_ids: List[int], params, stream: bool):
        try:
            q = self.core.submit(request_id, prompt_ids, params, stream)
        except Overloaded as e:
            raise APIError(503, str(e), None, "overloaded", "server_error") from None
        event = await q.get()
        if event[0] == "error":
            raise APIError(event[1], event[2], event[3])
        return q

    async def start_all(self, request_ids: List[str], prompts: List[List[int]], params, stream: bool):
        """Queue one request per prompt; if one is refused, the ones queued before it are aborted."""
        queues = []
        try:
            for rid, ids in zip(request_ids, prompts):
                queues.append(await self.start(rid, ids, params, stream))
        except BaseException:
            for rid in request_ids[:len(queues)]:
                self.core.abort(rid)
            raise
        return queues

    async def result(self, request: Request, request_id: str, q) -> RequestOutput:
        """The finished output of a non-streamed request; aborts it if its client goes away."""
        getter = None
        try:
            while True:
                getter = getter or asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({getter}, timeout=1.0)
                if not done:
                    if await request.is_disconnected():
                        raise APIError(499, "the client disconnected")
                    continue
                event, getter = getter.result(), None
                if event[0] == "error":
                    raise APIError(event[1], event[2], event[3])
                return event[1]
        except BaseException:
            self.core.abort(request_id)
            raise
        finally:
            if getter is not None:
                getter.cancel()


# ---- response bodies -----------------------------------------------------------------------------------------

def _usage(prompt_len: int, outputs: List[CompletionOutput]) -> Dict[str, int]:
    n = sum(len(c.token_ids) for c in outputs)
    return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}


def _reindexed(choice: dict, index: int) -> dict:
    choice["index"] = index
    return choice


def _token_text(token_id: int, lp) -> str:
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else str(token_id)


def _completion_logprobs(token_ids, logprobs, offset: int = 0):
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    if logprobs is None:
        return None
    tokens, chosen, tops, offsets = [], [], [], []
    for t, top in zip(token_ids, logprobs):
        text = _token_text(t, top.get(t))
        tokens.append(text)
        chosen.append(top[t].logprob if t in top else None)
        tops.append({_token_text(k, v): v.logprob for k, v in sorted(top.items(), key=lambda kv: kv[1].rank)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(token_ids, logprobs, k: int):
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if logprobs is None:
        return None

    def entry(t, lp):
        text = _token_text(t, lp)
        return {"token": text, "logprob": lp.logprob if lp is not None else None, "bytes": list(text.encode())}

    content = []
    for t, top in zip(token_ids, logprobs):
        ranked = sorted(top.items(), key=lambda kv: kv[1].rank)[:k]
        content.append(dict(entry(t, top.get(t)), top_logprobs=[entry(i, lp) for i, lp in ranked]))
    return {"content": content}


class _StreamState:
    """Turns the outputs of a streamed request into text deltas: every sample's text so far, held back
    where it could still change (an unfinished UTF-8 character, the start of a stop string)."""

    def __init__(self, tokenizer, params):
        self.tokenizer = tokenizer
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.sent_text: Dict[int, str] = {}
        self.sent_tokens: Dict[int, int] = {}
        self.texts: Dict[int, IncrementalText] = {}
        self.done: set = set()

    def deltas(self, out: RequestOutput):
        """(index, text delta, new token ids, their logprobs, text offset, finish_reason) per sample with news."""
        for c in out.outputs:
            i = c.index
            if i in self.done:
                continue
            sent = self.sent_text.get(i, "")
            start = self.sent_tokens.get(i, 0)
            if c.finish_reason is not None:
                self.done.add(i)
                full = c.text
            else:
                full = ""
                if self.tokenizer is not None:
                    full = self.texts.setdefault(i, IncrementalText(self.tokenizer.decode)).update(c.token_ids)
                if self.holdback:
                    full = full[:max(len(sent), len(full) - self.holdback)]
            delta = full[len(sent):] if full.startswith(sent) else ""
            new_ids = c.token_ids[start:]
            if not delta and not new_ids and c.finish_reason is None:
                continue
            self.sent_text[i] = sent + delta
            self.sent_tokens[i] = len(c.token_ids)
            lps = c.logprobs[start:] if c.logprobs is not None else None
            yield i, delta, new_ids, lps, len(sent), c.finish_reason


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _error_event(event) -> str:
    return _sse({"error": {"message": event[2], "type": "server_error", "param": event[3], "code": None}})


# ---- the app -------------------------------------------------------------------------------------------------

def create_app(engine_or_llm, model_name: Optional[str] = None, api_key: Optional[str] = None,
               max_waiting: Optional[int] = DEFAULT_MAX_WAITING, shutdown_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app serving ``engine_or_llm`` (an LLMEngine or an LLM) as ``model_name`` (default: the
    engine's). ``api_key``: requests to /v1/* must carry ``Authorization: Bearer <api_key>``;
    ``max_waiting``: requests allowed to wait for the running batch before new ones get 503;
    ``shutdown_timeout``: seconds the running requests get to finish when the app shuts down."""
    engine = engine_or_llm if isinstance(engine_or_llm, LLMEngine) else engine_or_llm.engine
    srv = _Server(engine, model_name or engine.model_name, max_waiting)

    @asynccontextmanager
    async def lifespan(app):
        srv.core.start()
        try:
            yield
        finally:
            srv.core.shutdown(shutdown_timeout)

    app = FastAPI(title="fusedformer", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [x for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return APIError(400, f"The body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}",
                            None, "invalid_json").response()
        param = str(loc[0]) if loc else None  # the top-level field (a union adds its member's name to loc)
        where = ".".join(str(x) for x in loc) or "body"
        return APIError(400, f"{where}: {err.get('msg', 'invalid value')}", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), None, None,
                        "invalid_request_error" if e.status_code < 500 else "server_error").response()

    def check_key(request: Request):
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.", None,
                           "invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": int(time.time()),
                                             "owned_by": "fusedformer", "max_model_len": engine.max_model_len}]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        srv.check_model(body.model)
        prompts = srv.completion_prompts(body.prompt)
        # every prompt is checked before any is queued (the longest decides the limits)
        params = srv.sampling_params(body, max(map(len, prompts)), 16 if body.max_tokens is None
                                     else body.max_tokens, body.logprobs, "prompt")

        def final(c: CompletionOutput):
            return {"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                    "logprobs": _completion_logprobs(c.token_ids, c.logprobs)}

        def delta(i, text, ids, lps, offset, reason):
            return {"index": i, "text": text, "finish_reason": reason,
                    "logprobs": _completion_logprobs(ids, lps, offset)}

        return await _respond(srv, request, body, prompts, params, "cmpl", ("text_completion", "text_completion"),
                              final, delta)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        srv.check_model(body.model)
        prompt_ids = srv.chat_prompt(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        k = body.top_logprobs or 0
        params = srv.sampling_params(body, len(prompt_ids), max_tokens, k if body.logprobs else None, "messages")

        def final(c: CompletionOutput):
            return {"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                    "logprobs": _chat_logprobs(c.token_ids, c.logprobs, k)}

        def delta(i, text, ids, lps, offset, reason):
            return {"index": i, "delta": {"content": text} if text else {}, "finish_reason": reason,
                    "logprobs": _chat_logprobs(ids, lps, k)}

        first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
                 for i in range(params.n)]
        return await _respond(srv, request, body, [prompt_ids], params, "chatcmpl",
                              ("chat.completion", "chat.completion.chunk"), final, delta, first)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(srv.metrics.render(), media_type=srv.metrics.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        with open(PLAYGROUND, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    return app


async def _respond(srv: _Server, request: Request, body: SamplingRequest, prompts: List[List[int]], params,
                   prefix: str, objects, final, delta, first=None):
    """Run a request: the whole answer as JSON, or (``body.stream``) server-sent events, starting with
    ``first`` choices if given. ``prompts``: one engine request each, run side by side; prompt ``p``'s
    sample ``j`` is choice ``p * n + j`` (as OpenAI numbers a batch of prompts), and usage sums them all.
    ``objects``: the object names of the answer and of a stream's chunks; ``final(CompletionOutput)`` and
    ``delta(index, text, token ids, logprobs, text offset, finish_reason)`` make one choice of each."""
    rid = f"{prefix}-{uuid.uuid4().hex}"
    rids = [rid] if len(prompts) == 1 else [f"{rid}-{p}" for p in range(len(prompts))]
    created, model, n = int(time.time()), srv.model_name, params.n
    queues = await srv.start_all(rids, prompts, params, body.stream)

    def usage(outs):
        u = [_usage(len(ids), out.outputs) for ids, out in zip(prompts, outs) if out is not None]
        return {k: sum(x[k] for x in u) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}

    if not body.stream:
        tasks = [asyncio.ensure_future(srv.result(request, r, q)) for r, q in zip(rids, queues)]
        try:
            outs = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one failed: the others end too (a cancelled one aborts its request)
                task.cancel()
            raise
        return {"id": rid, "object": objects[0], "created": created, "model": model,
                "choices": [_reindexed(final(c), p * n + c.index) for p, out in enumerate(outs) for c in out.outputs],
                "usage": usage(outs)}

    def chunk(choices, usage=None):
        return _sse({"id": rid, "object": objects[1], "created": created, "model": model, "choices": choices,
                     "usage": usage})

    states = [_StreamState(srv.tokenizer, params) for _ in prompts]
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(p, q):  # prompt p's events into the merged queue, until its last
        while True:
            event = await q.get()
            await merged.put((p, event))
            if event[0] == "error" or event[1].finished:
                return

    async def events():
        pumps = [asyncio.ensure_future(pump(p, q)) for p, q in enumerate(queues)]
        last, done = [None] * len(prompts), set()
        try:
            if first is not None:
                yield chunk(first)
            while len(done) < len(prompts):
                p, event = await merged.get()
                done.update([p] if event[0] == "error" or event[1].finished else [])
                if event[0] == "error":  # the stream ends here; the other prompts are aborted below
                    yield _error_event(event)
                    break
                last[p] = event[1]
                news = [_reindexed(delta(*d), p * n + d[0]) for d in states[p].deltas(last[p])]
                if news:
                    yield chunk(news)
            if body.include_usage and any(out is not None for out in last):
                yield chunk([], usage(last))
            yield "data: [DONE]\n\n"
        finally:
            for task in pumps:
                task.cancel()
            for p, r in enumerate(rids):
                if p not in done:  # the client went away, or another prompt failed: free its blocks
                    srv.core.abort(r)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- running it ----------------------------------------------------------------------------------------------

def serve(engine_or_llm, host: str = "127.0.0.1", port: int = 8000, model_name: Optional[str] = None,
          api_key: Optional[str] = None, max_waiting: Optional[int] = DEFAULT_MAX_WAITING,
          shutdown_timeout: float = 30.0, log_level: str = "warning") -> int:
    """Serve until SIGINT or SIGTERM: then stop accepting connections, let the requests in flight finish
    (at most ``shutdown_timeout`` seconds) and return 0. Prints the URL once it accepts requests. Raises
    OSError when the address cannot be bound."""
    import uvicorn

    app = create_app(engine_or_llm, model_name, api_key, max_waiting, shutdown_timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    bound_port = sock.getsockname()[1]
    name = app.state.server.model_name
    url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{bound_port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"fusedformer: serving {name} at {url} (OpenAI API at {url}/v1, playground at {url}/)",
                      flush=True)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                            lifespan="on", timeout_keep_alive=5)
    server = Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; handlers that ignore it make
    # that graceful shutdown end with status 0
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: None) for s in stops}
    try:
        server.run(sockets=[sock])
    finally:
        for s in stops:
            signal.signal(s, previous[s])
        sock.close()
    return 0
