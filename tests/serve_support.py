"""Helpers of the serving tests (test_serve, test_rayserve, test_playground): a model with a long
context (requests long enough to be in flight when a test acts), `tformer serve` as a process
group of its own, streams read to their end in threads, /metrics parsed, waits on conditions."""

from __future__ import annotations

import copy
import dataclasses
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import sigint_default
from tformer.checkpoint import save_checkpoint
from tformer.files import proc_stat_fields
from tformer.model import TransformerLM
from tformer.runtime import Runtime


def long_model(trained, path: Path, max_len: int = 4096) -> Runtime:
    """The trained model with a positional table of `max_len` positions (the table is computed,
    not trained: the first positions equal the original's), saved at `path`; an in-process
    Runtime of it, the reference for texts served from that file."""
    model, tokenizer = trained
    longer = TransformerLM(dataclasses.replace(model.config, max_len=max_len)).eval()
    weights = {k: v for k, v in copy.deepcopy(model).state_dict().items() if k != "pos_encoder.pe"}
    longer.load_state_dict(weights, strict=False)
    save_checkpoint(path, longer, tokenizer)
    return Runtime.from_model(longer, tokenizer, device="cpu")


def wait_for(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser: name{labels} -> value."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def health(url: str) -> int | str:
    """GET /health's status code, or what went wrong (a server gone refuses the connection)."""
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def up(url: str) -> bool:
    return health(url) == 200


def start_cli(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """`tformer serve ARGS` in a session (and process group) of its own, its stderr into `log`:
    a test can signal the whole group (`os.killpg(proc.pid, ...)`), as a terminal or a service
    manager does, and check that nothing of the group is left. SIGINT as in a terminal, also when
    the suite itself runs in the background (see `sigint_default`)."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "tformer.cli", "serve", *args], stdout=subprocess.DEVNULL,
                                stderr=err, stdin=subprocess.DEVNULL, env={**os.environ, **env},
                                start_new_session=True, preexec_fn=sigint_default)  # fmt: skip


def wait_up(url: str, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    """Until the server answers /health and has said it is up (its first line: `--ray` says it once
    every replica is up, and takes signals as a running server only from then on)."""
    ready = lambda: up(url) and "tformer serve: http" in log.read_text()  # noqa: E731
    assert wait_for(lambda: ready() or proc.poll() is not None, seconds) and proc.poll() is None, log.read_text()


def group_alive(pgid: int) -> list[int]:
    """The processes still in process group `pgid` (zombies count: nobody reaped them)."""
    pids = (int(e) for e in os.listdir("/proc") if e.isdigit())
    return [pid for pid in pids if (fields := proc_stat_fields(pid)) and int(fields[2]) == pgid]


def stop(proc: subprocess.Popen) -> None:
    """Kill what is left of a CLI's process group (a test that failed midway)."""
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()


def stream(url: str, body: dict, out: dict, timeout: float = 60) -> None:
    """One streamed completion, read to its end (in a thread): `out` gets the replica header, when
    its first chunk came, its text and token count, its last finish_reason, and how it ended:
    "done" ([DONE] after a final chunk), or what went wrong. Bounded: `timeout` of silence fails."""
    out.update(text="", tokens=0, finish=None)
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=timeout) as response:
            out["replica"] = response.headers.get("x-tformer-replica")
            if response.status_code != 200:
                out["end"] = f"HTTP {response.status_code}"
                return
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    out["end"] = "done" if out["finish"] else "[DONE] without a final chunk"
                    out["ended"] = time.monotonic()
                    return
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        out["end"] = f"error event: {event['error']['message']}"
                        return
                    choice = event["choices"][0]
                    out.setdefault("first", time.monotonic())
                    out["text"] += choice["text"]
                    out["tokens"] += len(choice["token_ids"])
                    out["finish"] = choice["finish_reason"]
        out["end"] = "ended without [DONE]"
    except httpx.HTTPError as exc:
        out["end"] = f"{type(exc).__name__}: {exc}"


def raw_post(url: str, head: dict[str, str], body: bytes = b"") -> tuple[int, dict]:
    """POST /v1/completions over a plain socket: these headers, then `body` (not necessarily all the
    body they declare); the answer's status and JSON, read by its own Content-Length."""
    host, port = url.removeprefix("http://").split(":")
    lines = ["POST /v1/completions HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
             *(f"{k}: {v}" for k, v in head.items())]  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, json.loads(answer.read())
