"""Checking and normalising the values users pass to the Python API.

Users hold their numbers in whatever their code uses: Python ints, numpy scalars and arrays,
torch tensors. Everything public accepts all of them where a Python value is expected and turns
them into plain Python values here, once, so the rest of tformer deals with `int`, `float`,
`str` and `list[list[int]]` only. Anything else is refused with one line naming the argument and
what it takes (`TformerError`), never a traceback from deep inside.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tformer.errors import TformerError


def _kind(value: Any) -> str:
    """What `value` is, for an error message: "None", "int 5", "a 1-D ndarray of float64"."""
    if value is None:
        return "None"
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"a {value.ndim}-D {type(value).__name__} of {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def as_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """A Python int from an int, numpy integer or one-element integer tensor; bools are refused
    (`max_new_tokens=True` is a mistake, not 1)."""
    try:
        if _is_bool(value) or (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim != 0):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TformerError(f"{name} must be an integer, got {_kind(value)}") from None
    if minimum is not None and number < minimum or maximum is not None and number > maximum:
        raise TformerError(f"{name} must be {_int_range(minimum, maximum)}, got {number}")
    return number


def _int_range(minimum: int | None, maximum: int | None) -> str:
    if maximum is None:
        return {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    return f"an integer in [{minimum}, {'2**64)' if maximum == 2**64 - 1 else f'{maximum}]'}"


def as_float(name: str, value: Any, what: str = "a finite number") -> float:
    """A finite Python float from an int, float, numpy number or 0-d tensor (bools refused).
    `what` describes the accepted values in the error message."""
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0 and not _is_bool(value):
        value = value.item()
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TformerError(f"{name} must be {what}, got {_kind(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise TformerError(f"{name} must be {what}, got {number}")
    return number


def as_path(name: str, value: Any, what: str = "a file or directory path (str or pathlib.Path)") -> str | os.PathLike:
    if not isinstance(value, (str, os.PathLike)):
        raise TformerError(f"{name} must be {what}, got {_kind(value)}")
    return value


def as_text(name: str, value: Any) -> str:
    """A string that is valid Unicode (a lone surrogate such as '\\ud800' cannot be tokenized)."""
    if not isinstance(value, str):
        raise TformerError(f"{name} must be a string, got {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise TformerError(
            f"{name} holds a lone surrogate U+{ord(bad):04X} at index {exc.start}, which is not text; "
            "decode your input with errors='replace' or fix its source"
        ) from None
    return value


def as_prompt(value: Any, name: str = "prompt") -> list[int]:
    """One prompt of token ids: a sequence of integers, or a 1-D integer array or tensor."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if value.ndim != 1 or not _integer_dtype(value):
            raise TformerError(f"{name} must be a 1-D array of integer token ids, got {_kind(value)}")
        return [int(t) for t in value.tolist()]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TformerError(f"{name} must be a list of token ids, got {_kind(value)}")
    ids = []
    for i, token in enumerate(value):
        try:
            ids.append(as_int(f"{name}[{i}]", token))
        except TformerError:
            raise TformerError(f"{name}: token id {token!r} at index {i} is not an integer") from None
    return ids


def as_prompts(value: Any) -> list[str] | list[list[int]]:
    """A batch of prompts, all text or all token ids (the first prompt says which): one string or a
    list of strings; a list of id prompts (each a list or a 1-D array/tensor), or a 2-D integer
    array or tensor (one row per prompt). A flat list of ints is refused with a hint: it is one
    prompt, and guessing would turn it into many one-token prompts or the reverse."""
    if isinstance(value, str):
        return [as_text("prompt", value)]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if value.ndim != 2:
            hint = "; for one prompt pass [ids] or ids[None]" if value.ndim == 1 else ""
            raise TformerError(f"prompts must be a 2-D array (one row per prompt), got {_kind(value)}{hint}")
        return [as_prompt(row, f"prompt {i}") for i, row in enumerate(value)]
    if isinstance(value, bytes) or not isinstance(value, Sequence):
        raise TformerError(f"prompts must be a string, a list of strings or a list of prompts (lists of token ids), "
                           f"got {_kind(value)}")  # fmt: skip
    if value and isinstance(value[0], str):
        return [as_text(f"prompt {i}", p) for i, p in enumerate(value)]
    if value and all(_is_scalar_int(t) for t in value):
        raise TformerError("prompts must be a list of prompts; for one prompt pass [ids] (a list holding the list of ids)")
    return [as_prompt(p, f"prompt {i}") for i, p in enumerate(value)]


def as_one_prompt(value: Any) -> str | list[int]:
    """One prompt: a string, or token ids (a list or a 1-D array/tensor, see `as_prompt`)."""
    if isinstance(value, str):
        return as_text("prompt", value)
    if isinstance(value, (np.ndarray, torch.Tensor)) or (
        isinstance(value, Sequence) and not isinstance(value, bytes) and not (value and isinstance(value[0], str))
    ):
        return as_prompt(value)
    raise TformerError(f"prompt must be one string or one list of token ids, got {_kind(value)}")


def as_stop(value: Any) -> list[str]:
    """Stop strings: None or () for none, one string, or a sequence of non-empty strings."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, bytes) or not isinstance(value, Sequence):
        raise TformerError(f"stop must be a string or a list of strings, got {_kind(value)}")
    stops = [as_text(f"stop[{i}]", s) for i, s in enumerate(value)]
    if "" in stops:
        raise TformerError(f"stop strings must be non-empty; stop[{stops.index('')}] is '': leave it out")
    return stops


def as_stop_token_ids(value: Any) -> list[int]:
    """Token ids that end a request: None or () for none, one id, or a sequence (or 1-D array or
    tensor) of ids >= 0."""
    if value is None:
        return []
    ids = as_prompt([value] if _is_scalar_int(value) else value, "stop_token_ids")
    if (bad := next((t for t in ids if t < 0), None)) is not None:
        raise TformerError(f"stop_token_ids must be token ids >= 0, got {bad}")
    return ids


def _integer_dtype(array: np.ndarray | torch.Tensor) -> bool:
    if isinstance(array, torch.Tensor):
        return not (array.dtype.is_floating_point or array.dtype.is_complex or array.dtype == torch.bool)
    return array.dtype.kind in "iu"


def _is_scalar_int(value: Any) -> bool:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim == 0
    return isinstance(value, (numbers.Integral, np.integer))
