"""`tformer serve --ray`: the same app on Ray Serve, one engine per replica, replicas on many machines.

Each replica is a Ray actor that starts its own engine process (`EngineProcess`, exactly as `tformer
serve` does) and serves `create_app` over it through `@serve.ingress`: the routes, errors, metrics
and streaming are the ones plain `tformer serve` runs under uvicorn, not a fork of them. Ray
Serve's proxy routes each HTTP request to a replica and streams its answer back; Ray restarts a
replica whose process dies or whose health check (`check_health`: the engine process is alive)
fails, and scales the replica count between bounds by the requests in flight.
Each completion says which replica answered (`x-tformer-replica`).

Deployed two ways: `tformer serve MODEL --ray` (`run`: starts a local Ray instance of its own in
a session of its own (`LocalRay`), or joins a cluster; deploys, failing at once with a replica's
own load error; serves until SIGTERM or Ctrl-C, then has every replica drain as plain `tformer
serve` does, and stops what it started), or Ray's own tools with the config that `--print-config`
writes (`config`), whose `import_path` is `app_builder`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from tformer.errors import TformerError
from tformer.files import proc_stat_fields
from tformer.serve.app import create_app
from tformer.serve.worker import EngineProcess, WorkerSpec

APP_NAME = "tformer"
DEPLOYMENT = "TformerReplica"
IMPORT_PATH = "tformer.serve.rayserve:app_builder"
DRAIN_BACKSTOP_S = 5.0  # after the grace period: how long Ray waits for a replica that has not drained
# The program of `LocalRay`'s process: start Ray, say its address, stop it when stdin closes.
HEAD = ("import sys, ray; context = ray.init(include_dashboard=False, logging_level='ERROR', log_to_driver=False); "
        "print(context.address_info['gcs_address'], flush=True); sys.stdin.read(); ray.shutdown()")


@dataclass(frozen=True)
class Scaling:
    """How many replicas, and what each takes of a node: a fixed count, or autoscaling between
    `min_replicas` and `max_replicas` to keep `target_ongoing_requests` in flight per replica."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def bounds(self) -> tuple[int, int]:
        """Autoscaling's replica range: a missing low end is 1, a missing high end the low one."""
        low = self.min_replicas if self.min_replicas is not None else 1
        return low, self.max_replicas if self.max_replicas is not None else low

    def describe(self) -> str:
        if self.autoscaling:
            return "{}..{} replicas (autoscaling)".format(*self.bounds)
        return f"{self.replicas} replica{'s' if self.replicas != 1 else ''}"


@dataclass(frozen=True)
class AppOptions:
    """What the app of every replica is given (`create_app`'s options)."""

    model_name: str = "tformer"
    max_waiting: int = 64
    api_key: str | None = None
    max_body_bytes: int | None = None  # None: `default_body_limit`


@serve.ingress()
class TformerReplica:
    """One replica: an engine process and the app over it."""

    def __init__(self, spec: WorkerSpec, options: AppOptions):
        self.engine = None  # what `__del__` finds when loading fails
        self.engine = EngineProcess(spec)  # loads and warms up before the replica reports ready
        replica = serve.get_replica_context().replica_id.unique_id
        self.tformer_app = create_app(self.engine, options.model_name, options.max_waiting, options.api_key,
                                      replica=replica, max_body_bytes=options.max_body_bytes)  # fmt: skip

    def __serve_build_asgi_app__(self):
        return self.tformer_app

    def check_health(self) -> None:
        """Ray's health check: the engine process runs. Not `/health`'s "draining": Ray would
        replace a draining replica, cutting the streams it is finishing."""
        if not self.engine.alive:
            raise RuntimeError("engine down")

    async def drain(self, grace: float) -> int:
        """This replica's part of a shutdown (`run` broadcasts it to every replica): no new
        requests, `grace` seconds for those in flight, then the rest end with their final events
        (see `Server.drain`); a second call with grace 0 ends them now. Returns how many it aborted."""
        return await self.tformer_app.state.server.drain(grace)

    def __del__(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


def deployment_options(spec: WorkerSpec, options: AppOptions, scaling: Scaling, grace: float = 30.0) -> dict:
    """The deployment's Ray Serve options. A replica takes as many requests as its engine has rows
    and waiting places (beyond that its own 503), so that Ray routes no more to it than it admits."""
    opts: dict[str, Any] = {
        "name": DEPLOYMENT,
        "max_ongoing_requests": spec.max_batch_size + options.max_waiting,
        "ray_actor_options": {"num_cpus": scaling.num_cpus, "num_gpus": scaling.num_gpus},
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        # `run` has the replicas drain first (final events at the end of `grace`); Ray's own wait for them
        # is a backstop, checked often so that a drained replica goes at once.
        "graceful_shutdown_timeout_s": grace + DRAIN_BACKSTOP_S,
        "graceful_shutdown_wait_loop_s": 0.25,
    }
    if scaling.autoscaling:
        low, high = scaling.bounds
        opts["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                      "target_ongoing_requests": scaling.target_ongoing_requests or spec.max_batch_size}
    else:
        opts["num_replicas"] = scaling.replicas
    return opts


def application(spec: WorkerSpec, options: AppOptions, scaling: Scaling, grace: float = 30.0) -> serve.Application:
    return serve.deployment(TformerReplica, **deployment_options(spec, options, scaling, grace)).bind(spec, options)


def app_builder(args: dict) -> serve.Application:
    """The application for Ray's own tools (`serve run`, `serve deploy` of a config file): `args`
    are `WorkerSpec`'s and `AppOptions`' fields by name (`model` required). Replica counts and
    resources come from the config's `deployments` section, which overrides the defaults here."""
    spec_fields, option_fields = ({f.name for f in dataclasses.fields(c)} for c in (WorkerSpec, AppOptions))
    unknown = sorted(set(args) - spec_fields - option_fields)
    if unknown or "model" not in args:
        raise ValueError(f"tformer app args: 'model' is required; unknown: {', '.join(unknown) or 'none'}; "
                         f"known: {', '.join(sorted(spec_fields | option_fields))}")  # fmt: skip
    spec = WorkerSpec(**{k: v for k, v in args.items() if k in spec_fields})
    options = AppOptions(**{k: v for k, v in args.items() if k in option_fields})
    return application(spec, options, Scaling())


def config(spec: WorkerSpec, options: AppOptions, scaling: Scaling, host: str, port: int, grace: float = 30.0) -> dict:
    """The Ray Serve config file (`serve deploy FILE`) that deploys what `run` would."""
    args = {k: v for k, v in {**dataclasses.asdict(spec), **dataclasses.asdict(options)}.items() if v is not None}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args,
                          "deployments": [deployment_options(spec, options, scaling, grace)]}],
    }  # fmt: skip


def run(spec: WorkerSpec, options: AppOptions, scaling: Scaling, host: str, port: int, address: str | None = None,
        grace: float = 30.0, ready=lambda where: None, say=lambda line: None) -> int | None:  # fmt: skip
    """Start a local Ray instance (`LocalRay`), or join the cluster at `address` ("auto",
    "ray://HOST:10001"); deploy; call `ready(where)` once every replica is up (`where`: the
    instance's address, or `address`); serve until SIGTERM or SIGINT; then shut down as plain
    `tformer serve` does (`drain_on_signal`), delete the application (or stop the local
    instance) and return the signal. A replica that cannot load the model fails the deployment
    at once with its own error (`deploy`). `say(line)`: what it tells its operator."""
    local = LocalRay() if address is None else None
    try:
        ray.init(address=local.address if local else address, logging_level="ERROR", log_to_driver=False)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one line of our own says it is up
        signals = Signals()  # after ray.init, which sets a SIGTERM handler of its own
        serve.start(http_options={"host": host, "port": port})
        try:
            deployed = deploy(application(spec, options, scaling, grace), APP_NAME, "/", signals)
        except BaseException:
            if local is None:  # a local instance goes whole below; on a cluster we joined, our application
                serve.delete(APP_NAME)
            raise
        if deployed:
            replicas = serve.get_deployment_handle(DEPLOYMENT, APP_NAME)
            # A first broadcast readies its path (a router that learns the replicas, which took seconds under
            # load): the drain at the signal then starts at once.
            replicas.broadcast("check_health").results(timeout_s=60, return_exceptions=True)
            ready(f"local instance at {local.address}" if local is not None else address)
            drain_on_signal(replicas, grace, signals, say)
        # Drained: what is left is Ray's own stop, which lets the last bytes of each answer through its proxy.
        serve.shutdown() if local is not None else serve.delete(APP_NAME)
        return signals.first
    finally:
        ray.shutdown()
        if local is not None:
            local.stop()


class Signals:
    """SIGTERM and SIGINT, recorded (in the main thread, between its timed waits) rather than
    raised: `first` is the one that stops the server, a second one hurries it."""

    def __init__(self):
        self.received: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda sig, _: self.received.append(sig))

    @property
    def first(self) -> int | None:
        return self.received[0] if self.received else None


def deploy(app: serve.Application, name: str, route_prefix: str, signals: Signals | None = None,
           timeout: float = 600.0) -> bool:  # fmt: skip
    """Deploy `app` and wait until it runs (True), or until a signal comes (False). A replica
    whose constructor raises a `TformerError` (a model that cannot load) fails it at once, with
    that error's own line: Ray would retry a constructor that can never succeed, then point at
    its logs. The caller deletes the application when this raises."""
    serve.run_many([serve.RunTarget(app, name, route_prefix)], wait_for_applications_running=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications[name]
        if status.status == "RUNNING":
            return True
        if signals is not None and signals.first is not None:
            return False
        messages = [status.message] + [d.message for d in status.deployments.values()]
        if load_error := next((m for text in messages if (m := tformer_error(text))), None):
            raise TformerError(load_error)
        if status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise TformerError(f"Ray Serve could not start the replicas ({status.message.splitlines()[0]}); their "
                               "errors are in the replica logs under /tmp/ray/session_latest/logs/serve/")  # fmt: skip
        time.sleep(0.25)
    raise TformerError(f"the replicas were not up within {timeout:.0f} s")


def tformer_error(text: str) -> str | None:
    """The message of a `TformerError` in a Ray error text (its traceback's last line for it)."""
    lines = [line for line in text.splitlines() if line.startswith("tformer.errors.TformerError: ")]
    return lines[-1].split(": ", 1)[1] if lines else None


def drain_on_signal(handle, grace: float, signals: Signals, say) -> None:
    """Wait for SIGTERM or SIGINT; then have every replica (`handle`: the deployment's) drain (no
    new requests, `grace` seconds for those in flight, then final events for the rest; a second
    signal ends them at once) and return once they have."""
    while signals.first is None:
        time.sleep(0.1)  # a timed wait: the handlers run in between
    say(f"tformer serve: {signal.Signals(signals.first).name}: not accepting; requests in flight have {grace:g} s "
        "(--grace) to finish")  # fmt: skip
    aborted: list[int] = []

    def drain(seconds: float) -> None:  # a broadcast runs when its results are asked for
        response = handle.broadcast("drain", seconds)
        results = response.results(timeout_s=seconds + DRAIN_BACKSTOP_S, return_exceptions=True)
        aborted.extend(n for n in results if isinstance(n, int))

    waiting = threading.Thread(target=drain, args=(grace,), daemon=True)
    waiting.start()
    hurried = False
    while waiting.is_alive():
        if len(signals.received) > 1 and not hurried:  # a second signal: end them now
            threading.Thread(target=drain, args=(0.0,), daemon=True).start()
            hurried = True
        waiting.join(0.1)
    if sum(aborted):
        say(f"tformer serve: aborted {sum(aborted)} request(s) still in flight")


class LocalRay:
    """A Ray instance of our own on this machine, for `tformer serve --ray` without an address: a
    small process (`HEAD`) starts it with `ray.init` and stops it with `ray.shutdown` when its
    stdin closes (we are done, or gone: SIGKILLed, it still ends). It runs in a session of its
    own, so that a signal to our process group (Ctrl-C, a service manager's stop) does not kill
    Ray's gcs_server and raylet under a server that is still finishing its streams; `stop` ends it,
    and whatever of its session is left, so that no Ray process of ours outlives us. Token
    authentication, as Ray enables by default for a new local instance: our own `ray` import
    must see RAY_AUTH_MODE=token (the CLI sets it before importing Ray), so that we can join it."""

    def __init__(self, timeout: float = 120.0):
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._log, start_new_session=True, text=True)  # fmt: skip
        self.address = ""
        reading = threading.Thread(target=lambda: setattr(self, "address", self.process.stdout.readline().strip()),
                                   daemon=True)  # fmt: skip
        reading.start()
        try:
            reading.join(timeout)
        except BaseException:  # Ctrl-C while it starts
            self.stop()
            raise
        if not self.address:
            self.stop()
            self._log.seek(0)
            last = ([line for line in self._log.read().decode(errors="replace").splitlines() if line.strip()] or
                    ["no output"])[-1]  # fmt: skip
            raise TformerError(f"could not start a local Ray instance ({last})")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the instance (its own `ray.shutdown`), then kill whatever of its session is left."""
        try:
            self.process.stdin.close()
            self.process.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for pid in session_processes(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.kill()
        self.process.wait()


def session_processes(sid: int) -> list[int]:
    """The processes of session `sid` (from /proc; [] elsewhere)."""
    if not os.path.isdir("/proc"):
        return []
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and (f := proc_stat_fields(int(e))) and int(f[3]) == sid]
