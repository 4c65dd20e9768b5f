"""A server in its own process: started from a command line, ready once ``GET /health`` answers 200,
stopped with SIGTERM (a graceful drain) and killed if it has not exited in time. It runs
``python -m fusedformer serve`` from Python (:func:`start_server`: tests, benchmarks, notebooks) and
any other server with a /health route (llama.cpp's ``llama-server`` in the load benchmark), and reads
its Prometheus ``/metrics`` (:func:`metrics`)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Dict, Optional, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at the moment (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):  # refused, not yet listening, 503 while loading
        return False


def metrics(url: str, timeout: float = 30.0) -> Dict[str, float]:
    """The samples of ``url``/metrics (Prometheus' text format), keyed as written: the metric name
    with its labels, e.g. ``fusedformer_requests_finished_total{finish_reason="stop"}``."""
    with urllib.request.urlopen(url + "/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class ServerProcess:
    """``cmd`` started with its output in ``log_path``; the constructor returns once ``url``/health
    answers 200, and raises RuntimeError with the server's output if the process exits first or
    ``timeout`` seconds pass (the process is then stopped)."""

    def __init__(self, cmd: Sequence[str], url: str, log_path: str, *, timeout: float = 300.0,
                 env: Optional[dict] = None):
        if timeout <= 0:
            raise ValueError(f"ServerProcess: timeout must be positive, got {timeout}")
        self.url, self.log_path = url, os.fspath(log_path)
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(list(cmd), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(url):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.output()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer {url}/health within {timeout:g} s:\n"
                                       f"{self.output()}")
                time.sleep(0.2)
        except BaseException:
            self.stop(grace=0)
            raise

    def output(self) -> str:
        """Everything the server printed so far."""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, grace: float = 60.0) -> Optional[int]:
        """SIGTERM, then SIGKILL if the process has not exited after ``grace`` seconds (0: kill at
        once); returns its exit status. Safe to call again."""
        try:
            if self.proc.poll() is None and grace > 0:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        finally:  # also when the wait is interrupted (Ctrl-C, SIGTERM)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(30)
            self.log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(args: Sequence[str], log_path: str, *, host: str = "127.0.0.1", port: Optional[int] = None,
                 timeout: float = 300.0) -> ServerProcess:
    """``python -m fusedformer serve ARGS`` on ``host`` and ``port`` (default: a free one) in its own
    process, returned once it serves; its ``url`` is where it listens."""
    port = free_port(host) if port is None else port
    cmd = [sys.executable, "-m", "fusedformer", "serve", "--host", host, "--port", str(port), *args]
    return ServerProcess(cmd, f"http://{host}:{port}", log_path, timeout=timeout)
