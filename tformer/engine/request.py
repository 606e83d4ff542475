"""A request: one prompt being served, from waiting to finished.

It carries everything that decides its tokens (prompt ids, sampling parameters and generator,
EOS id, stop token ids) and where it stands: its state, its cache row once admitted, how
much of its prompt is in the cache, the tokens generated so far, and why it finished.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from tformer.engine.sampling import SamplingParams
from tformer.errors import TformerError


class State(enum.Enum):
    WAITING = "waiting"  # queued for a free cache row
    RUNNING = "running"  # owns a row: prefilling its prompt, then decoding
    FINISHED = "finished"


FINISH_REASONS = ("eos", "length", "stop", "abort", "error")


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request: its new token (None when it produced none:
    an abort or an error), why it finished, if it did (`eos`, `length`, `stop`, `abort`, `error`),
    and for `error` what went wrong (the backend raised during a step this request was in)."""

    request_id: Hashable
    token: int | None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    id: Hashable  # the caller's own
    prompt: list[int]
    params: SamplingParams
    eos_id: int | None = None  # None: no EOS stops it
    generator: torch.Generator | None = None  # its own when seeded, else torch's global one
    state: State = State.WAITING
    finish_reason: str | None = None
    row: int | None = None  # its cache row while running
    prefilled: int = 0  # prompt tokens already in its cache row
    prefilling: bool = True  # prefilled < len(prompt), kept by `prefill` (read for every row of every step)
    output: list[int] = field(default_factory=list)  # generated tokens (EOS and stop tokens included)
    arrived: float = field(default_factory=time.perf_counter)
    stop_ids: frozenset[int] = field(init=False)  # params.stop_token_ids, a set once: `finish_after` runs per token

    def __post_init__(self) -> None:
        self.stop_ids = frozenset(self.params.stop_token_ids)

    def prefill(self, n: int) -> None:
        """`n` more prompt tokens are in its cache row."""
        self.prefilled += n
        self.prefilling = self.prefilled < len(self.prompt)

    @property
    def cached(self) -> int:
        """Tokens in its cache row: the prompt so far, then every output token but the newest (which
        the next decode step feeds)."""
        return self.prefilled if self.prefilling else self.prefilled + len(self.output) - 1

    def finish_after(self, token: int) -> str | None:
        """Record `token` as generated; the finish reason it causes, if any."""
        self.output.append(token)
        if self.eos_id is not None and token == self.eos_id:
            return "eos"
        if token in self.stop_ids:
            return "stop"
        if len(self.output) >= self.params.max_new_tokens:
            return "length"
        return None


def check_prompt(
    prompt: list[int], max_new_tokens: int, vocab_size: int, max_len: int, label: str = "the prompt",
    limit: str = "the model's context", fix: str = "shorten the prompt or lower max_new_tokens",
) -> None:  # fmt: skip
    """Raise TformerError, naming `label`, for an empty prompt, an id outside the vocabulary, or a
    prompt that with `max_new_tokens` can never fit in `max_len` tokens (`limit` says whose)."""
    if not prompt:
        raise TformerError(f"{label} is empty; give at least one token")
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise TformerError(f"{label}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    if len(prompt) + max_new_tokens > max_len:
        raise TformerError(
            f"{label} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that exceeds {limit} of "
            f"{max_len} tokens: {fix}"
        )
