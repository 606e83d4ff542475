"""The playground page (`GET /`) in a real headless Chromium, started once for the module: it
streams a completion from a real server into the page, and the page shows the model's text."""

from __future__ import annotations

import copy
import html
import json
import os
import re
import shutil
import subprocess

import pytest

from serve_support import wait_for
from tformer.runtime import Runtime
from tformer.serve.server import serve_in_thread


@pytest.fixture(scope="module")
def served(trained):
    """A small server (2 cache rows) in a thread: (base URL, its runtime)."""
    model, tokenizer = trained
    runtime = Runtime(Runtime.from_model(copy.deepcopy(model), tokenizer, device="cpu").backend, tokenizer,
                      max_batch_size=2, max_len=256)  # fmt: skip
    with serve_in_thread(runtime, model_name="tiny") as url:
        yield url, runtime


@pytest.fixture(scope="module")
def browser():
    browser = Browser(chromium())
    yield browser
    browser.close()


def chromium() -> str:
    """The headless browser, or a skip saying how to get one; in CI (`TFORMER_CI`, set by .ci/run,
    which installs it) its absence fails the test instead."""
    found = next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)
    if found is None:
        reason = "no Chromium here (Debian: apt-get install chromium); .ci/run installs it"
        if os.environ.get("TFORMER_CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
    JSON messages ending in NUL, commands on its fd 3, answers on its fd 4), so that a test can
    wait for what a page does rather than for a guessed time."""

    def __init__(self, executable: str):
        to_child, self._to_browser = os.pipe()
        self._from_browser, from_child = os.pipe()

        def fds() -> None:  # in the child: its fd 3 reads our commands, its fd 4 writes answers
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen([executable, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                                      "about:blank"], preexec_fn=fds, close_fds=False,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        os.close(to_child)
        os.close(from_child)
        self._buffer, self._id = b"", 0

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 16)
                assert chunk, "the browser exited"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                assert "error" not in answer, answer
                return answer["result"]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def test_playground_streams_a_completion_in_a_real_browser(served, browser):
    """Headless Chromium loads `/`, which submits the prompt from its query string (autorun=1) and
    streams the completion into the page; once the page says it is done, its DOM holds the model's
    text."""
    url, rt = served
    want = rt.generate("def ", max_new_tokens=8, temperature=0)[0].text
    target = browser.send("Target.createTarget", url=f"{url}/?prompt=def%20&max_tokens=8&temperature=0&autorun=1")
    session = browser.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]

    def page(expression: str) -> str:
        return browser.send("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"].get("value")

    assert wait_for(lambda: (page("document.getElementById('stats').textContent") or "").startswith("done"), 60), \
        page("document.getElementById('stats').textContent")
    dom = page("document.documentElement.outerHTML")
    shown = {key: html.unescape(re.search(rf'<span id="{key}">(.*?)</span>', dom, re.S).group(1))
             for key in ("prompt-echo", "completion")}  # fmt: skip
    assert shown == {"prompt-echo": "def ", "completion": want}
    assert re.search(r'<div id="stats">done: \d+ tokens in', dom)
