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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tformer.errors import TformerError
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
    """(make_run(prompts, new_tokens) -> timed generation, what runs it, ctranslate2 version) for
    `model` converted, on `device` in `dtype`'s compute type, with torch's thread count. Raises
    TformerError when ctranslate2 is missing or cannot run there."""
    ct2 = ctranslate2_module()
    if dtype not in COMPUTE_TYPES:
        raise TformerError(f"CTranslate2 has no compute type for {dtype}")
    try:
        generator = ct2.Generator(str(stored_ct2_model(model)), device=device.type, compute_type=COMPUTE_TYPES[dtype],
                                  intra_threads=torch.get_num_threads())  # fmt: skip
    except (RuntimeError, ValueError) as exc:
        raise TformerError(f"CTranslate2 cannot run on {device.type} in {COMPUTE_TYPES[dtype]}: {exc}") from None
    # A generator that ran a Python callback aborts the process if it is still alive when the
    # interpreter shuts down (ctranslate2 4.8: "terminate called without an active exception").
    held = [generator]
    atexit.register(held.clear)
    del generator

    def make_run(prompts: list[list[int]], new_tokens: int):
        # CTranslate2 feeds a batch's prompts at once up to the shortest one's length, and steps
        # through the rest as generated tokens (returned with them): the benchmark's share one length.
        if len({len(p) for p in prompts}) != 1:
            raise TformerError("the ct2 row runs prompts of one length")
        tokens = [[str(t) for t in prompt] for prompt in prompts]

        def run(tick: Callable[[], None]) -> list[list[int]]:
            steps = [0]

            def step(result) -> bool:  # one call per row and step, on the generating thread
                steps[0] += 1
                if steps[0] % len(tokens) == 0:
                    tick()
                return False  # go on

            results = held[0].generate_batch(tokens, max_length=new_tokens, sampling_topk=1, beam_size=1,
                                               include_prompt_in_result=False, callback=step)  # fmt: skip
            return [r.sequences_ids[0] for r in results]

        return run

    return make_run, f"CTranslate2 {ct2.__version__} Generator ({COMPUTE_TYPES[dtype]})", ct2.__version__
