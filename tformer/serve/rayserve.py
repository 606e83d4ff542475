"""`tformer serve --ray`: the same app on Ray Serve, one engine per replica, replicas on many machines.

Each replica is a Ray actor that starts its own engine process (`EngineProcess`, exactly as `tformer
serve` does) and serves `create_app` over it through `@serve.ingress`: the routes, errors, metrics
and streaming are the ones plain `tformer serve` runs under uvicorn, not a fork of them. Ray
Serve's proxy routes each HTTP request to a replica and streams its answer back; Ray restarts a
replica whose process dies or whose health check (`check_health`: the engine process is alive and
the app not draining) fails, and scales the replica count between bounds by the requests in flight.
Each completion says which replica answered (`x-tformer-replica`).

Deployed two ways: `tformer serve MODEL --ray` (`run`: starts or joins a Ray cluster, deploys,
serves until SIGTERM or Ctrl-C), or Ray's own tools with the config that `--print-config` writes
(`config`), whose `import_path` is `app_builder`.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from tformer.errors import TformerError, one_line
from tformer.serve.app import create_app
from tformer.serve.worker import EngineProcess, WorkerSpec

APP_NAME = "tformer"
DEPLOYMENT = "TformerReplica"
IMPORT_PATH = "tformer.serve.rayserve:app_builder"


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


@serve.ingress()
class TformerReplica:
    """One replica: an engine process and the app over it."""

    def __init__(self, spec: WorkerSpec, options: AppOptions):
        self.engine = EngineProcess(spec)  # loads and warms up before the replica reports ready
        replica = serve.get_replica_context().replica_id.unique_id
        self.tformer_app = create_app(self.engine, options.model_name, options.max_waiting, options.api_key,
                                      replica=replica)  # fmt: skip

    def __serve_build_asgi_app__(self):
        return self.tformer_app

    def check_health(self) -> None:
        """Ray's health check: what `/health` answers (a dead engine fails it)."""
        if (trouble := self.tformer_app.state.server.trouble()) is not None:
            raise RuntimeError(trouble)

    def __del__(self) -> None:
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
        "graceful_shutdown_timeout_s": grace,
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
        grace: float = 30.0, ready=lambda: None) -> None:  # fmt: skip
    """Start a local Ray instance (or join the cluster at `address`: "auto", "ray://HOST:10001"),
    deploy, call `ready()` once every replica is up, serve until SIGTERM or Ctrl-C, then delete
    the application (and stop the local instance)."""
    ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one line of our own says it is up
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(application(spec, options, scaling, grace), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # replicas that fail to start: Ray gives up after a few tries
            raise TformerError(f"Ray Serve could not start the replicas ({one_line(exc).splitlines()[0]}); their "
                               "errors are in the replica logs under /tmp/ray/session_latest/logs/serve/") from None
        ready()
        while not stop.wait(0.5):  # a timed wait: the signal handlers run in between
            pass
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()  # a local instance ends with it
