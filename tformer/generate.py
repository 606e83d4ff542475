"""The generation loop, written once for every backend.

It owns what is the same whatever runs the model: checking prompts, left-padding a batch of
prompts of different lengths (so that all rows end in the same cache slot and one decode step
serves them all), sampling (greedy, temperature, top-k, top-p, seed) and end-of-sequence. The
backend only runs steps (see `tformer.backends.base`). Text, stop strings and streaming of text are
layered on top in `tformer.runtime`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tformer.backends.base import Backend
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


def check_prompts(prompts: list[list[int]], vocab_size: int, max_len: int, max_new_tokens: int) -> None:
    """Raise TformerError for an empty batch or prompt, an id outside the vocabulary, or a
    prompt that with `max_new_tokens` does not fit the model's context."""
    if not prompts:
        raise TformerError("no prompts given; pass at least one")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise TformerError(f"prompt {i} is empty; give at least one token")
        bad = next((t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise TformerError(f"prompt {i}: token id {bad!r} is outside the vocabulary [0, {vocab_size})")
        if len(prompt) + max_new_tokens > max_len:
            raise TformerError(
                f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                f"model's context of {max_len} tokens: shorten the prompt or lower max_new_tokens"
            )


def generate_tokens(
    backend: Backend, prompts: list[list[int]], params: SamplingParams, eos_id: int | None = None
) -> Iterator[list[int | None]]:
    """An iterator over steps: each gives the new token of every row, None for rows that ended.

    A row ends after it produces `eos_id` (which is yielded) or after `max_new_tokens`. The loop
    stops when every row has ended; a caller that stops early (stop strings) simply stops iterating.
    The prompts are checked here, before the iterator is returned, so errors come at call time.
    """
    check_prompts(prompts, backend.config.vocab_size, backend.config.max_len, params.max_new_tokens)
    return _loop(backend, prompts, params, eos_id)


def _loop(
    backend: Backend, prompts: list[list[int]], params: SamplingParams, eos_id: int | None
) -> Iterator[list[int | None]]:
    B, P, device = len(prompts), max(map(len, prompts)), backend.device
    ids = torch.zeros(B, P, dtype=torch.long)  # left padding with id 0: never attended to
    for b, prompt in enumerate(prompts):
        ids[b, P - len(prompt):] = torch.tensor(prompt)
    start = torch.tensor([P - len(p) for p in prompts], device=device)  # (B,)
    generator = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
    ended = [False] * B
    # Inference mode around each call, not around the loop: a context held across `yield` would
    # leak into the caller's code between steps.
    with torch.inference_mode():
        cache = backend.allocate_cache(B, P + params.max_new_tokens)
        logits = backend.step(ids.to(device), torch.arange(P, device=device), start, cache)[:, -1]  # (B, V)
    for i in range(params.max_new_tokens):
        with torch.inference_mode():
            token = sample(logits, params, generator)  # (B,)
        new = token.tolist()
        yield [None if done else t for done, t in zip(ended, new)]
        ended = [done or t == eos_id for done, t in zip(ended, new)]
        if all(ended) or i + 1 == params.max_new_tokens:
            return
        with torch.inference_mode():
            input_pos = torch.tensor([P + i], device=device)
            logits = backend.step(token[:, None], input_pos, start, cache)[:, -1]
