"""torch.compile over a static KV cache: the gpt-fast recipe as a backend.

Decode (one token per row) is compiled with `fullgraph=True`, one graph per batch size: the cache
is allocated at one fixed length for every generation (`cache_len`, grown only when a request
needs more), and the position arrives as a tensor. On CUDA the step attends over the whole cache
(fixed shapes, as CUDA graphs need: `mode="reduce-overhead"`). On the CPU it attends over the
filled slots only, as eager does, with that length dynamic in the graph: reading the whole cache
made compile slower than eager at batch 8, where K/V reads outweigh the weights
(docs/benchmarks/2026-11-25-compile-batch8-cpu-2core.md). Prefill is compiled with a dynamic
sequence length. Compiled artifacts go to inductor's own store ($TORCHINDUCTOR_CACHE_DIR, which
the tformer commands point into tformer's store), so a second process reuses them; the library
leaves the environment alone.
"""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from tformer.backends.base import BackendBase, Traits
from tformer.model import KVCache, TransformerLM, column_major_weights


class CompileBackend(BackendBase):
    name = "compile"
    traits = Traits(compiles=True)

    def __init__(self, model: TransformerLM, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.cache_len = 0
        cuda = device.type == "cuda"
        self.implementation = "torch.compile, inductor" + (" + CUDA graphs" if cuda else " C++, C++ wrapper")
        # On the CPU a decode step is bound by per-call overhead and weight streaming. Measured at
        # d_model 256 on the 2-core CI CPU (ms/step, eager 3.4): default inductor 3.3; column-major
        # weights (see eager) 2.9; plus `cpp_wrapper` (the graph's launcher in C++, not Python) 2.5;
        # `freezing` instead 2.7-2.9 and it bypasses the FX graph cache. CUDA graphs do both jobs on a GPU.
        options = None if cuda else {"cpp_wrapper": True}
        if not cuda:
            column_major_weights(self.model)
        model = self.model

        def forward(input_ids, input_pos, start, k: list[torch.Tensor], v: list[torch.Tensor]) -> torch.Tensor:
            return model(input_ids, input_pos, start, KVCache(k, v))  # a function: aot_compile binds no `self`

        self._decode = torch.compile(forward, fullgraph=True, dynamic=False, options=options,
                                     mode="reduce-overhead" if cuda else None)  # fmt: skip
        self._prefill = torch.compile(forward, fullgraph=True, dynamic=True, options=options)
        # CPU decode: one ahead-of-time compiled step per (batch, cache length), called without
        # dynamo's per-call frame evaluation (2.63 -> 2.34 ms/step at d_model 256; the compiled
        # function still checks its own guards, about 12-15 us a call).
        # A call with other shapes raises instead of recompiling.
        self._decoders: dict[tuple[int, int], object] = {}
        self._ahead = not cuda and hasattr(self._decode, "aot_compile")  # torch >= 2.10

    def allocate_cache(self, batch: int, max_len: int) -> KVCache:
        """`cache_len` slots whatever the request (one decode graph per batch size): set by the first
        request (or `Runtime.warmup`) rounded up to a multiple of 64, grown only when one needs more."""
        if max_len > self.cache_len:
            self.cache_len = min(-(-max_len // 64) * 64, self.config.max_len)
        if self.device.type == "cpu":
            # Views of buffers one slot longer: an attended prefix (see `step`) is then never the whole,
            # contiguous buffer, which the CPU graphs' guards tell apart from a strided view.
            return KVCache.allocate(self.config, batch, self.cache_len + 1, self.device, self.dtype).prefix(self.cache_len)
        cache = KVCache.allocate(self.config, batch, self.cache_len, self.device, self.dtype)
        for t in cache.k + cache.v:  # a cache mutated in place must be static for CUDA graphs
            torch._dynamo.mark_static_address(t)
        return cache

    def step(self, input_ids: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # A sliced (B, 1) view has other strides than a fresh tensor and would recompile.
        input_ids = input_ids.clone(memory_format=torch.contiguous_format)
        if self.device.type == "cuda":
            return self._cuda_step(input_ids, input_pos, start, cache)
        # The filled slots only (a host-side length, as in eager); at least 2, because dynamo
        # specializes a length of 1 (a one-token prompt's first step) into a graph of its own.
        attended = cache.prefix(max(int(input_pos[-1]) + 1, 2))
        args = (input_ids, input_pos, start, attended.k, attended.v)
        if input_ids.shape[1] > 1:
            return self._prefill(*args)
        if not self._ahead:
            return self._decode(*_dynamic_length(args))
        key = (input_ids.shape[0], cache.max_len)
        if key not in self._decoders:
            try:
                self._decoders[key] = self._decode.aot_compile((_dynamic_length(args), {}))
            except Exception:  # an experimental API: where this torch's differs, the guarded call serves
                self._ahead = False
                return self._decode(*_dynamic_length(args))
        return self._decoders[key](*args)

    def _cuda_step(self, input_ids: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor, cache: KVCache) -> torch.Tensor:
        args = (input_ids, input_pos, start, cache.k, cache.v)
        if input_ids.shape[1] > 1:
            return self._prefill(*args)
        skips = counters["inductor"]["cudagraph_skips"]
        logits = self._decode(*args).clone()  # a replay overwrites the previous call's outputs
        if counters["inductor"]["cudagraph_skips"] != skips:  # inductor logged why, as a warning
            self.notes = ("CUDA graphs SKIPPED: decode ran without them (see inductor's warning)",)
        return logits


def _dynamic_length(args: tuple) -> tuple:
    """`args` with the attended length (dim 2 of every K/V view) marked dynamic, so that the decode
    graph (compiled with `dynamic=False`) serves every length instead of recompiling per step."""
    for t in args[3] + args[4]:
        torch._dynamo.mark_dynamic(t, 2)
    return args
