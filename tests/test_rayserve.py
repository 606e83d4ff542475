"""`tformer serve --ray`: the same app on Ray Serve. The module starts ONE `tformer serve --ray`
(its own local Ray instance, 2 replicas of a small model, CPU) and its tests run against it; this
process joins that instance to find replicas and to deploy a broken model beside it. Texts are
checked against the same model in-process (`Runtime.generate`); which replica answered comes from
its `x-tformer-replica` header. The last test stops the server with a signal to its process
group, streams in flight, and checks that nothing of Ray is left."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner

# `tformer serve --ray`'s local instance has Ray's token authentication (Ray's default for a new local
# instance); Ray reads RAY_AUTH_MODE once, when it is imported, so this comes first.
os.environ.setdefault("RAY_AUTH_MODE", "token")

try:
    import ray
    from ray import serve

    from tformer.serve import rayserve
except ImportError:
    if os.environ.get("TFORMER_CI"):  # .ci/run installs Ray: its absence there is a failure
        raise
    pytest.skip("Ray Serve is not installed (pip install 'tformer[ray]'); .ci/run installs it", allow_module_level=True)

from serve_support import group_alive, health, long_model, raw_post, start_cli, stop, stream, wait_for, wait_up
from tformer.bench.cpu import descendants
from tformer.bench.serve import free_port
from tformer.checkpoint import save_checkpoint
from tformer.cli import cli
from tformer.errors import TformerError
from tformer.files import proc_stat_fields
from tformer.runtime import Runtime, load

NAME = "tiny"
PROMPTS = ["def ", "import os\n", "class Foo", "return self.", "for i in", "with open(", "if x", "print("]
LONG = 8000  # tokens of the requests in flight at the end of --grace: tens of seconds of work
GRACE = 3


@dataclass
class RayServer:
    url: str
    runtime: Runtime  # the same model in-process
    proc: subprocess.Popen  # `tformer serve --ray`, in a process group of its own
    log: Path  # its stderr
    logs: Path  # that instance's log directory


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """`tformer serve --ray` of the trained model with an 8192-token context: two replicas (one
    engine thread, 4 rows each) behind Ray Serve's proxy on a free port; this process joined to
    its Ray instance."""
    tmp = tmp_path_factory.mktemp("ray")
    runtime = long_model(trained, tmp / "tiny.safetensors", max_len=8192)
    port, log = free_port(), tmp / "stderr"
    proc = start_cli([str(tmp / "tiny.safetensors"), "--ray", "--replicas", "2", "--max-batch-size", "4", "--threads",
                      "1", "--max-waiting", "32", "--grace", str(GRACE), "--port", str(port)], log)  # fmt: skip
    try:
        wait_up(f"http://127.0.0.1:{port}", proc, log, 300)
        address = re.search(r"local instance at (\S+)\)", log.read_text()).group(1)
        context = ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        yield RayServer(f"http://127.0.0.1:{port}", runtime, proc, log,
                        Path(context.address_info["session_dir"]) / "logs" / "serve")  # fmt: skip
    finally:
        ray.shutdown()  # before the instance goes: a driver whose Ray has gone waits a minute, then exits
        ours = descendants(proc.pid)
        stop(proc)
        wait_for(lambda: not alive(ours), 30)  # its instance stops itself once its starter has gone


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still there (zombies too: nobody has reaped them)."""
    return [pid for pid in pids if proc_stat_fields(pid) is not None]


def replica_pids() -> dict[str, int]:
    """Each live replica's id (what `x-tformer-replica` says) and its process id, through Ray's API:
    Serve names its replica actors `...#<deployment>#<id>`; the actor tells its own pid."""
    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        *_, app, deployment, replica = actor["name"].split("#") if actor["name"].count("#") >= 2 else ("", "", "")
        if deployment == rayserve.DEPLOYMENT and app.endswith(rayserve.APP_NAME):
            try:
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                pids[replica] = ray.get(handle.__ray_call__.remote(lambda _: os.getpid()), timeout=10)
            except (ValueError, ray.exceptions.RayError):  # it died or is being replaced right now
                continue
    return pids


def wait_for_replicas(n: int, seconds: float = 180) -> dict[str, int]:
    def running() -> dict[str, int] | None:
        status = serve.status().applications[rayserve.APP_NAME]
        count = status.deployments[rayserve.DEPLOYMENT].replica_states.get("RUNNING", 0)
        return pids if status.status == "RUNNING" and count == n and len(pids := replica_pids()) == n else None

    found: list[dict[str, int]] = []  # what `running` saw when it held: asking again can see a replica moving
    assert wait_for(lambda: (pids := running()) is not None and not found.append(pids), seconds), (
        f"Ray Serve did not get back to {n} running replicas in {seconds} s")
    return found[0]


def test_sixteen_clients_get_the_in_process_text_from_both_replicas(served):
    """16 concurrent requests through the official client, half streamed: each greedy text equals
    the in-process one, and the answers came from both replicas."""
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}{i}" for i in range(16)]
    want = [out.text for out in served.runtime.generate(prompts, max_new_tokens=24, temperature=0)]

    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        if i % 2:
            raw = await c.completions.with_raw_response.create(model=NAME, prompt=prompts[i], max_tokens=24, temperature=0)
            return raw.parse().choices[0].text, raw.headers["x-tformer-replica"]
        async with c.completions.with_streaming_response.create(model=NAME, prompt=prompts[i], max_tokens=24,
                                                                temperature=0, stream=True) as response:  # fmt: skip
            text = "".join([chunk.choices[0].text async for chunk in await response.parse()])
            return text, response.headers["x-tformer-replica"]

    async def all_at_once() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=60) as c:
            return await asyncio.gather(*(one(c, i) for i in range(16)))

    got = asyncio.run(all_at_once())
    assert [text for text, _ in got] == want
    assert len({replica for _, replica in got}) == 2, got


def test_a_body_over_the_limit_is_413_through_rays_proxy(served):
    """The body limit is part of the app: through Ray Serve's proxy too, a body declared larger is
    refused though the client sent one byte of it, and a chunked one once it passes the limit."""
    status, answer = raw_post(served.url, {"Content-Length": str(10 * 10**6)}, b"{")
    assert status == 413 and answer["error"]["code"] == "request_too_large", answer
    chunk = b'{"model": "tiny", "prompt": "' + b"x" * 700_000  # twice: over the default limit (1.3 MB for 8192 tokens)
    status, answer = raw_post(served.url, {"Transfer-Encoding": "chunked"}, b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2)
    assert status == 413 and answer["error"]["code"] == "request_too_large", answer


def streams(url: str, bodies: list[dict]) -> tuple[list[dict], list[threading.Thread]]:
    """One streamed completion per body, each read to its end on a thread of its own (see `stream`)."""
    outs = [{} for _ in bodies]
    threads = [threading.Thread(target=stream, args=(url, body, out), daemon=True) for body, out in zip(bodies, outs)]
    for t in threads:
        t.start()
    return outs, threads


def body(prompt: str, max_tokens: int) -> dict:
    return {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def test_a_killed_replica_fails_its_requests_and_ray_brings_one_back(served):
    """A replica's process killed mid-stream (its pid from Ray's state API): the requests it was
    serving end with an error, within the timeout, never a hang; those on the other replica
    finish; Ray starts a new replica, and requests after that succeed with the in-process text."""
    pids = wait_for_replicas(2)
    # Seconds each, so that one is killed mid-stream; as many as a replica has rows, so that those on the
    # other replica (Ray's router may send it all of them) run in one batch, not one after another.
    outs, threads = streams(served.url, [body(p, 4000) for p in PROMPTS[:4]])
    assert wait_for(lambda: any("first" in o and "end" not in o for o in outs), 60), outs
    victim = next(o for o in outs if "first" in o and "end" not in o)["replica"]  # a replica in mid-stream
    os.kill(pids[victim], signal.SIGKILL)
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a request hung after its replica was killed"
    on_victim = [o for o in outs if o.get("replica") == victim]
    assert any(o["end"] != "done" for o in on_victim), outs
    assert all(o["end"] == "done" for o in outs if o.get("replica") not in (victim, None)), outs

    fresh = wait_for_replicas(2)
    assert victim not in fresh
    c = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=60)
    want = [out.text for out in served.runtime.generate(PROMPTS[:4], max_new_tokens=16, temperature=0)]
    got = [c.completions.create(model=NAME, prompt=p, max_tokens=16, temperature=0).choices[0].text for p in PROMPTS[:4]]
    assert got == want


def test_a_checkpoint_that_cannot_load_fails_the_deployment_with_its_own_error(served, trained, tmp_path):
    """A corrupt checkpoint deployed beside the running application (what `tformer serve --ray`
    deploys, through the same `deploy`): it fails with the load error itself, the one line that
    loading it without Ray gives, as soon as the first replica fails (not after Ray's retries:
    at most the first replica and one retry started), and no replica log holds a traceback from
    `__del__` (a replica whose constructor failed)."""
    model, tokenizer = trained
    save_checkpoint(tmp_path / "bad.safetensors", model, tokenizer)
    data = bytearray((tmp_path / "bad.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(TformerError) as plain:
        load(str(tmp_path / "bad.safetensors"))
    spec = rayserve.WorkerSpec(str(tmp_path / "bad.safetensors"), threads=1)
    # No CPU reserved: the two replicas above hold the instance's two.
    app = rayserve.application(spec, rayserve.AppOptions(NAME), rayserve.Scaling(replicas=1, num_cpus=0), grace=1)
    try:
        with pytest.raises(TformerError) as deployed:
            rayserve.deploy(app, "broken", "/broken")
    finally:
        serve.delete("broken")
    assert str(deployed.value) == str(plain.value) and "SHA-256" in str(plain.value)
    logs = list(served.logs.glob("replica_broken_*.log"))
    assert 1 <= len(logs) <= 2, logs
    assert not any("AttributeError" in log.read_text() for log in logs)


def test_print_config_is_a_serve_deploy_config(trained, tmp_path, monkeypatch):
    """`--print-config` writes a config that Ray's own schema accepts, whose builder makes the app."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    model, tokenizer = trained
    save_checkpoint(tmp_path / "m.safetensors", model, tokenizer)
    monkeypatch.chdir(tmp_path)  # a relative path: the config names it absolute
    r = CliRunner().invoke(cli, ["serve", "m.safetensors", "--ray", "--print-config", "--min-replicas", "1",
                                 "--max-replicas", "3", "--port", "8123", "--threads", "2"])  # fmt: skip
    assert r.exit_code == 0, r.output
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
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "m.safetensors"), *args])
    assert r.exit_code == 2 and r.stderr.startswith("Error: ") and message in r.stderr and r.stderr.count("\n") == 1


def test_sigterm_to_the_group_drains_the_replicas_and_leaves_no_ray_process(served):
    """Last (it stops the module's server): SIGTERM to the whole process group, as `systemctl stop`
    and a container's stop send it, with streams in flight on both replicas. The server stops
    taking requests; the stream that can finish within --grace gets every token; the others end
    with a final chunk (finish_reason abort) and [DONE]; it exits 0 within 20 s with no
    traceback, and no process of its group or of its Ray instance is left."""
    ray.shutdown()  # this process leaves the instance before it goes
    longs, threads = streams(served.url, [body(p, LONG) for p in PROMPTS[:6]])
    assert wait_for(lambda: all("first" in o for o in longs), 60), longs
    (short,), more = streams(served.url, [body("def ", 100)])
    assert wait_for(lambda: "first" in short or "end" in short, 60), short
    ours = descendants(served.proc.pid)  # its Ray instance's processes (gcs_server, raylet, workers), its engines
    assert len(ours) > 5, ours
    os.killpg(served.proc.pid, signal.SIGTERM)
    # It stops taking requests while it finishes the streams: /health says draining (503), or Ray's proxy
    # refuses the connection (it may stop listening as its replicas drain).
    answers = []
    assert wait_for(lambda: answers.append(health(served.url)) or answers[-1] != 200), answers
    assert served.proc.wait(timeout=20) == 0, served.log.read_text()
    for t in threads + more:
        t.join(timeout=10)
    assert (short["end"], short["finish"], short["tokens"]) == ("done", "length", 100), short
    assert [(o["end"], o["finish"]) for o in longs] == [("done", "abort")] * 6, longs
    assert len({o["replica"] for o in longs}) == 2, longs
    err = served.log.read_text()
    assert "SIGTERM" in err and err.strip().endswith("tformer serve: stopped") and "Traceback" not in err, err
    assert group_alive(served.proc.pid) == []
    assert wait_for(lambda: not alive(ours), 10), [(pid, proc_stat_fields(pid)) for pid in alive(ours)]
