"""How each request picks its next token: its own temperature, top-k, top-p and seed, applied per
row of one batched step.

Greedy rows (temperature 0) take the argmax, all at once. A sampled row draws from its own
distribution with its own generator when it has a seed, so a seeded request gives the same tokens
alone and in any busy batch: no other request's draws come between its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tformer.errors import TformerError
from tformer.inputs import as_float, as_int


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep only the k most likely tokens (None: all). top_p: keep the smallest set of tokens
    whose probability adds up to top_p (None or 1.0: all). seed: makes sampling reproducible.
    """

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        # Normalised to plain Python values: numpy and torch scalars are welcome (see tformer.inputs).
        set_ = object.__setattr__
        set_(self, "max_new_tokens", as_int("max_new_tokens", self.max_new_tokens, minimum=1))
        what = "a finite number >= 0 (0 = greedy)"
        set_(self, "temperature", as_float("temperature", self.temperature, what))
        if self.temperature < 0:
            raise TformerError(f"temperature must be {what}, got {self.temperature}")
        if self.top_k is not None:
            set_(self, "top_k", as_int("top_k (None = all)", self.top_k, minimum=1))
        if self.top_p is not None:
            set_(self, "top_p", as_float("top_p", self.top_p, "in (0, 1]"))
            if not 0 < self.top_p <= 1:
                raise TformerError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            set_(self, "seed", as_int("seed", self.seed, minimum=0, maximum=2**64 - 1))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token `(B,)` int64 from last-position logits `(B, V)`."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > params.top_p  # mass before a token already covers top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """The next token of each row of `logits` `(B, V)`, row b by `params[b]` with `generators[b]`
    (None: torch's global generator)."""
    tokens = logits.argmax(dim=-1).tolist()  # (B,): the greedy rows' answer, and a placeholder
    for b, (p, g) in enumerate(zip(params, generators)):
        if p.temperature != 0:
            tokens[b] = int(sample(logits[b : b + 1], p, g))
    return tokens
