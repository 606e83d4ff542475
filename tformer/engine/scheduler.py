"""Which requests run in each engine step: a fixed set of cache rows, first come first served.

The cache has `max_batch_size` rows of `max_len` slots, allocated once. A waiting request is
admitted as soon as a row is free (the lowest free row), and when rows free up with nothing
waiting, the highest busy rows move down into them (`compact`): busy rows stay together, which a
backend reads as one block of the cache. Every step has up to two backend calls:

- a prefill of the admitted requests whose prompt is not all in the cache yet: several requests
  at once, each contributing up to `chunk` tokens (a long prompt is prefilled over several steps),
  within a budget of `chunk * 4` tokens a step so that decoding rows are never held up long;
- a decode of every request whose prompt is in, one token each.

A finished or aborted request gives its row back at once, for the next waiting one. With
`static=True` the scheduler batches statically instead, as HF `generate` and tformer's old loop
did: it admits only into an empty batch, and a request that finishes keeps its row in the decode
steps (its tokens discarded) until every request of the batch is done. That is the baseline that
continuous batching is measured against (`tformer-bench throughput`).
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
    def __init__(self, max_batch_size: int, chunk: int, static: bool = False):
        self.chunk = chunk
        self.static = static
        self.free_rows = list(range(max_batch_size))  # a heap: the lowest free row first
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted, in admission order
        self.held: list[Request] = []  # static: finished, their rows stepping until the batch is done

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
        return Plan(prefill, decode, list(self.held) if decode else [])

    def compact(self, move: Callable[[Request, int], bool]) -> None:
        """Keep the busy rows together: while no request waits (one would take the lowest free row
        anyway) and a free row lies below the highest busy one, move that row's request down, if
        `move(request, row)` (which copies its cache row) can. Rows freed in the middle of a batch
        would otherwise split every later step's rows into pieces, which backends gather."""
        if self.static or self.waiting:
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
            if self.static and request.output:  # a padding row until the batch is done
                self.held.append(request)
            else:
                self._free(request)
            if not self.running:  # the static batch is done
                for held in self.held:
                    self._free(held)
                self.held.clear()
        request.state, request.finish_reason = State.FINISHED, reason

    def _free(self, request: Request) -> None:
        heapq.heappush(self.free_rows, request.row)
        request.row = None
