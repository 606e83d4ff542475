"""Continuous batching: requests join and leave a running batch at every step, each in its own
cache row. `Engine` (request, scheduler, runner, sampling: one concept per module) and its
asynchronous front `AsyncEngine`."""

from tformer.engine.engine import Engine
from tformer.engine.front import AsyncEngine
from tformer.engine.request import RequestOutput
from tformer.engine.sampling import SamplingParams

__all__ = ["AsyncEngine", "Engine", "RequestOutput", "SamplingParams"]
