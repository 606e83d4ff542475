"""Reading an export directory back. It is untrusted input: anything in it may have been edited,
truncated or bit-flipped since export (by hand, by a bad copy, by a full disk).

Native runtimes trust what they are handed: a head count or dtype that is not the graph's makes
them read and write past buffers, and a `.pt2` holds machine code. So nothing reaches them
before `verified_meta` has checked, in this order (each failure is one line naming the field or
file and the fix):

1. `tformer.json` against the schema of this format version; an older version is refused with
   "re-export" (cheap: `read_meta`, which is all that choosing a backend needs);
2. every file listed under `files` against the SHA-256 recorded at export (tformer.json itself
   is covered by 1 and 3);
3. the artifact against `tformer.json`: the fields in `EMBEDDED` (format, version, config, dtype,
   weights hash) as the artifact carries them, and the format's own checks (for ONNX: opset, and
   the graph's input and output names, dtypes and fixed sizes against the config); then the
   `inputs` and `outputs` that `tformer.json` documents against the config and dtype.

`exporter`, `versions`, `export_seconds` and `validation` do not decide how the model runs: they
are only type-checked, and editing them changes nothing.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tformer.config import ModelConfig
from tformer.errors import TformerError
from tformer.export.formats import EMBEDDED, FIELDS, FORMATS, format_named, is_number
from tformer.files import file_sha256

FIX = "re-export it (tformer-export --force)"


def read_meta(directory: str | os.PathLike) -> dict:
    """`tformer.json` of export `directory`, checked against the schema; no file is hashed, so
    this is cheap and enough to choose a backend, but what runs an export needs `verified_meta`."""
    path = Path(directory) / "tformer.json"
    if not path.is_file():
        raise TformerError(f"{directory}: not a tformer export (no tformer.json); create one with tformer-export")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise TformerError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise TformerError(f"{path}: not valid JSON ({exc}); {FIX}") from None
    if not isinstance(meta, dict):
        raise TformerError(f"{path}: not a JSON object; {FIX}")
    _check_schema(meta, path)
    return meta


def verified_meta(directory: str | os.PathLike) -> dict:
    """The metadata of export `directory` once everything a load depends on has been verified
    (the three steps of this module's docstring); raises TformerError naming what is wrong.

    Costs a SHA-256 of every file (about 0.05 s per 100 MB with SHA extensions, from the page cache) plus
    reading the artifact's own metadata (for ONNX, parsing the graph)."""
    directory = Path(directory)
    meta = read_meta(directory)
    for name, digest in meta["files"].items():
        path = directory / name
        try:
            actual = file_sha256(path)
        except FileNotFoundError:
            raise TformerError(f"{path} is missing; {FIX}") from None
        except OSError as exc:
            raise TformerError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        if actual != digest:
            raise TformerError(f"{path} does not match the SHA-256 recorded in tformer.json (changed since export); {FIX}")
    fmt = format_named(meta["format"])
    module = importlib.import_module(fmt.module)
    module.check_artifact(directory / fmt.artifact, meta)
    contract = module.contract(ModelConfig.from_dict(meta["config"]), meta["dtype"])
    for name in ("inputs", "outputs"):  # after the artifact's check, which names an edited config or dtype
        if meta[name] != contract[name]:
            raise TformerError(f"{directory / 'tformer.json'}: field '{name}' does not match the config and dtype; {FIX}")
    return meta


def check_embedded(meta: dict, embedded: dict[str, str], artifact: Path) -> None:
    """`tformer.json` (`meta`) against what `artifact` says about itself (`embedded`: the
    `embedded_metadata` it was exported with); names the first field that differs."""
    for key in EMBEDDED:
        try:
            theirs = json.loads(embedded[f"tformer.{key}"])
        except (KeyError, TypeError, ValueError):
            raise TformerError(f"{artifact} carries no valid 'tformer.{key}' metadata; {FIX}") from None
        ours = meta[key]
        pairs = [(key, ours, theirs)]
        if isinstance(ours, dict) and isinstance(theirs, dict):
            pairs = [(f"{key}.{k}", ours.get(k), theirs.get(k)) for k in sorted(ours.keys() | theirs.keys())]
        for name, a, b in pairs:
            if a != b:
                raise TformerError(
                    f"{artifact.with_name('tformer.json')}: field '{name}' is {_short(a)} but {artifact.name} was "
                    f"exported with {_short(b)}; restore tformer.json or {FIX}"
                )


def verified_or_rebuilt(directory: Path, export: Callable[[], object]) -> dict:
    """For the exports tformer makes in its own cache: one that fails verification (absent, made by
    an older tformer, damaged) is exported again by `export()` rather than reported."""
    try:
        return verified_meta(directory)
    except TformerError:
        export()
        return verified_meta(directory)


def _check_schema(meta: dict, path: Path) -> None:
    def bad(name: str, problem: str) -> TformerError:
        return TformerError(f"{path}: field '{name}' {problem}; {FIX}")

    for name in ("format", "format_version"):  # first: they decide which schema applies
        if name not in meta:
            raise bad(name, "is missing")
    fmt, version = format_named(meta["format"]), meta["format_version"]
    if fmt is None:
        names = ", ".join(f.name for f in FORMATS.values())
        raise bad("format", f"must be one of {names}, not {_short(meta['format'])}")
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad("format_version", f"must be an integer, not {_short(version)}")
    if version < fmt.version:
        raise TformerError(f"{path}: export format version {version} is older than this tformer's ({fmt.version}); {FIX}")
    if version > fmt.version:
        raise TformerError(f"{path}: written by a newer tformer (export format version {version}); upgrade tformer")
    schema = {**FIELDS, **fmt.fields}
    for name in meta.keys() - schema.keys() - {"format", "format_version"}:
        raise bad(name, f"is not part of export format version {fmt.version}")
    for name, (check, what) in schema.items():
        if name not in meta:
            raise bad(name, "is missing")
        if not check(meta[name]):
            raise bad(name, f"must be {what}, not {_short(meta[name])}")
    _check_config(meta["config"], bad)
    files, artifact = meta["files"], fmt.artifact
    if artifact not in files:
        raise bad("files", f"lacks {artifact}")
    if ("tokenizer.json" in files) != meta["tokenizer"]:
        listed = "lists" if meta["tokenizer"] is False else "lacks"
        raise bad("tokenizer", f"is {json.dumps(meta['tokenizer'])} but field 'files' {listed} tokenizer.json")


def _check_config(config: dict, bad: Callable[[str, str], TformerError]) -> None:
    """`ModelConfig` checks the values (its messages name the field); here: the key set, and that
    dropout, which it only compares, is a number."""
    names = ModelConfig.__dataclass_fields__.keys()
    for name in names - config.keys():
        raise bad(f"config.{name}", "is missing")
    for name in config.keys() - names:
        raise bad(f"config.{name}", "is not a model setting")
    if not is_number(config["dropout"]):
        raise bad("config.dropout", f"must be a number, not {_short(config['dropout'])}")
    try:
        ModelConfig(**config)
    except TformerError as exc:
        raise bad("config", f"is invalid ({str(exc).split(';')[0]})") from None


def _short(value: Any) -> str:
    """A value for a one-line message: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
