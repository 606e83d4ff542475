"""onnxruntime: the exported graph as a decode step.

The graph takes past K/V and returns presents one slot longer (see `tformer.export.onnx`). To
keep the cache off numpy and out of fresh allocations, every step runs through IOBinding over
preallocated buffers: per layer and kind, two flat buffers sized for the whole generation; the
past is read from one while onnxruntime writes the present straight into the other, then they
swap. On CUDA the buffers live on the GPU, so the cache never leaves it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tformer.backends.base import FromExport
from tformer.errors import TformerError
from tformer.model import TransformerLM, row_positions

NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise TformerError("onnxruntime is not installed (pip install 'tformer[onnx]')") from None
    return onnxruntime


@dataclass
class OnnxCache:
    """Ping-pong buffers: `current[i]` holds layer i's K (or V) for `length` slots, contiguous."""

    k: list[list[torch.Tensor]]  # k[layer] = [buffer_a, buffer_b], flat
    v: list[list[torch.Tensor]]
    batch: int
    max_len: int
    length: int = 0
    current: int = 0


class OnnxBackend(FromExport):
    name = "onnx"
    export_format = "tformer-onnx"

    def __init__(self, model: TransformerLM, device: torch.device, dtype: torch.dtype):
        """Export `model` to the cache directory (first use only) and open it."""
        from tformer.export.onnx import cached_export

        _ort()
        self._open(cached_export(model, dtype), device)

    def _open(self, directory: Path, device: torch.device) -> None:
        ort = _ort()
        self._read_export(directory)
        want_cuda = device.type == "cuda"
        provider = "CUDAExecutionProvider" if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers() \
            else "CPUExecutionProvider"  # fmt: skip
        if want_cuda and provider != "CUDAExecutionProvider":
            print("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu); running on the CPU",
                  file=sys.stderr)  # fmt: skip
        self.device = device if provider == "CUDAExecutionProvider" else torch.device("cpu")
        self.provider = provider
        self.attention = f"onnxruntime {ort.__version__} ({provider})"
        options, graph = self._options(ort, directory, provider)
        self.session = ort.InferenceSession(str(graph), options, providers=[provider])
        self._ort_device = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)

    @staticmethod
    def _options(ort, directory: Path, provider: str):
        """Session options and the graph to load: full graph optimization and as many intra-op
        threads as torch uses; the optimized graph is saved beside model.onnx (when writable) and
        loaded as is next time, so a later load need not optimize again."""
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: not the notice that the saved graph is machine-specific
        options.intra_op_num_threads = torch.get_num_threads()
        optimized = directory / f"model.{provider.removesuffix('ExecutionProvider').lower()}.opt.onnx"
        if optimized.is_file():
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            return options, optimized
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if os.access(directory, os.W_OK):
            options.optimized_model_filepath = str(optimized)
        return options, directory / "model.onnx"

    def allocate_cache(self, batch: int, max_len: int) -> OnnxCache:
        c = self.config
        size = batch * c.nhead * max_len * c.head_dim

        def pair() -> list[torch.Tensor]:
            return [torch.zeros(size, device=self.device, dtype=self.dtype) for _ in range(2)]

        return OnnxCache([pair() for _ in range(c.n_layers)], [pair() for _ in range(c.n_layers)], batch, max_len)

    def step(self, input_ids: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor, cache: OnnxCache) -> torch.Tensor:
        c = self.config
        B, S = input_ids.shape
        P = cache.length
        if P + S > cache.max_len:
            raise TformerError(f"cache of {cache.max_len} slots is full")
        positions = row_positions(input_pos, start)  # (B, S)
        mask = (torch.arange(P + S, device=self.device)[None, :] >= start[:, None]).long()  # (B, P + S)
        logits = torch.empty(B, S, c.vocab_size, device=self.device, dtype=self.dtype)
        binding = self.session.io_binding()
        self._bind(binding.bind_input, "input_ids", input_ids.contiguous())
        self._bind(binding.bind_input, "position_ids", positions.contiguous())
        self._bind(binding.bind_input, "attention_mask", mask)
        shape_past = (B, c.nhead, P, c.head_dim)
        shape_present = (B, c.nhead, P + S, c.head_dim)
        src, dst = cache.current, 1 - cache.current
        for i in range(c.n_layers):
            for kind, buffers in (("key", cache.k[i]), ("value", cache.v[i])):
                self._bind(binding.bind_input, f"past.{i}.{kind}", buffers[src], shape_past)
                self._bind(binding.bind_output, f"present.{i}.{kind}", buffers[dst], shape_present)
        self._bind(binding.bind_output, "logits", logits)
        self.session.run_with_iobinding(binding)
        cache.length, cache.current = P + S, dst
        return logits

    def _bind(self, bind, name: str, tensor: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
        """Bind `tensor`'s memory (or its first prod(shape) elements, as `shape`) to `name`."""
        bind(name, *self._ort_device, NUMPY_DTYPES[tensor.dtype], list(shape or tensor.shape), tensor.data_ptr())
