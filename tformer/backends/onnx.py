"""onnxruntime: the exported graph as a decode step over cache rows.

The graph takes each row's past keys and values and returns only the new tokens' (see
`tformer.export.onnx`), so the cache is the backend's own: a `KVCache` of rows, as eager's. A
step gathers its rows' pasts into one contiguous buffer per layer and kind, runs the graph
through IOBinding with the new keys and values written straight into the same buffer after the
pasts, and scatters those into each row's slots in place: nothing goes through numpy, and on
CUDA the cache never leaves the GPU.

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
from tformer.backends.batch import Batch
from tformer.backends.exported import ExportBackend
from tformer.errors import TformerError, one_line
from tformer.files import atomic_path, file_sha256
from tformer.model import CacheView, KVCache

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
    """The cache rows, plus where a step stages what it binds.

    kv: per layer, keys and values `(R, H, S, Dh)`, as `TransformerLM` keeps them.
    staging_k, staging_v: per layer, one flat buffer of `R * H * S * Dh` elements (one layer's
        cache): a step of B rows, T new columns and a longest past of P holds the gathered pasts
        `(B, H, P, Dh)` in its first part and the graph's new keys or values `(B, H, T, Dh)` right
        after (`P + T <= S` and `B <= R` under the backend contract, so they always fit).
    """

    kv: KVCache
    staging_k: list[torch.Tensor]
    staging_v: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return 2 * self.kv.nbytes  # the staging buffers are as large as the cache itself


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
        # A step runs torch (gathering pasts, scattering new keys and values) between runs: threads
        # that onnxruntime leaves spinning after a run take the cores from torch's (the engine
        # test's 32 requests at d_model 48: 0.34 s without spinning, 1.4-1.9 s with, in
        # interleaved rounds on a busy 2-core CPU; not measured on an idle one).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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

    def allocate_cache(self, rows: int, slots: int) -> OnnxCache:
        kv = KVCache.allocate(self.config, rows, slots, self.device, self.dtype)
        size = kv.k[0].numel()

        def staging() -> list[torch.Tensor]:
            return [torch.empty(size, device=self.device, dtype=self.dtype) for _ in range(self.config.n_layers)]

        return OnnxCache(kv, staging(), staging())

    def move_row(self, cache: OnnxCache, src: int, dst: int, length: int) -> bool:
        cache.kv.move_row(src, dst, length)
        return True

    def step(self, batch: Batch, cache: OnnxCache) -> torch.Tensor:
        c = self.config
        B, T = batch.size, batch.width
        start, lengths, rows = batch.start, batch.lengths, batch.rows
        P = batch.past  # the longest past: shorter ones are masked beyond their length
        cols = torch.arange(T, device=self.device)
        slots = start[:, None] + cols  # (B, T) where each new column goes
        # A binding keeps only an address: every bound tensor must stay referenced until the run.
        ids = batch.input_ids  # (B, T), contiguous
        positions = slots.clamp(max=c.max_len - 1)  # (B, T): a padding column may run past the context
        past_valid = torch.arange(P, device=self.device) < start[:, None]  # (B, P)
        mask = torch.cat([past_valid, cols < (lengths - start)[:, None]], dim=1).long()  # (B, P + T)
        last = lengths - start - 1  # (B,)
        logits = torch.empty(B, c.vocab_size, device=self.device, dtype=self.dtype)
        binding = self.session.io_binding()
        for name, tensor in (("input_ids", ids), ("position_ids", positions), ("attention_mask", mask),
                             ("last_index", last)):  # fmt: skip
            self._bind(binding.bind_input, name, tensor)
        self._bind(binding.bind_output, "logits", logits)
        past_size, new_size = B * c.nhead * P * c.head_dim, B * c.nhead * T * c.head_dim
        new = []  # per layer, keys then values: the graph's new ones (B, H, T, Dh)
        for i in range(c.n_layers):
            for kind, layer, staging in (("key", cache.kv.k[i], cache.staging_k[i]),
                                         ("value", cache.kv.v[i], cache.staging_v[i])):  # fmt: skip
                past = staging[:past_size].view(B, c.nhead, P, c.head_dim)
                torch.index_select(layer[:, :, :P], 0, rows, out=past)
                new.append(staging[past_size : past_size + new_size].view(B, c.nhead, T, c.head_dim))
                self._bind(binding.bind_input, f"past.{i}.{kind}", past)
                self._bind(binding.bind_output, f"new.{i}.{kind}", new[-1])
        self.session.run_with_iobinding(binding)
        # Into each row's slots, as the eager model writes its cache (padding columns too: the
        # contract leaves room for them).
        view = CacheView(cache.kv, rows, slots, P + T, batch.block, batch.aligned)
        for i in range(c.n_layers):
            view.update(i, new[2 * i], new[2 * i + 1])
        return logits

    def _bind(self, bind, name: str, tensor: torch.Tensor) -> None:
        """Bind the memory of `tensor` (contiguous) to `name`, as its shape."""
        bind(name, *self._ort_device, NUMPY_DTYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
