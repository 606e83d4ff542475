"""The anchor row: CTranslate2, the C++ engine users pick for fast CPU inference, running the same
weights.

The tutorial's model converts exactly into CTranslate2's decoder-only spec: post-norm layers
(`pre_norm=False`, no final norm), ReLU, the fused `in_proj` as the attention's QKV projection,
embeddings scaled by sqrt(d_model) (`scale_embeddings`), and the tutorial's own sinusoid table as
the position table (CTranslate2's built-in sinusoid is another formula). So converted, its greedy
tokens are eager's, which the benchmark checks before it times the row, as for the floor's.

The vocabulary is the ids themselves ("0", "1", ...) plus one token CTranslate2 requires and the
model never picks: its end token, a row of the projection with a bias of -1e9 (so no generation
stops early, and no real token is ever suppressed to make it so). The converted model is kept in
tformer's store, keyed by the weights and the compute type.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tformer.errors import TformerError, one_line
from tformer.export.writer import weights_sha256
from tformer.files import atomic_directory, store_root
from tformer.model import TransformerLM

INSTALL = "ctranslate2 is not installed (pip install 'tformer[ct2]')"
END = "</s>"  # CTranslate2's end token: never picked (see the module docstring)
COMPUTE_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def ctranslate2_module():
    """The ctranslate2 package, or TformerError with the install hint."""
    try:
        import ctranslate2
    except ImportError:
        raise TformerError(INSTALL) from None
    return ctranslate2


def convert(model: TransformerLM, directory: Path) -> None:
    """Write `model` as a CTranslate2 float32 model into the empty `directory`."""
    ctranslate2_module()
    from ctranslate2.specs import common_spec, transformer_spec

    c, w = model.config, model.weights()
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        c.n_layers, c.nhead, pre_norm=False, activation=common_spec.Activation.RELU
    )
    spec.config.layer_norm_epsilon = 1e-5  # nn.LayerNorm's default, which the tutorial keeps

    def array(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float32).contiguous().numpy()

    def linear(target, weight: torch.Tensor, bias: torch.Tensor) -> None:
        target.weight, target.bias = array(weight), array(bias)

    def norm(target, weight: torch.Tensor, bias: torch.Tensor) -> None:
        target.gamma, target.beta = array(weight), array(bias)

    decoder = spec.decoder
    decoder.scale_embeddings = True  # x * sqrt(d_model), as the tutorial
    decoder.embeddings.weight = np.concatenate([array(w.embedding), np.zeros((1, c.d_model), np.float32)])
    decoder.position_encodings.encodings = array(w.pe)
    for layer, lw in zip(decoder.layer, w.layers):
        linear(layer.self_attention.linear[0], lw.qkv, lw.qkv_bias)  # fused q, k, v: in_proj's order
        linear(layer.self_attention.linear[1], lw.out, lw.out_bias)
        norm(layer.self_attention.layer_norm, lw.norm1, lw.norm1_bias)  # post-norm: after the residual
        linear(layer.ffn.linear_0, lw.ff1, lw.ff1_bias)
        linear(layer.ffn.linear_1, lw.ff2, lw.ff2_bias)
        norm(layer.ffn.layer_norm, lw.norm2, lw.norm2_bias)
    head_bias = np.concatenate([array(w.head_bias), np.full((1,), -1e9, np.float32)])
    decoder.projection.weight = np.concatenate([array(w.head), np.zeros((1, c.d_model), np.float32)])
    decoder.projection.bias = head_bias
    spec.register_vocabulary([str(i) for i in range(c.vocab_size)] + [END])
    spec.config.bos_token = spec.config.eos_token = spec.config.unk_token = END
    spec.validate()
    spec.optimize(quantization="float32")
    spec.save(str(directory))


def stored_ct2_model(model: TransformerLM) -> Path:
    """The converted `model` in tformer's store, converted on first use."""
    ct2 = ctranslate2_module()
    key = f"{weights_sha256(model)} {model.config.to_json()} {ct2.__version__}"
    directory = store_root() / "ct2" / hashlib.sha256(key.encode()).hexdigest()[:20]
    if not (directory / "model.bin").is_file():
        with atomic_directory(directory, force=True) as tmp:
            convert(model, tmp)
    return directory


def ct2_generation(model: TransformerLM, device: torch.device, dtype: torch.dtype):
    """(make_run(prompts, new_tokens) -> timed generation, what runs it, notes() -> what it
    reported) for `model` converted, on `device` in `dtype`'s compute type, with torch's thread
    count. Raises TformerError when ctranslate2 is missing or cannot run there.

    CTranslate2 generates in a process of its own, which each run asks for one generation: once
    it has run in a process, that process's torch computes on one thread whatever its thread count
    says (measured with 2: the worker thread's CPU time drops to a tenth), which would slow every
    row timed after it. Its steps are stamped there, on the clock this process reads too."""
    ctranslate2_module()
    if dtype not in COMPUTE_TYPES:
        raise TformerError(f"CTranslate2 has no compute type for {dtype}")
    directory = stored_ct2_model(model)
    spec = dict(directory=str(directory), device=device.type, compute_type=COMPUTE_TYPES[dtype],
                threads=torch.get_num_threads())  # fmt: skip
    child = subprocess.Popen([sys.executable, "-m", "tformer.bench.ct2", json.dumps(spec)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    atexit.register(child.kill)
    implementation = _reply(child)
    peak = [None]

    def make_run(prompts: list[list[int]], new_tokens: int):
        # CTranslate2 feeds a batch's prompts at once up to the shortest one's length, and steps
        # through the rest as generated tokens (returned with them): the benchmark's share one length.
        if len({len(p) for p in prompts}) != 1:
            raise TformerError("the ct2 row runs prompts of one length")

        def run(tick: Callable[..., None]) -> list[list[int]]:
            child.stdin.write(json.dumps([prompts, new_tokens]) + "\n")
            child.stdin.flush()
            tokens, stamps, peak[0] = _reply(child)
            for at in stamps:
                tick(at=at)
            return tokens

        return run

    def notes() -> list[str]:
        return [f"runs in a process of its own: its peak RSS there {peak[0]:.0f} MiB"] if peak[0] else []

    return make_run, implementation, notes


def _reply(child: subprocess.Popen):
    """The child's answer (a JSON line), or TformerError with its error."""
    line = child.stdout.readline()
    if not line:
        raise TformerError(f"the CTranslate2 process ended (exit status {child.wait()})")
    status, value = json.loads(line)
    if status != "ok":
        raise TformerError(value)
    return value


def serve(spec: dict) -> None:
    """The CTranslate2 process (`python -m tformer.bench.ct2 SPEC`): build the generator, then one
    generation per line of stdin (`[prompts, new_tokens]`) until it closes, each answered with a
    line on stdout; each step of a generation stamped with `time.perf_counter` (the monotonic
    clock, the same in every process)."""
    import ctranslate2

    def send(status: str, value) -> None:
        print(json.dumps([status, value]), flush=True)

    device, compute_type = spec["device"], spec["compute_type"]
    try:
        generator = ctranslate2.Generator(spec["directory"], device=device, compute_type=compute_type,
                                          intra_threads=spec["threads"])  # fmt: skip
    except (RuntimeError, ValueError) as exc:
        return send("error", f"CTranslate2 cannot run on {device} in {compute_type}: {one_line(exc)}")
    send("ok", f"CTranslate2 {ctranslate2.__version__} Generator ({compute_type})")
    for line in sys.stdin:
        prompts, new_tokens = json.loads(line)
        stamps: list[float] = []

        def step(result) -> bool:  # once per row and step, rows in order
            if result.batch_id == len(prompts) - 1:
                stamps.append(time.perf_counter())
            return False  # go on

        results = generator.generate_batch([[str(t) for t in p] for p in prompts], max_length=new_tokens,
                                           sampling_topk=1, beam_size=1, include_prompt_in_result=False,
                                           callback=step)  # fmt: skip
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        send("ok", [[r.sequences_ids[0] for r in results], stamps, peak])
    del generator  # before the interpreter ends: one that ran a callback aborts it otherwise (ctranslate2 4.8)


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
