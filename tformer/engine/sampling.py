"""How each request picks its next token: its own temperature, top-k, top-p and seed, applied to
every row of a step in one batched pass on the device (`Sampler`).

A step of greedy rows only (temperature 0) is one argmax. A seeded request draws from its own
generator, the same number of draws per token whatever shares its batch, so it gives the same
tokens alone and in any busy batch: no other request's draws come between its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tformer.errors import TformerError
from tformer.inputs import as_float, as_int, as_stop, as_stop_token_ids


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep only the k most likely tokens (None: all). top_p: keep the smallest set of tokens
    whose probability adds up to top_p (None or 1.0: all). seed: makes sampling reproducible.
    stop: strings that end the completion, cut before the first one (text work: the output
    processor applies them, `tformer.engine.output.Completion`, never the engine). stop_token_ids:
    ids that end the request when generated, as EOS does (the engine applies them; like EOS, such
    an id is not part of the completion). Either takes one value or a sequence.
    The defaults are OpenAI's and vLLM's (temperature 1, no top-k, no top-p), the same for Python
    callers and the server; the CLI's options have their own (`tformer generate --help`).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

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
        set_(self, "stop", tuple(as_stop(self.stop)))  # tuples: the params stay hashable
        set_(self, "stop_token_ids", tuple(as_stop_token_ids(self.stop_token_ids)))


class Sampler:
    """Picks the next token of every row of a step's logits `(B, V)`, row b by `params[b]`, drawing
    from `generators[b]` (a seeded request's own; None: torch's global generator).

    Built once for a batch of requests, on the host, and called on each of its steps (a multi-step
    decode calls it k times): the per-row parameters become device tensors here, not per step.
    One batched pass on the logits' device, whatever the mix of rows: each row's top-k candidates
    (all V for a row without top-k), scaled by its temperature, cut to its top-p, then the
    exponential race (`argmax(p / E)`, E ~ Exp(1) per candidate, picks candidate i with
    probability p_i). A seeded row draws its k noises from its own generator, so it draws the
    same tokens alone and in any batch; the other rows draw theirs from the global generator in
    one call. Greedy rows (temperature 0) take the argmax; a step of greedy rows only is nothing
    else. The ids stay on the device (`(B,)` int64): the caller reads them back once.
    """

    def __init__(self, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                 vocab_size: int, device: torch.device):  # fmt: skip
        self.greedy = all(p.temperature == 0 for p in params)
        if self.greedy:
            return
        self.generators = [(b, g) for b, g in enumerate(generators) if g is not None]
        self.top_k = [min(p.top_k or vocab_size, vocab_size) for p in params]
        self.widest = max(self.top_k)
        self.temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)[:, None]
        self.beyond_k = None  # (B, K) True past each row's own k, where rows differ
        if min(self.top_k) < self.widest:
            self.beyond_k = torch.arange(self.widest, device=device) >= torch.tensor(self.top_k, device=device)[:, None]
        self.top_p = None
        if any(p.top_p is not None and p.top_p < 1 for p in params):
            self.top_p = torch.tensor([p.top_p or 1.0 for p in params], device=device)[:, None]
        self.some_greedy = None
        if any(p.temperature == 0 for p in params):
            self.some_greedy = torch.tensor([p.temperature == 0 for p in params], device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(dim=-1)
        values, order = logits.float().topk(self.widest, dim=-1)  # (B, K), most likely first
        values /= self.temperature
        if self.beyond_k is not None:
            values.masked_fill_(self.beyond_k, float("-inf"))
        probs = values.softmax(dim=-1)
        if self.top_p is not None:
            probs.masked_fill_(probs.cumsum(dim=-1) - probs > self.top_p, 0.0)  # the mass before it covers top_p
        noise = torch.empty_like(probs).exponential_()
        for b, g in self.generators:
            noise[b, : self.top_k[b]].exponential_(generator=g)  # k draws: the row's own, whatever the batch
        picked = order.gather(-1, (probs / noise).argmax(dim=-1, keepdim=True)).squeeze(-1)  # (B,)
        if self.some_greedy is not None:
            picked = torch.where(self.some_greedy, logits.argmax(dim=-1), picked)
        return picked
