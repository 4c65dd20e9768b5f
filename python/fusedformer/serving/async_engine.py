"""The engine on its own thread, for the HTTP server: one thread owns the LLMEngine (its model and KV
pool) and steps it; the event loop submits and aborts requests through a thread-safe queue and gets each
request's events on an asyncio queue of its own (``loop.call_soon_threadsafe``), so a model step never
blocks the loop.

Events a request's queue receives, in order: ``("added",)`` or ``("error", status, message, param)``;
then, for a streamed request, ``("output", RequestOutput)`` after every step that gave it tokens; and
last ``("output", RequestOutput)`` with ``finished`` True (or an error if the engine failed)."""

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import Dict, List, Optional

from .engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger("fusedformer.serving")


class Overloaded(Exception):
    """The waiting queue is full, or the server is shutting down."""


@dataclasses.dataclass(eq=False)
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    stream: bool
    arrival: float
    num_prompt_tokens: int
    first_token: Optional[float] = None
    num_tokens: int = 0  # output tokens so far, all samples together

    def put(self, event):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass


class AsyncEngine:
    """Runs ``engine`` on a thread of its own. ``metrics``: a serving.metrics.Metrics to keep up to date
    (or None); ``max_waiting``: requests allowed to wait for a place in the running batch before new ones
    are refused with Overloaded (None: no limit)."""

    def __init__(self, engine: LLMEngine, metrics=None, max_waiting: Optional[int] = None):
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
        self._inbox: "queue.Queue" = queue.Queue()
        self._sinks: Dict[str, _Sink] = {}  # engine thread only
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet taken by the engine thread
        self._waiting = 0  # requests in the engine not yet running (as of the last step)
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="fusedformer-engine", daemon=True)
        self._update_gauges()

    # ---- event-loop side ------------------------------------------------------------------------------------
    def start(self):
        self._thread.start()

    def submit(self, request_id: str, prompt_token_ids: List[int], params: SamplingParams,
               stream: bool) -> asyncio.Queue:
        """Queue a request; returns the asyncio queue its events arrive on. Raises Overloaded when the
        waiting queue is full or the server is shutting down."""
        with self._lock:
            if not self._accepting:
                raise Overloaded("the server is shutting down")
            if self.max_waiting is not None and self._pending + self._waiting >= self.max_waiting:
                raise Overloaded(f"the server is busy: {self._pending + self._waiting} requests are waiting "
                                 f"(max_waiting {self.max_waiting}); retry later")
            self._pending += 1
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue(), stream, time.monotonic(), len(prompt_token_ids))
        self._inbox.put(("add", request_id, prompt_token_ids, params, sink))
        return sink.queue

    def abort(self, request_id: str):
        """End a request (its client has gone): its blocks go back to the pool; it gets no more events."""
        self._inbox.put(("abort", request_id))

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Refuse new requests, let the running ones finish (at most ``timeout`` seconds, then abort
        them) and stop the thread. Returns whether everything finished in time."""
        with self._lock:
            self._accepting = False
        if not self._thread.is_alive():
            return True
        self._inbox.put(("stop",))
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._inbox.put(("abort_all",))
            self._thread.join(5.0)
            return False
        return True

    @property
    def num_waiting(self) -> int:
        return self._pending + self._waiting

    # ---- engine thread --------------------------------------------------------------------------------------
    def _run(self):
        stopping = False
        while True:
            idle = not self.engine.has_unfinished_requests()
            if stopping and idle:
                break
            commands = [self._inbox.get()] if idle else []
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for cmd in commands:
                if cmd[0] == "add":
                    self._add(*cmd[1:])
                elif cmd[0] == "abort":
                    self._abort(cmd[1])
                elif cmd[0] == "abort_all":
                    for rid in list(self._sinks):
                        self._abort(rid)
                elif cmd[0] == "stop":
                    stopping = True
            if self.engine.has_unfinished_requests():
                self._step()
            self._update_gauges()

    def _add(self, request_id, prompt_token_ids, params, sink: _Sink):
        with self._lock:
            self._pending -= 1
        try:
            self.engine.add_request(prompt_token_ids, params, request_id)
        except ValueError as e:
            sink.put(("error", 400, str(e), "n" if "n=" in str(e) else "prompt"))
            return
        self._sinks[request_id] = sink
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(prompt_token_ids))
        with self._lock:  # counted as waiting until a step schedules it
            self._waiting += 1
        sink.put(("added",))

    def _abort(self, request_id):
        sink = self._sinks.pop(request_id, None)
        self.engine.abort([request_id])
        if sink is not None and self.metrics is not None:
            self.metrics.finished.labels(finish_reason="abort").inc()
            self.metrics.generation_tokens.inc(sink.num_tokens)

    def _step(self):
        try:
            finished = self.engine.step()
        except Exception as e:  # a bug or a broken model: fail every request, keep serving
            log.exception("engine step failed")
            for rid, sink in list(self._sinks.items()):
                self.engine.abort([rid])
                sink.put(("error", 500, f"the engine failed: {type(e).__name__}: {e}", None))
            self._sinks.clear()
            return
        now = time.monotonic()
        done = {o.request_id: o for o in finished}
        for rid, sink in list(self._sinks.items()):
            out = done.get(rid)
            if out is None and (sink.stream or sink.first_token is None):
                out = self.engine.snapshot(rid)
            if out is None:
                continue
            n = sum(len(c.token_ids) for c in out.outputs)
            if n and sink.first_token is None:
                sink.first_token = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - sink.arrival)
            grew = n > sink.num_tokens
            sink.num_tokens = n
            if out.finished:
                del self._sinks[rid]
                self._record_finish(sink, out, now)
                sink.put(("output", out))
            elif sink.stream and grew:
                sink.put(("output", out))

    def _record_finish(self, sink: _Sink, out: RequestOutput, now: float):
        m = self.metrics
        if m is None:
            return
        m.generation_tokens.inc(sink.num_tokens)
        for c in out.outputs:
            m.finished.labels(finish_reason=c.finish_reason or "abort").inc()
        longest = max(len(c.token_ids) for c in out.outputs)
        if longest > 1 and sink.first_token is not None:
            m.tpot.observe((now - sink.first_token) / (longest - 1))

    def _update_gauges(self):
        sched = self.engine.scheduler
        running = len({s.request.request_id for s in sched.running})
        waiting = len(self.engine.requests) - running
        with self._lock:
            self._waiting = waiting
            pending = self._pending
        m = self.metrics
        if m is not None:
            m.running.set(running)
            m.waiting.set(waiting + pending)
            m.kv_blocks_used.set(self.engine.pool.num_used)
            m.kv_blocks_total.set(self.engine.pool.num_blocks)
            kv = self.engine.kv_usage
            m.kv_utilization.set(kv.utilization)
            m.kv_peak_blocks.set(kv.peak_blocks_in_use)
            m.kv_utilization_at_peak.set(kv.utilization_at_peak)
            m.kv_utilization_mean.set(kv.mean_utilization)
