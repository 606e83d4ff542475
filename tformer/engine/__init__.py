"""Continuous batching: requests join and leave a running batch at every step, each in its own
cache row. `Engine` (request, scheduler, runner, sampling: one concept per module), the one loop
that steps it (`EngineCore`), what its callers talk to (`EngineFront`), and what they get back
(`Output`, `Piece`: the one output processor's, `tformer.engine.output`)."""

from tformer.engine.core import EngineCore
from tformer.engine.engine import Engine
from tformer.engine.front import EngineFront
from tformer.engine.output import Output, Piece
from tformer.engine.request import RequestOutput
from tformer.engine.sampling import SamplingParams

__all__ = ["Engine", "EngineCore", "EngineFront", "Output", "Piece", "RequestOutput", "SamplingParams"]
