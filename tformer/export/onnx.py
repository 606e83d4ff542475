"""The ONNX format's own part of an export: one graph for prefill and decode over rows of
different lengths, so that one call serves a continuous batch.

The graph's inputs and outputs are the public contract that apps in any language code against
(also written to `tformer.json` and the table in docs/export.md, which says exactly what each holds):

    input_ids        int64  [batch, seq]            new tokens, right-padded
    position_ids     int64  [batch, seq]            position of each new token in its own row
    attention_mask   int64  [batch, past + seq]     1 = attend: the row's past slots, then its real new tokens
    last_index       int64  [batch]                 column of each row's last real new token
    past.{i}.key     dtype  [batch, heads, past, head_dim]   (and past.{i}.value), i = layer;
                                                    each row's past left-aligned, past = the longest
    -> logits        dtype  [batch, vocab]          of each row's last real new token
    -> new.{i}.key / new.{i}.value  [batch, heads, seq, head_dim]   the new tokens' keys and values

The caller keeps the cache: it appends each row's real columns of `new.*` to that row's keys and
values and feeds them back as its past at the next step. A new token attends to the past
columns its mask marks and to the marked new columns at or before its own, so rows of any
lengths (a prefill chunk beside decodes) share one call. It is exported with the
`torch.export`-based exporter (`dynamo=True`), so batch, seq and past stay symbolic (the
TorchScript exporter bakes lengths into reshapes). The graph carries the fields that decide how it
runs in its `metadata_props` (`tformer.config`, ...), which the loader compares with
`tformer.json` (see `tformer.export.integrity`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from tformer.config import ModelConfig
from tformer.errors import TformerError, one_line
from tformer.export.integrity import FIX, check_embedded
from tformer.export.writer import Step
from tformer.inputs import as_int
from tformer.model import TransformerLM, attention_bias

DEFAULT_OPSET = 18
# Opsets that export and validate here (torch 2.13, onnxruntime 1.32). Below 17 the exporter
# quietly emits 18 (or fails in onnx's version converter); 26 fails to export. At 23 and 24 the
# graph uses ONNX's Attention op: it failed validation on format 2's left-padded batches (max abs
# logit difference 2.6) and passes it on this format's right-padded rows, but is untried on CUDA
# and under the engine, so the range stays 17-22, refused outside up front.
OPSETS = range(17, 23)


def input_names(n_layers: int) -> list[str]:
    return ["input_ids", "position_ids", "attention_mask", "last_index"] + [
        f"past.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")
    ]


def output_names(n_layers: int) -> list[str]:
    return ["logits"] + [f"new.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


class PastAndNew:
    """The cache as the ONNX contract has it: each layer attends over its past input followed by
    the new keys and values (a Concat in the graph), and only the new ones leave the graph, so
    that the caller's cache is written in place rather than copied whole every step."""

    def __init__(self, past: tuple[tuple[torch.Tensor, torch.Tensor], ...]):
        self.past = past  # per layer, key and value (B, H, P, Dh)
        self.new: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, key and value (B, H, T, Dh)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new.append((k, v))
        past_k, past_v = self.past[layer]
        return torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, H, P + T, Dh)


class OnnxStep(Step):
    """`TransformerLM` with the contract's inputs and outputs: the module that is exported."""

    def forward(self, input_ids, position_ids, attention_mask, last_index, past):
        T = input_ids.shape[1]
        P = past[0][0].shape[2]
        query_pos = torch.arange(T, device=input_ids.device) + P  # (T,) column of each new token among the keys
        key_pos = torch.arange(attention_mask.shape[1], device=input_ids.device)  # (P + T,)
        bias = attention_bias(query_pos, key_pos, attention_mask.bool(), self.model.decoder.weight.dtype)
        cache = PastAndNew(past)
        logits = self.model.run(input_ids, position_ids, bias, cache, last=last_index)  # (B, V)
        return logits, tuple(cache.new)


def example_inputs(model: TransformerLM):
    """Inputs of the contract to trace with: batch 2, 3 new tokens, a past of 4 (distinct sizes,
    none 0 or 1, which a tracer may specialize or unify)."""
    c, dtype = model.config, model.decoder.weight.dtype
    B, T, P = 2, 3, 4

    def past() -> torch.Tensor:  # a fresh tensor each: inputs that alias one tensor are traced as one
        return torch.zeros(B, c.nhead, P, c.head_dim, dtype=dtype)

    ids = torch.zeros(B, T, dtype=torch.long)
    positions = torch.arange(P, P + T).expand(B, T).contiguous()
    mask = torch.ones(B, P + T, dtype=torch.long)
    last = torch.full((B,), T - 1, dtype=torch.long)
    return ids, positions, mask, last, tuple((past(), past()) for _ in range(c.n_layers))


def write_artifact(model: TransformerLM, path: Path, embedded: dict[str, str], log, opset: int = DEFAULT_OPSET) -> dict:
    """Trace `model` (CPU, in its dtype) into `path` with `embedded` in its `metadata_props`, and
    check it with `onnx.checker`; returns the format's own tformer.json fields."""
    import onnx  # the exporter needs onnx and onnxscript: fail early and clearly

    opset = as_int("opset", opset)
    if opset not in OPSETS:
        raise TformerError(f"opset {opset} is not supported; use {OPSETS.start} to {OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    log(f"exporting with torch.onnx.export(dynamo=True), opset {opset}, {str(model.decoder.weight.dtype).removeprefix('torch.')}")
    _export(model, path, opset, embedded)
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx's ValidationError and friends
        raise TformerError(f"the exported graph fails onnx.checker ({one_line(exc)})") from None
    return {"opset": opset, "exporter": "torch.onnx.export(dynamo=True)", "versions": _versions()}


def validation_checks(path: Path) -> dict:
    """What validation reports about the graph beyond comparing logits (it passed onnx.checker
    when it was written, and its hash has been verified since)."""
    return {"checker": "ok"}


def _export(model: TransformerLM, path: Path, opset: int, metadata: dict[str, str]) -> None:
    from torch.export import Dim

    c = model.config
    batch, seq, past, total = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},  # past + seq: its own Dim (a derived one is refused)
        "last_index": {0: batch},
        "past": tuple(({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(c.n_layers)),
    }
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)  # the exporter's notes (axis renames, torchvision ops) are noise here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                OnnxStep(model).eval(), example_inputs(model), dynamo=True, dynamic_shapes=dynamic,
                input_names=input_names(c.n_layers), output_names=output_names(c.n_layers), opset_version=opset,
                verbose=False,
            )  # fmt: skip
            program.model.metadata_props.update(metadata)
            program.save(path)
    except Exception as exc:  # the exporter raises many types; report one line
        raise TformerError(f"ONNX export failed: {one_line(exc)}") from exc
    finally:
        quiet.setLevel(level)


def contract(config: ModelConfig, dtype: str) -> dict[str, list[dict]]:
    """The graph's inputs and outputs as `tformer.json` lists them: name, dtype, shape (an int
    where the size is fixed, a name where it is symbolic)."""
    specs = {
        "input_ids": ("int64", ["batch", "seq"]),
        "position_ids": ("int64", ["batch", "seq"]),
        "attention_mask": ("int64", ["batch", "past + seq"]),
        "last_index": ("int64", ["batch"]),
        "logits": (dtype, ["batch", config.vocab_size]),
    }

    def spec(name: str, kv_len: str) -> dict:
        kind, shape = specs.get(name, (dtype, ["batch", config.nhead, kv_len, config.head_dim]))
        return {"name": name, "dtype": kind, "shape": shape}

    return {
        "inputs": [spec(n, "past") for n in input_names(config.n_layers)],
        "outputs": [spec(n, "seq") for n in output_names(config.n_layers)],
    }


def check_artifact(path: Path, meta: dict) -> None:
    """`model.onnx` against `tformer.json` (`meta`, its schema already checked): the metadata it
    was exported with, its opset, and its graph's input and output names, dtypes and fixed sizes
    against the config's (so that onnxruntime never binds buffers the graph does not expect)."""
    try:
        import onnx
    except ImportError:
        raise TformerError("checking an ONNX export needs the onnx package (pip install 'tformer[onnx]')") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, onnx's own errors
        raise TformerError(f"{path}: not a readable ONNX model ({one_line(exc)}); {FIX}") from None
    check_embedded(meta, {p.key: p.value for p in model.metadata_props}, path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset != meta["opset"]:
        raise TformerError(f"{path}: opset {opset}, but tformer.json says {meta['opset']}; {FIX}")
    elem = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64"}
    wanted = contract(ModelConfig.from_dict(meta["config"]), meta["dtype"])
    for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        if len(values) != len(wanted[kind]) or not all(_matches(v, s, elem) for v, s in zip(values, wanted[kind])):
            raise TformerError(f"{path}: the graph's {kind} differ from what tformer.json's config and dtype imply; {FIX}")


def _matches(value, spec: dict, elem: dict[int, str]) -> bool:
    """A graph input or output (ValueInfoProto) against its `contract` entry: name, dtype, rank,
    and sizes: one the graph fixes must be the contract's, one the contract fixes may be left
    open (symbolic) by the graph."""
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if (value.name, elem.get(tensor.elem_type), len(dims)) != (spec["name"], spec["dtype"], len(spec["shape"])):
        return False
    return all(g is None if isinstance(c, str) else g in (None, c) for g, c in zip(dims, spec["shape"]))


def _versions() -> dict[str, str]:
    import onnx
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__}
