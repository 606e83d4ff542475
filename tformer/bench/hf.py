"""The peer row: HF transformers' own `generate`, on a GPT-2 of the same sizes.

It is what users would otherwise pick, so it runs side by side with tformer's rows: same
d_model, layers, heads, d_ff, vocabulary and activation (ReLU), random weights, greedy, its own
KV cache. Its tokens cannot be compared with ours (other weights and architecture details), only
its speed. A streamer records when each step's tokens reach the host, as for our rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tformer.config import ModelConfig
from tformer.errors import TformerError


def hf_generation(config: ModelConfig, max_positions: int, device: torch.device, dtype: torch.dtype):
    """(make_run(prompts, new_tokens) -> timed generation, what runs it, transformers
    version). Raises TformerError when transformers is not installed."""
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.generation.streamers import BaseStreamer
    except ImportError:
        raise TformerError("transformers is not installed (pip install 'tformer[hf]')") from None
    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=max_positions, n_embd=config.d_model, n_layer=config.n_layers,
        n_head=config.nhead, n_inner=config.d_ff, activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # always generate the full length
    model.generation_config.pad_token_id = 0

    class Ticker(BaseStreamer):
        """HF calls put() with the prompt, then once per step with its new tokens (on the host)."""

        def __init__(self, tick: Callable[[], None]):
            self.tick, self.seen_prompt = tick, False

        def put(self, value) -> None:
            if self.seen_prompt:
                self.tick()
            self.seen_prompt = True

        def end(self) -> None:
            pass

    def make_run(prompts: list[list[int]], new_tokens: int):
        ids = torch.tensor(prompts, device=device)

        def run(tick: Callable[[], None]) -> None:
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, streamer=Ticker(tick))  # fmt: skip

        return run

    implementation = f"HF GPT-2 ({getattr(model.config, '_attn_implementation', 'eager')} attention)"
    return make_run, implementation, transformers.__version__
