"""Validation of an ONNX export: onnx.checker, then onnxruntime against PyTorch.

Logits and presents are compared on every combination of batch (1, 3, with a left-padded row),
new tokens (1, 17) and past length (0, 9); then a padded batch is decoded greedily for 32 steps
through the onnx backend and through eager, and the tokens must be identical.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tformer.errors import TformerError
from tformer.export.artifact import TOLERANCE, greedy_check
from tformer.export.onnx import OnnxStep, example_inputs, input_names
from tformer.model import TransformerLM

SHAPES = [(b, s, p) for b in (1, 3) for s in (1, 17) for p in (0, 9)]


def validate_onnx(
    directory: Path, model: TransformerLM, log: Callable[[str], None] = lambda _: None,
    device: torch.device = torch.device("cpu"),
) -> dict:
    """Check the export in `directory` against `model` (same dtype) with PyTorch and onnxruntime
    both on `device` (CUDA needs onnxruntime-gpu); raise TformerError on failure.

    Returns the report stored in tformer.json: per shape the max abs difference of logits and
    presents and the tolerance, and the greedy comparison.
    """
    import onnx
    import onnxruntime as ort

    from tformer.backends.onnx import OnnxBackend, provider_for
    from tformer.runtime import Runtime

    onnx.checker.check_model(str(directory / "model.onnx"))
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=[provider_for(device)])
    model = model.to(device)
    dtype, names = model.decoder.weight.dtype, input_names(model.config.n_layers)
    tolerance = TOLERANCE[dtype]
    step = OnnxStep(model)
    rows = []
    for batch, seq, past in SHAPES:
        inputs = example_inputs(model, batch, seq, past, padded_rows=1 if batch > 1 else 0, seed=batch * 100 + seq + past)
        with torch.no_grad():
            ids, positions, mask, past_kv = inputs
            logits, presents = step(ids.to(device), positions.to(device), mask.to(device),
                                    tuple((k.to(device), v.to(device)) for k, v in past_kv))  # fmt: skip
        flat = [inputs[0], inputs[1], inputs[2], *(t for kv in inputs[3] for t in kv)]
        got = session.run(None, {n: t.numpy() for n, t in zip(names, flat)})
        expected = [logits, *(t for kv in presents for t in kv)]
        diff = max(float(np.abs(g.astype(np.float64) - e.double().cpu().numpy()).max()) for g, e in zip(got, expected))
        rows.append(dict(batch=batch, seq=seq, past=past, max_abs_diff=diff, tolerance=tolerance, ok=diff <= tolerance))
        log(f"  batch {batch}  new tokens {seq:2d}  past {past}: max |onnx - torch| = {diff:.2e}  (tolerance {tolerance:g})")
        if diff > tolerance:
            raise TformerError(
                f"validation failed at batch {batch}, {seq} new tokens, past {past}: max abs difference {diff:.3g} "
                f"> tolerance {tolerance:g}"
            )
    exported = Runtime(OnnxBackend.from_directory(directory, device), None)
    eager = Runtime.from_model(copy.deepcopy(model), device=device, dtype=dtype)
    return {"checker": "ok", "shapes": rows, "greedy": greedy_check(exported, eager, log)}
