"""Which requests run in each engine step: a fixed set of cache rows, first come first served.

The cache has `max_batch_size` rows of `max_len` slots, allocated once. A waiting request is
admitted as soon as a row is free (the lowest free row), and when rows free up with nothing
waiting, the highest busy rows move down into them (`compact`): busy rows stay together, which a
backend reads as one block of the cache. Every step has up to two backend calls:

- a prefill of the admitted requests whose prompt is not all in the cache yet: several requests
  at once, each contributing up to `chunk` tokens (a long prompt is prefilled over several steps),
  within a budget of `chunk * 4` tokens a step so that decoding rows are never held up long;
- a decode of every request whose prompt is in, one token each.

A finished or aborted request gives its row back at once, for the next waiting one. The
static-batching baseline is another policy, `StaticScheduler` (tformer.engine.static), kept out
of this one.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tformer.engine.request import Request, State


@dataclass
class Plan:
    """One step's work: (request, prompt tokens to prefill now) pairs, the requests to decode, and
    (static batching only) the finished requests whose rows still step with them, as padding."""

    prefill: list[tuple[Request, int]]
    decode: list[Request]
    padding: list[Request]


class Scheduler:
    def __init__(self, max_batch_size: int, chunk: int):
        self.chunk = chunk
        self.free_rows = list(range(max_batch_size))  # a heap: the lowest free row first
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted, in admission order

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Plan:
        """Admit waiting requests into free rows, then plan this step's prefill and decode."""
        self.admit()
        budget, prefill = self.chunk * 4, []
        for request in self.running:
            if request.prefilling and budget > 0:
                n = min(len(request.prompt) - request.prefilled, self.chunk, budget)
                prefill.append((request, n))
                budget -= n
        return Plan(prefill, [r for r in self.running if not r.prefilling], [])

    def admit(self) -> None:
        while self.waiting and self.free_rows:
            request = self.waiting.popleft()
            request.row, request.state = heapq.heappop(self.free_rows), State.RUNNING
            self.running.append(request)

    def compact(self, move: Callable[[Request, int], bool]) -> None:
        """Keep the busy rows together: while no request waits (one would take the lowest free row
        anyway) and a free row lies below the highest busy one, move that row's request down, if
        `move(request, row)` (which copies its cache row) can. Rows freed in the middle of a batch
        would otherwise split every later step's rows into pieces, which backends gather."""
        if self.waiting:
            return
        while self.free_rows and self.running:
            request = max(self.running, key=lambda r: r.row)
            row = self.free_rows[0]
            if row > request.row or not move(request, row):
                return
            heapq.heapreplace(self.free_rows, request.row)
            request.row = row

    def finish(self, request: Request, reason: str) -> None:
        """End `request` (running or waiting) and free its row."""
        if request.state is State.WAITING:
            self.waiting.remove(request)
        elif request.state is State.RUNNING:
            self.running.remove(request)
            self.release(request)
        request.state, request.finish_reason = State.FINISHED, reason

    def release(self, request: Request) -> None:
        """Give a finished request's row back."""
        heapq.heappush(self.free_rows, request.row)
        request.row = None
