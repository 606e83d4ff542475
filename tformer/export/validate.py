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
from tformer.export.artifact import TOLERANCE
from tformer.export.onnx import OnnxStep, example_inputs, input_names
from tformer.model import TransformerLM

SHAPES = [(b, s, p) for b in (1, 3) for s in (1, 17) for p in (0, 9)]
GREEDY_STEPS = 32


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

    onnx.checker.check_model(str(directory / "model.onnx"))
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        raise TformerError("validating on CUDA needs onnxruntime-gpu (pip install onnxruntime-gpu)")
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=[provider])
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
    greedy = _greedy(directory, model, device)
    log(f"  greedy {GREEDY_STEPS} steps, padded batch of 3: {'identical' if greedy['identical'] else 'DIFFERENT'}")
    if not greedy["identical"]:
        raise TformerError(f"validation failed: greedy tokens differ from PyTorch ({greedy['detail']})")
    return {"checker": "ok", "shapes": rows, "greedy": greedy}


def _greedy(directory: Path, model: TransformerLM, device: torch.device) -> dict:
    from tformer.backends.onnx import OnnxBackend
    from tformer.runtime import Runtime

    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    prompts = [[t % model.config.vocab_size for t in p] for p in prompts]
    onnx_rt = Runtime(OnnxBackend.from_directory(directory, device), None)
    eager_rt = Runtime.from_model(copy.deepcopy(model), device=device, dtype=model.decoder.weight.dtype)
    ours = onnx_rt.generate_ids(prompts, max_new_tokens=GREEDY_STEPS, temperature=0)
    theirs = eager_rt.generate_ids(prompts, max_new_tokens=GREEDY_STEPS, temperature=0)
    detail = next((f"prompt {i}" for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), "")
    return {"steps": GREEDY_STEPS, "prompts": len(prompts), "identical": ours == theirs, "detail": detail}
