"""Static batching, as HF `generate` and tformer's old loop did it: the baseline that continuous
batching is measured against (`tformer-bench throughput`), as a scheduling policy of its own.

It admits only into an empty batch, and a request that finishes keeps its row in the decode steps
(its tokens discarded) until every request of the batch is done. Rows never move.
"""

from __future__ import annotations

from collections.abc import Callable

from tformer.engine.request import Request
from tformer.engine.scheduler import Plan, Scheduler


class StaticScheduler(Scheduler):
    def __init__(self, max_batch_size: int, chunk: int):
        super().__init__(max_batch_size, chunk)
        self.held: list[Request] = []  # finished, their rows stepping as padding until the batch is done

    def admit(self) -> None:
        if not self.running:
            super().admit()

    def schedule(self) -> Plan:
        plan = super().schedule()
        plan.padding = list(self.held) if plan.decode else []
        return plan

    def compact(self, move: Callable[[Request, int], bool]) -> None:
        return None

    def release(self, request: Request) -> None:
        if request.output:  # it decoded: a padding row until the batch is done
            self.held.append(request)
        else:
            super().release(request)
        if not self.running:  # the batch is done
            for held in self.held:
                super().release(held)
            self.held.clear()
