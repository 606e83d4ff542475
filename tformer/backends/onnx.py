"""onnxruntime: the exported graph as a decode step.

The graph takes past K/V and returns presents one slot longer (see `tformer.export.onnx`). To
keep the cache off numpy and out of fresh allocations, every step runs through IOBinding over
preallocated buffers: per layer and kind, two flat buffers sized for the whole generation; the
past is read from one while onnxruntime writes the present straight into the other, then they
swap. On CUDA the buffers live on the GPU, so the cache never leaves it.

Sessions are built with full graph optimization, and the optimized graph is cached beside
model.onnx (`OptimizedGraph`) so that later loads skip optimizing.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from tformer.backends.base import Traits
from tformer.backends.exported import ExportBackend
from tformer.errors import TformerError, one_line
from tformer.files import atomic_path, file_sha256
from tformer.model import row_positions

T = TypeVar("T")

NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise TformerError("onnxruntime is not installed (pip install 'tformer[onnx]')") from None
    return onnxruntime


class OptimizedGraph:
    """onnxruntime's optimized graph of a model.onnx, stored beside it so that later loads skip
    optimizing. Never an input: `model.<provider>.opt.onnx` plus `model.<provider>.opt.json`,
    which holds the key the graph was built for (model.onnx's SHA-256, onnxruntime's version, the
    provider, the machine) and the graph's own SHA-256. Both files are written atomically; a
    graph that is stale, truncated, flipped or unreadable is rebuilt, never reported."""

    def __init__(self, directory: Path, provider: str, graph_sha256: str):
        ort = _ort()
        tag = provider.removesuffix("ExecutionProvider").lower()
        self.graph = directory / f"model.{tag}.opt.onnx"
        self.record = directory / f"model.{tag}.opt.json"
        self.key = {"graph_sha256": graph_sha256, "onnxruntime": ort.__version__, "provider": provider,
                    "machine": platform.machine()}  # fmt: skip

    def valid(self) -> bool:
        try:
            saved = json.loads(self.record.read_bytes().decode("utf-8"))
            fresh = isinstance(saved, dict) and saved.get("key") == self.key
            return fresh and saved.get("sha256") == file_sha256(self.graph)
        except (OSError, ValueError):
            return False

    def rebuild(self, build: Callable[[str], T]) -> T:
        """`build(path)` must write the optimized graph to `path`; it is hashed there, renamed into
        place, then recorded (a crash in between leaves a record that does not match: rebuilt)."""
        with atomic_path(self.graph) as tmp:
            result = build(tmp)
            digest = file_sha256(tmp)
        with atomic_path(self.record) as tmp:
            Path(tmp).write_text(json.dumps({"key": self.key, "sha256": digest}))
        return result


@dataclass
class OnnxCache:
    """Ping-pong buffers: `current[i]` holds layer i's K (or V) for `length` slots, contiguous."""

    k: list[list[torch.Tensor]]  # k[layer] = [buffer_a, buffer_b], flat
    v: list[list[torch.Tensor]]
    batch: int
    max_len: int
    length: int = 0
    current: int = 0


class OnnxBackend(ExportBackend):
    name = "onnx"
    traits = Traits(export_format="onnx")

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """A CUDA request never falls back to the CPU quietly: without onnxruntime-gpu it is refused."""
        try:
            ort = _ort()
        except TformerError as exc:
            return str(exc)
        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDA provider here: pip install onnxruntime-gpu, or use device='cpu' (CLI: --device cpu)"
        return None

    def _open(self, directory: Path) -> None:
        ort = _ort()
        self.provider = "CUDAExecutionProvider" if self.device.type == "cuda" else "CPUExecutionProvider"
        self.implementation = f"onnxruntime {ort.__version__} ({self.provider})"
        self.session = self._session(ort, directory, self.meta["files"]["model.onnx"])
        if self.session.get_providers()[0] != self.provider:  # onnxruntime falls back to the CPU when CUDA fails
            raise TformerError(
                f"onnxruntime could not start {self.provider} (see its log above); use device='cpu' (CLI: --device cpu)"
            )
        self._ort_device = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)

    def _session(self, ort, directory: Path, graph_sha256: str):
        """A session on the stored optimized graph when it is valid, else on model.onnx with full
        optimization, storing the result (when the directory is writable)."""
        optimized = OptimizedGraph(directory, self.provider, graph_sha256)
        if optimized.valid():
            try:
                return self._new_session(ort, optimized.graph, optimize=False)
            except Exception:  # onnxruntime cannot read it after all: never an input, so rebuild it
                pass
        graph = directory / "model.onnx"
        try:
            return optimized.rebuild(lambda tmp: self._new_session(ort, graph, optimize=True, save_to=tmp))
        except OSError:  # read-only or full directory: run without storing it
            return self._new_session(ort, graph, optimize=True)

    def _new_session(self, ort, graph: Path, optimize: bool, save_to: str | None = None):
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: not the notice that the saved graph is machine-specific
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        if save_to is not None:
            options.optimized_model_filepath = save_to
        try:
            return ort.InferenceSession(str(graph), options, providers=[self.provider])
        except Exception as exc:  # onnxruntime's own exception types
            raise TformerError(
                f"onnxruntime {ort.__version__} cannot load {graph} ({one_line(exc)}); upgrade onnxruntime or re-export it"
            ) from None

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
        # A binding keeps only an address: every bound tensor must stay referenced until the run
        # (a temporary `.contiguous()` copy would be freed and read after).
        ids = input_ids.contiguous()  # (B, S)
        positions = row_positions(input_pos, start).contiguous()  # (B, S)
        mask = (torch.arange(P + S, device=self.device)[None, :] >= start[:, None]).long()  # (B, P + S)
        logits = torch.empty(B, S, c.vocab_size, device=self.device, dtype=self.dtype)
        binding = self.session.io_binding()
        self._bind(binding.bind_input, "input_ids", ids)
        self._bind(binding.bind_input, "position_ids", positions)
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
