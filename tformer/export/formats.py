"""The export formats, in one registry: what each is called, its version, the file it runs, which
backend runs it, its `tformer.json` schema and how validation compares it with PyTorch.

Everything that needs to know a format reads it here: the writer (`tformer.export.writer`), the
reader (`tformer.export.integrity`), the backend factory and the validation
(`tformer.exporter`). A format's own code lives in the module it names, with four functions:
`write_artifact` (trace or compile the model into the artifact), `contract` (its inputs and
outputs for tformer.json), `check_artifact` (the artifact against tformer.json, at load) and
`validation_checks` (what validation reports beyond comparing logits).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tformer.errors import TformerError

Check = tuple[Callable[[Any], bool], str]  # a field's test, and what it must be (for the message)

# The dtypes an export can have, by their tformer.json name.
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# tformer.json fields that are also embedded in the artifact, so that the two can be compared.
EMBEDDED = ("format", "format_version", "config", "dtype", "weights_sha256")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_sha256(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None


def _is_file_name(v: Any) -> bool:
    """A plain name inside the directory: `files` must not point anywhere else."""
    return isinstance(v, str) and v == Path(v).name and not v.startswith(".") and v != "tformer.json"


def _is_io_list(v: Any) -> bool:
    """`inputs` / `outputs`: a list of {"name", "dtype", "shape"} (shape: sizes or symbolic names)."""
    return isinstance(v, list) and all(
        isinstance(x, dict) and x.keys() == {"name", "dtype", "shape"} and isinstance(x["shape"], list) for x in v
    )


# The fields of every format's tformer.json (after format and format_version), in the order they
# are written and checked.
FIELDS: dict[str, Check] = {
    "config": (lambda v: isinstance(v, dict), "an object"),
    "dtype": (lambda v: v in EXPORT_DTYPES, " or ".join(map(repr, EXPORT_DTYPES))),
    "weights_sha256": (_is_sha256, "a SHA-256 (64 lowercase hex digits)"),
    "inputs": (_is_io_list, "a list of {name, dtype, shape}"),
    "outputs": (_is_io_list, "a list of {name, dtype, shape}"),
    "tokenizer": (lambda v: isinstance(v, bool), "true or false"),
    "exporter": (lambda v: isinstance(v, str), "a string"),
    "versions": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()), "an object of strings"),
    "export_seconds": (lambda v: is_number(v) and v >= 0, "a number of seconds"),
    "files": (lambda v: isinstance(v, dict) and all(_is_file_name(k) and _is_sha256(h) for k, h in v.items()),
              "an object of file name -> SHA-256"),
    "validation": (lambda v: v is None or isinstance(v, dict), "null or an object"),
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One comparison of an export with PyTorch at validation: a batch (row 1 right-padded when
    there are several: its chunks up to 3 tokens shorter) fed in `chunks` of new tokens, one step
    each (a prefill, then more tokens on top of the cache); every step's logits must agree.
    `label` keys the report's row."""

    batch: int
    chunks: tuple[int, ...]
    label: dict[str, int]
    text: str  # for the failure message: "batch 3, 17 new tokens, past 9"


def _onnx_cases() -> tuple[Case, ...]:
    """New tokens 1 and 17 on a past of 0 and 9 tokens (the graph's pasts in, new keys and values out)."""
    return tuple(
        Case(b, (p, s) if p else (s,), {"batch": b, "seq": s, "past": p}, f"batch {b}, {s} new tokens, past {p}")
        for b in (1, 3) for s in (1, 17) for p in (0, 9)
    )  # fmt: skip


def _pt2_cases() -> tuple[Case, ...]:
    """Prompts of 1 and 17 tokens, then 4 decode steps."""
    return tuple(
        Case(b, (p, 1, 1, 1, 1), {"batch": b, "prompt": p, "decode_steps": 4}, f"batch {b}, prompt {p}")
        for b in (1, 3) for p in (1, 17)
    )  # fmt: skip


@dataclass(frozen=True)
class Format:
    key: str  # what users call it: tformer-export --format KEY
    name: str  # tformer.json "format"
    version: int  # the tformer.json "format_version" this tformer writes and reads
    artifact: str  # the file its backend runs
    backend: str  # the backend that runs it (see tformer.backends.BACKENDS)
    module: str  # its own code: write_artifact, contract, check_artifact
    fields: dict[str, Check] = field(default_factory=dict)  # its own tformer.json fields
    cases: tuple[Case, ...] = ()
    options: tuple[str, ...] = ()  # the keyword options of its write_artifact


FORMATS = {
    "onnx": Format("onnx", "tformer-onnx", 3, "model.onnx", "onnx", "tformer.export.onnx",
                   {"opset": (lambda v: _is_int(v) and v > 0, "a positive integer")}, _onnx_cases(), ("opset",)),
    "pt2": Format("pt2", "tformer-pt2", 4, "model.pt2", "aot", "tformer.export.pt2", {}, _pt2_cases()),
}  # fmt: skip


def format_named(name: Any) -> Format | None:
    """The format whose tformer.json name is `name`, or None."""
    return next((f for f in FORMATS.values() if f.name == name), None)


def format_for(key: str) -> Format:
    """The format users call `key` ("onnx", "pt2"); TformerError for any other."""
    if key not in FORMATS:
        raise TformerError(f"unknown export format {key!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[key]
