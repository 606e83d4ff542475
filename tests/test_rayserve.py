"""`tformer serve --ray`: the same app on Ray Serve, on one local Ray instance shared by the tests
of this module (CPU, 2 replicas of a small model). Texts are checked against the same model
in-process (`Runtime.generate`); which replica answered comes from its `x-tformer-replica` header."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tformer.bench.serve import free_port
from tformer.checkpoint import save_checkpoint
from tformer.model import TransformerLM
from tformer.runtime import Runtime

try:
    import ray
    from ray import serve

    from tformer.serve import rayserve
except ImportError:
    if os.environ.get("TFORMER_CI"):  # .ci/run installs Ray: its absence there is a failure
        raise
    pytest.skip("Ray Serve is not installed (pip install 'tformer[ray]'); .ci/run installs it", allow_module_level=True)

NAME = "tiny"
PROMPTS = ["def ", "import os\n", "class Foo", "return self.", "for i in", "with open(", "if x", "print("]
LONG = 4000  # tokens of the requests a killed replica is serving: long enough to be killed mid-stream


@pytest.fixture(scope="module")
def long_model(trained, tmp_path_factory):
    """The trained model with a positional table long enough for LONG tokens (the table is
    computed, not trained), saved for the replicas: (path, an in-process Runtime of it)."""
    model, tokenizer = trained
    longer = TransformerLM(dataclasses.replace(model.config, max_len=4096)).eval()
    weights = {k: v for k, v in copy.deepcopy(model).state_dict().items() if k != "pos_encoder.pe"}
    longer.load_state_dict(weights, strict=False)
    path = tmp_path_factory.mktemp("ray") / "tiny.safetensors"
    save_checkpoint(path, longer, tokenizer)
    return path, Runtime.from_model(longer, tokenizer, device="cpu")


@pytest.fixture(scope="module")
def ray_app(long_model):
    """Two replicas (one engine thread, 4 rows each) behind Ray Serve's proxy on a free port."""
    path, runtime = long_model
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        spec = rayserve.WorkerSpec(str(path), max_batch_size=4, max_len=4096, threads=1)
        app = rayserve.application(spec, rayserve.AppOptions(NAME, max_waiting=32), rayserve.Scaling(replicas=2), grace=2)
        serve.run(app, name=rayserve.APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}", runtime
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_pids() -> dict[str, int]:
    """Each live replica's id (what `x-tformer-replica` says) and its process id, through Ray's API:
    Serve names its replica actors `...#<deployment>#<id>`; the actor tells its own pid."""
    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        *_, deployment, replica = actor["name"].split("#") if "#" in actor["name"] else ("", "", "")
        if deployment == rayserve.DEPLOYMENT:
            try:
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                pids[replica] = ray.get(handle.__ray_call__.remote(lambda _: os.getpid()), timeout=10)
            except (ValueError, ray.exceptions.RayError):  # it died or is being replaced right now
                continue
    return pids


def wait_for_replicas(n: int, seconds: float = 180) -> dict[str, int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = serve.status().applications[rayserve.APP_NAME]
        running = status.deployments[rayserve.DEPLOYMENT].replica_states.get("RUNNING", 0)
        if status.status == "RUNNING" and running == n and len(pids := replica_pids()) == n:
            return pids
        time.sleep(0.5)
    raise AssertionError(f"Ray Serve did not get back to {n} running replicas in {seconds} s")


def test_sixteen_clients_get_the_in_process_text_from_both_replicas(ray_app):
    """16 concurrent requests through the official client, half streamed: each greedy text equals
    the in-process one, and the answers came from both replicas."""
    url, runtime = ray_app
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}{i}" for i in range(16)]
    want = runtime.generate(prompts, max_new_tokens=24, temperature=0)

    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        if i % 2:
            raw = await c.completions.with_raw_response.create(model=NAME, prompt=prompts[i], max_tokens=24, temperature=0)
            return raw.parse().choices[0].text, raw.headers["x-tformer-replica"]
        async with c.completions.with_streaming_response.create(model=NAME, prompt=prompts[i], max_tokens=24,
                                                                temperature=0, stream=True) as response:  # fmt: skip
            text = "".join([chunk.choices[0].text async for chunk in await response.parse()])
            return text, response.headers["x-tformer-replica"]

    async def all_at_once() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60) as c:
            return await asyncio.gather(*(one(c, i) for i in range(16)))

    got = asyncio.run(all_at_once())
    assert [text for text, _ in got] == want
    assert len({replica for _, replica in got}) == 2, got


def stream(url: str, prompt: str, max_tokens: int, out: dict) -> None:
    """One streamed completion, read to its end: `out` gets the replica, when its first chunk
    came, the chunks' text and how it ended ("done", or the error). Bounded: 60 s of silence fails."""
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    out["text"] = ""
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            out["replica"] = response.headers.get("x-tformer-replica")
            if response.status_code != 200:
                out["end"] = f"HTTP {response.status_code}"
                return
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    out["end"], out["ended"] = "done", time.monotonic()
                    return
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        out["end"] = f"error event: {event['error']['message']}"
                        return
                    out.setdefault("first", time.monotonic())
                    out["text"] += event["choices"][0]["text"]
        out["end"] = "ended without [DONE]"
    except httpx.HTTPError as exc:
        out["end"] = f"{type(exc).__name__}: {exc}"


def test_a_killed_replica_fails_its_requests_and_ray_brings_one_back(ray_app):
    """A replica's process killed mid-stream (its pid from Ray's state API): the requests it was
    serving end with an error, within the timeout, never a hang; those on the other replica
    finish; Ray starts a new replica, and requests after that succeed with the in-process text."""
    url, runtime = ray_app
    pids = wait_for_replicas(2)
    outs = [{} for _ in range(8)]
    threads = [threading.Thread(target=stream, args=(url, f"{PROMPTS[i]}", LONG, outs[i]), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not (streaming := [o for o in outs if "first" in o and "end" not in o]) and time.monotonic() < deadline:
        time.sleep(0.005)
    victim = streaming[0]["replica"]  # a replica in the middle of a stream
    os.kill(pids[victim], signal.SIGKILL)
    killed = time.monotonic()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a request hung after its replica was killed"
    on_victim = [o for o in outs if o.get("replica") == victim]
    assert any(o["end"] != "done" for o in on_victim), outs
    assert all(o["ended"] < killed for o in on_victim if o["end"] == "done"), outs  # only those done before
    assert all(o["end"] == "done" for o in outs if o.get("replica") not in (victim, None)), outs

    fresh = wait_for_replicas(2)
    assert victim not in fresh
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    want = runtime.generate(PROMPTS[:4], max_new_tokens=16, temperature=0)
    got = [c.completions.create(model=NAME, prompt=p, max_tokens=16, temperature=0).choices[0].text for p in PROMPTS[:4]]
    assert got == want


def test_print_config_is_a_serve_deploy_config(trained, tmp_path):
    """`--print-config` writes a config that Ray's own schema accepts, whose builder makes the app."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    model, tokenizer = trained
    save_checkpoint(tmp_path / "m.safetensors", model, tokenizer)
    r = subprocess.run([sys.executable, "-m", "tformer.cli", "serve", "m.safetensors", "--ray", "--print-config",
                        "--min-replicas", "1", "--max-replicas", "3", "--port", "8123", "--threads", "2"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load(r.stdout)
    ServeDeploySchema.parse_obj(config)  # raises on anything Ray's `serve deploy` would refuse
    (app,) = config["applications"]
    assert app["import_path"] == rayserve.IMPORT_PATH and app["args"]["model"] == str(tmp_path / "m.safetensors")
    (deployment,) = app["deployments"]
    assert deployment["autoscaling_config"]["max_replicas"] == 3 and deployment["ray_actor_options"]["num_cpus"] == 2
    built = rayserve.app_builder(app["args"])
    assert isinstance(built, serve.Application)
    with pytest.raises(ValueError, match="unknown: colour"):
        rayserve.app_builder({**app["args"], "colour": "red"})


@pytest.mark.parametrize("args, message", [
    (["--replicas", "2"], "--replicas needs --ray"),
    (["--ray", "--replicas", "2", "--max-replicas", "3"], "not both"),
    (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "is more than"),
    (["--ray", "--target-ongoing-requests", "4"], "for autoscaling"),
])  # fmt: skip
def test_cli_refuses_contradictory_ray_options(trained, tmp_path, args, message):
    model, tokenizer = trained
    save_checkpoint(tmp_path / "m.safetensors", model, tokenizer)
    r = subprocess.run([sys.executable, "-m", "tformer.cli", "serve", str(tmp_path / "m.safetensors"), *args],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("Error: ") and message in r.stderr and "Traceback" not in r.stderr
