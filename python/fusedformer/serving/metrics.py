"""The server's Prometheus metrics, in a registry of its own (two servers in one process never mix their
figures): requests running and waiting, KV blocks in use and in all, how full the blocks in use are,
prompt and generated tokens, requests finished by finish reason, and the time to first token and per
output token."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("fusedformer_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("fusedformer_requests_waiting", "Requests waiting for a place in the running batch",
                             registry=r)
        self.kv_blocks_used = Gauge("fusedformer_kv_blocks_in_use", "KV-cache blocks held by requests", registry=r)
        self.kv_blocks_total = Gauge("fusedformer_kv_blocks_total", "KV-cache blocks in the pool", registry=r)
        self.kv_utilization = Gauge("fusedformer_kv_utilization", "Tokens held in the KV cache / (blocks in use x "
                                    "block size), at the last model step", registry=r)
        self.kv_peak_blocks = Gauge("fusedformer_kv_peak_blocks_in_use", "The most KV-cache blocks in use at a "
                                    "model step", registry=r)
        self.kv_utilization_at_peak = Gauge("fusedformer_kv_utilization_at_peak", "Tokens held / (blocks in use x "
                                            "block size) at the step with the most blocks in use", registry=r)
        self.kv_utilization_mean = Gauge("fusedformer_kv_utilization_mean", "Tokens held / (blocks in use x "
                                         "block size), the mean over model steps", registry=r)
        self.prompt_tokens = Counter("fusedformer_prompt_tokens", "Prompt tokens of the requests admitted",
                                     registry=r)
        self.generation_tokens = Counter("fusedformer_generation_tokens", "Output tokens generated", registry=r)
        self.finished = Counter("fusedformer_requests_finished", "Samples finished, by finish reason "
                                "(stop, length, abort)", ["finish_reason"], registry=r)
        self.ttft = Histogram("fusedformer_time_to_first_token_seconds", "Time from arrival to the first output "
                              "token", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("fusedformer_time_per_output_token_seconds", "Time per output token after the "
                              "first", buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
