"""`python -m fusedformer serve` in its own process on a free port, for the tests that talk to it over
HTTP (the openai client, httpx, a browser). Import it after pytest.importorskip of openai."""

import os

import openai

from fusedformer.serving.process import metrics, start_server
from fusedformer.textgen import SHIPPED_MODEL

MODEL = os.path.basename(SHIPPED_MODEL)


class Server:
    """Starts the server with the given command-line arguments and waits until /health answers
    (``fusedformer.serving.process.start_server``); its output goes to NAME.log in tmp_path."""

    def __init__(self, tmp_path, name, *args):
        try:
            self._process = start_server(args, tmp_path / f"{name}.log", timeout=180)
        except RuntimeError as e:
            raise AssertionError(str(e)) from None
        self.proc, self.url = self._process.proc, self._process.url

    def output(self) -> str:
        return self._process.output()

    def client(self, api_key="none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def metrics(self) -> dict:
        return metrics(self.url, timeout=10)

    def stop(self):
        self._process.stop(grace=0)
