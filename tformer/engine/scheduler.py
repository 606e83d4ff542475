"""Which requests run in each engine step: a fixed set of cache rows, first come first served.

The cache has `max_batch_size` rows of `max_len` slots, allocated once. A waiting request is
admitted as soon as a row is free (the lowest free row, so that busy rows stay together and a
backend can often read them as one block). Every step has up to two backend calls:

- a prefill of the admitted requests whose prompt is not all in the cache yet: several requests
  at once, each contributing up to `chunk` tokens (a long prompt is prefilled over several steps),
  within a budget of `chunk * 4` tokens a step so that decoding rows are never held up long;
- a decode of every request whose prompt is in, one token each.

A finished or aborted request gives its row back at once, for the next waiting one. With
`static=True` the scheduler admits only into an empty batch, as a static-batching server does:
the baseline that continuous batching is measured against.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from tformer.engine.request import Request, State


@dataclass
class Plan:
    """One step's work: (request, prompt tokens to prefill now) pairs, and the requests to decode."""

    prefill: list[tuple[Request, int]]
    decode: list[Request]


class Scheduler:
    def __init__(self, max_batch_size: int, chunk: int, static: bool = False):
        self.chunk = chunk
        self.static = static
        self.free_rows = list(range(max_batch_size))  # a heap: the lowest free row first
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted, in admission order

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Plan:
        """Admit waiting requests into free rows, then plan this step's prefill and decode."""
        admitting = not (self.static and self.running)
        while admitting and self.waiting and self.free_rows:
            request = self.waiting.popleft()
            request.row, request.state = heapq.heappop(self.free_rows), State.RUNNING
            self.running.append(request)
        budget, prefill = self.chunk * 4, []
        for request in self.running:
            if request.prefilling and budget > 0:
                n = min(len(request.prompt) - request.prefilled, self.chunk, budget)
                prefill.append((request, n))
                budget -= n
        decode = [r for r in self.running if not r.prefilling]
        return Plan(prefill, decode)

    def finish(self, request: Request, reason: str) -> None:
        """End `request` (running or waiting) and free its row."""
        if request.state is State.WAITING:
            self.waiting.remove(request)
        elif request.state is State.RUNNING:
            self.running.remove(request)
            heapq.heappush(self.free_rows, request.row)
            request.row = None
        request.state, request.finish_reason = State.FINISHED, reason
