"""torch.compile over the engine's static cache of rows: the gpt-fast recipe as a backend.

The engine allocates the cache once; this backend gives it one more row, the scratch row (the
last), which pads a step to a fixed batch size. Two functions are compiled, both `fullgraph=True`
around `TransformerLM.step`:

- decode, one new token per row, at a fixed set of batch sizes, the buckets (1, 2, 4, ... below
  the cache's rows, and its rows): B rows run in the smallest bucket >= B, the extra rows pointing
  at the scratch row (start 0, length 1, id 0). One graph per bucket, so requests joining and
  leaving never change a shape. A prefill step of one token per row (a one-token prompt, a last
  chunk of one token) has the same shapes and runs here too.
- prefill, more than one token per row: batch and width dynamic in one graph; a batch of 1 gets a
  scratch row as its second (dynamo would specialize a size of 1 into a graph of its own).

Each graph is compiled on first need, or all of them by `warmup` (which `Engine.warmup` and
`Runtime.warmup` call), from example inputs whose dynamic sizes are all different and none is 1,
so what a graph assumes never depends on whichever request came first. After `warmup` no step
over that cache compiles anything.

On the CPU a step of a small model is bound by per-call overhead, weight streaming and K/V reads:
weights are column-major (`column_major_weights`), inductor writes a C++ wrapper, every graph is
compiled ahead of time (`aot_compile`: no dynamo frame evaluation per call), and steps attend over
the filled slots only (views of the first `max(start) + T` slots, a size dynamic in every graph),
as eager does: reading the whole cache made compile slower than eager at batch 8, where K/V reads
outweigh the weights (docs/benchmarks/2026-11-25-compile-batch8-cpu-2core.md). On CUDA the decode
buckets run as CUDA graphs (`mode="reduce-overhead"`) over the whole cache at fixed shapes, its
buffers marked once, at allocation, as static addresses. Compiled artifacts go to inductor's own
store ($TORCHINDUCTOR_CACHE_DIR, which the tformer commands point into tformer's store), so a
second process reuses them; the library leaves the environment alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._dynamo.utils import counters

from tformer.backends.base import BackendBase, Traits
from tformer.backends.batch import Batch
from tformer.model import KVCache, TransformerLM, column_major_weights

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]


def buckets(rows: int) -> list[int]:
    """The decode batch sizes for a cache of `rows` rows: the powers of two below it, and `rows`."""
    return [1 << i for i in range((rows - 1).bit_length())] + [rows]


class CompileBackend(BackendBase):
    name = "compile"
    traits = Traits(compiles=True)

    def __init__(self, model: TransformerLM, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self._cuda = device.type == "cuda"
        self.implementation = "torch.compile, inductor" + (" + CUDA graphs" if self._cuda else " C++, C++ wrapper")
        # On the CPU a decode step is bound by per-call overhead and weight streaming. Measured at
        # d_model 256 on the 2-core CI CPU (ms/step, eager 3.4): default inductor 3.3; column-major
        # weights (see eager) 2.9; plus `cpp_wrapper` (the graph's launcher in C++, not Python) 2.5;
        # `freezing` instead 2.7-2.9 and it bypasses the FX graph cache. CUDA graphs do both jobs on a GPU.
        options = None if self._cuda else {"cpp_wrapper": True}
        if not self._cuda:
            column_major_weights(self.model)
        model = self.model

        def decode(input_ids, start, lengths, rows, k: list[torch.Tensor], v: list[torch.Tensor]) -> torch.Tensor:
            return model.step(input_ids, start, lengths, rows, KVCache(k, v))  # a function: aot_compile binds no `self`

        def prefill(input_ids, start, lengths, rows, k: list[torch.Tensor], v: list[torch.Tensor]) -> torch.Tensor:
            return decode(input_ids, start, lengths, rows, k, v)  # a code object of its own: dynamo keeps graphs per code

        self._decode = torch.compile(decode, fullgraph=True, dynamic=False, options=options,
                                     mode="reduce-overhead" if self._cuda else None)  # fmt: skip
        self._prefill = torch.compile(prefill, fullgraph=True, dynamic=False, options=options)
        # CPU: each graph compiled ahead of time, called without dynamo's per-call frame evaluation
        # (2.63 -> 2.34 ms/step at d_model 256; the compiled function still checks its own guards,
        # about 12-15 us a call, and raises on inputs they reject instead of recompiling).
        self._ahead = not self._cuda and hasattr(self._decode, "aot_compile")  # torch >= 2.10
        self._graphs: dict[tuple, Callable[..., torch.Tensor]] = {}  # by bucket (or "prefill") and cache

    def allocate_cache(self, rows: int, slots: int) -> KVCache:
        """`rows` rows and the scratch row. On the CPU, one slot more than asked: an attended span
        (see `_inputs`) is then never the whole, contiguous buffer, which the graphs' guards would tell
        apart from a strided view. On CUDA, buffers marked as static addresses for CUDA graphs."""
        cache = KVCache.allocate(self.config, rows + 1, slots + (not self._cuda), self.device, self.dtype)
        if self._cuda:
            for t in cache.k + cache.v:
                torch._dynamo.mark_static_address(t)
        return cache

    def warmup(self, cache: KVCache) -> None:
        """Compile every decode bucket and the prefill graph for `cache` (on CUDA, record the CUDA graphs)."""
        for size in buckets(cache.rows - 1):
            self._graph(size, cache)
        self._graph(None, cache)

    def step(self, batch: Batch, cache: KVCache) -> torch.Tensor:
        B = batch.size
        size = next(b for b in buckets(cache.rows - 1) if b >= B) if batch.decode else None
        graph = self._graph(size, cache)
        span = max(batch.past + batch.width, 2)  # the attended slots: every row's, padding columns included
        with torch.inference_mode():  # what the graphs were compiled under (they guard on it)
            inputs = self._inputs(cache, size or max(B, 2), batch.input_ids, batch.start, batch.lengths, batch.rows, span)
            if not (self._cuda and size):
                return graph(*inputs)[:B]
            skips = counters["inductor"]["cudagraph_skips"]
            logits = graph(*inputs)[:B].clone()  # a replay overwrites the previous call's outputs
        if counters["inductor"]["cudagraph_skips"] != skips:  # inductor logged why, as a warning
            self.notes = ("CUDA graphs SKIPPED: decode ran without them (see inductor's warning)",)
        return logits

    def _inputs(
        self, cache: KVCache, size: int, input_ids: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor,
        rows: torch.Tensor, span: int,
    ) -> Inputs:  # fmt: skip
        """The compiled functions' inputs: the batch padded to `size` rows pointing at the scratch
        row (start 0, length 1, id 0), all fresh contiguous tensors (a sliced view has other
        strides, which the guards reject); the cache's buffers on CUDA, on the CPU views of their
        first `span` slots (at least 2: dynamo specializes a size of 1)."""
        pad = size - len(rows)

        def padded(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.cat([t, t.new_full((pad, *t.shape[1:]), value)])

        start = padded(start, 0)
        inputs = (padded(input_ids, 0), start, padded(lengths, 1), padded(rows, cache.rows - 1))
        if self._cuda:
            return (*inputs, cache.k, cache.v)
        return (*inputs, [t[:, :, :span] for t in cache.k], [t[:, :, :span] for t in cache.v])

    def _graph(self, size: int | None, cache: KVCache) -> Callable[..., torch.Tensor]:
        """The compiled step over `cache` for decode bucket `size`, or for prefill (`size` None),
        compiled now if it has not been. The example inputs are all scratch rows: a decode of
        `size` rows over 2 slots; a prefill of 2 rows, 3 columns, over 5 slots (different sizes:
        dynamo would take equal ones for one and the same size)."""
        key = (size or "prefill", cache.rows, cache.slots, cache.k[0].is_inference())  # what the guards check
        if key in self._graphs:
            return self._graphs[key]
        width, span, fn = (1, 2, self._decode) if size else (3, 5, self._prefill)
        graph = None
        with torch.inference_mode():  # as `step` runs them: the graphs guard on the grad mode and tensor kinds
            none = torch.zeros(0, dtype=torch.long, device=self.device)
            example = self._inputs(cache, size or 2, none.view(0, width), none, none, none, span)
            _mark_dynamic(example, prefill=size is None, cuda=self._cuda)
            if self._ahead:
                try:
                    graph = fn.aot_compile((example, {}))
                except Exception:  # an experimental API: where this torch's differs, the guarded call serves
                    self._ahead = False
            if graph is None:
                # Every bucket is a graph of the one decode function: allow as many as this backend makes.
                limit = max(torch._dynamo.config.recompile_limit, len(self._graphs) + 1)
                with torch._dynamo.config.patch(recompile_limit=limit):
                    for _ in range(3 if self._cuda and size else 1):  # CUDA graphs are recorded on a later call
                        fn(*example)
                graph = fn
        self._graphs[key] = graph
        return graph


def _mark_dynamic(inputs: Inputs, prefill: bool, cuda: bool) -> None:
    """Mark what varies from step to step as dynamic before compiling: a prefill's batch and width;
    on the CPU the attended span (dim 2 of every K/V view). Decode graphs are otherwise static."""
    input_ids, start, lengths, rows, k, v = inputs
    if prefill:
        for t, dim in ((input_ids, 0), (input_ids, 1), (start, 0), (lengths, 0), (rows, 0)):
            torch._dynamo.mark_dynamic(t, dim)
    if not cuda:
        for t in k + v:
            torch._dynamo.mark_dynamic(t, 2)
