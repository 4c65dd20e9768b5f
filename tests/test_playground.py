"""The playground page (`GET /`) in a real browser: headless Chromium driven by selenium against
`python -m fusedformer serve`. The page streams the same text the openai client gets for the same
request, shows a tokens/s figure, sends the API key from its key field, and shows a 401 instead of
text when the key is wrong. Skipped when selenium, chromium or chromedriver is missing (`make test`
installs them: selenium with pip, Debian's chromium and chromium-driver with apt-get)."""

import os
import re

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")

from _server import MODEL, Server  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = "/usr/bin/chromium"  # Debian's chromium and chromium-driver packages
CHROMEDRIVER = "/usr/bin/chromedriver"
KEY = "sk-playground-key"
PROMPT = "class Parser:\n    def"
MAX_TOKENS = 12
STATS = re.compile(r"^(\d+) tokens in ([\d.]+) s: ([\d.]+) tokens/s; first token after ([\d.]+) s$")


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"no {' or '.join(missing)}: install Debian's chromium and chromium-driver packages")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    except WebDriverException as e:
        pytest.fail(f"headless chromium did not start: {e.msg}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("playground"), "open", "--kv-cache-memory", str(8 << 20))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("playground-key"), "keyed", "--api-key", KEY, "--kv-cache-memory", str(8 << 20))
    yield s
    s.stop()


def _type(driver, element_id, text):
    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(text)


def generate(driver, url, prompt, max_tokens, api_key=None) -> tuple[str, str, str]:
    """Open the page, fill in the form as a user would (temperature 0; the key field left empty when
    api_key is None), press Generate and wait until the run ends; returns (state, text of #completion,
    text of #stats)."""
    driver.get(url + "/")
    _type(driver, "prompt", prompt)
    _type(driver, "temperature", "0")
    _type(driver, "max_tokens", str(max_tokens))
    _type(driver, "api_key", api_key or "")
    driver.find_element(By.ID, "go").click()
    out = driver.find_element(By.ID, "out")
    state = WebDriverWait(driver, 60, poll_frequency=0.1).until(
        lambda d: out.get_attribute("data-state") in ("done", "error") and out.get_attribute("data-state"))
    completion = driver.find_element(By.ID, "completion").get_property("textContent")
    return state, completion, driver.find_element(By.ID, "stats").get_property("textContent")


def _expected(server, api_key="none"):
    r = server.client(api_key=api_key).completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                          temperature=0.0)
    return r.choices[0].text, r.usage.completion_tokens


def _check_streamed(driver, server, api_key=None):
    state, text, stats = generate(driver, server.url, PROMPT, MAX_TOKENS, api_key)
    assert state == "done", driver.find_element(By.ID, "out").get_property("textContent")
    assert driver.find_elements(By.ID, "error") == []
    expected, n_tokens = _expected(server, api_key or "none")
    assert text and text == expected
    m = STATS.search(stats)
    assert m, stats
    tokens, secs, per_sec, first = int(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4))
    assert tokens == n_tokens and per_sec > 0 and first <= secs
    if secs >= 0.01:  # the figure is the count over the time, both shown rounded (0.005 s, 0.05 tokens/s)
        assert tokens / (secs + 0.005) - 0.05 <= per_sec <= tokens / (secs - 0.005) + 0.05, stats
    # the page shows the prompt, then the completion
    assert driver.find_element(By.ID, "out").get_property("textContent") == PROMPT + expected


def test_the_page_streams_what_the_api_returns_with_tokens_per_second(browser, server):
    _check_streamed(browser, server)


def test_the_page_sends_the_api_key_and_shows_401_for_a_wrong_one(browser, keyed):
    _check_streamed(browser, keyed, api_key=KEY)
    for wrong in ("sk-wrong", None):
        state, text, stats = generate(browser, keyed.url, PROMPT, MAX_TOKENS, api_key=wrong)
        assert state == "error" and text == "" and stats == ""
        error = browser.find_element(By.ID, "error").get_property("textContent")
        assert error.startswith("error: 401: ") and "API key" in error, error
