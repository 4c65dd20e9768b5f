"""`python -m fusedformer serve` in its own process on a free port, for the tests that talk to it over
HTTP (the openai client, httpx, a browser). Import it after pytest.importorskip of openai and httpx."""

import os
import socket
import subprocess
import sys
import time

import httpx
import openai

from fusedformer.textgen import SHIPPED_MODEL

MODEL = os.path.basename(SHIPPED_MODEL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """Starts the server with the given command-line arguments and waits until /health answers;
    its output goes to NAME.log in tmp_path."""

    def __init__(self, tmp_path, name, *args):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / f"{name}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "fusedformer", "serve", "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"the server did not answer /health in time:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def client(self, api_key="none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()
