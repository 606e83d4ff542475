"""The floor row: a bare greedy decode loop of the same model, written with `torch.nn.functional`.

What a user could write in fifty lines with no engine at all (gpt-fast's `generate.py` without
compile): one preallocated cache for the whole batch, SDPA, argmax, no requests, no scheduling,
no sampling options. Its speed is the model's own at these shapes, so the gap between it and a
backend row is what the engine around the model costs (`tformer-bench` shows `vs floor`). Its
tokens are eager's (the same weights, greedy), which the benchmark checks like any row's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tformer.model import TransformerLM, column_major_weights


def floor_generation(model: TransformerLM, device: torch.device, dtype: torch.dtype):
    """(make_run(prompts, new_tokens) -> timed generation, what runs it) over a copy of `model`
    on `device` in `dtype` (weights column-major on the CPU, as the eager backend keeps them)."""
    model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    if device.type == "cpu":
        column_major_weights(model)
    c = model.config
    emb, pe, scale = model.encoder.weight, model.pos_encoder.pe[:, 0], math.sqrt(c.d_model)
    layers = [(l.self_attn.in_proj_weight, l.self_attn.in_proj_bias, l.self_attn.out_proj.weight,
               l.self_attn.out_proj.bias, l.linear1.weight, l.linear1.bias, l.linear2.weight, l.linear2.bias,
               l.norm1.weight, l.norm1.bias, l.norm2.weight, l.norm2.bias)
              for l in model.transformer_encoder.layers]  # fmt: skip
    head, head_bias = model.decoder.weight, model.decoder.bias

    def forward(ids: torch.Tensor, at: int, k: list[torch.Tensor], v: list[torch.Tensor]) -> torch.Tensor:
        """Logits `(B, V)` of the last of `ids` `(B, T)`, at positions `at..at+T-1`; the cache
        `k`, `v` `(B, H, S, Dh)` per layer is written at those slots."""
        B, T = ids.shape
        C, H = c.d_model, c.nhead
        x = F.embedding(ids, emb) * scale + pe[at : at + T]  # (B, T, C)
        for i, (w_in, b_in, w_out, b_out, w1, b1, w2, b2, n1w, n1b, n2w, n2b) in enumerate(layers):
            q, new_k, new_v = F.linear(x, w_in, b_in).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
            k[i][:, :, at : at + T] = new_k
            v[i][:, :, at : at + T] = new_v
            y = F.scaled_dot_product_attention(q, k[i][:, :, : at + T], v[i][:, :, : at + T], is_causal=T > 1)
            x = F.layer_norm(x + F.linear(y.transpose(1, 2).reshape(B, T, C), w_out, b_out), (C,), n1w, n1b, 1e-5)
            x = F.layer_norm(x + F.linear(F.relu(F.linear(x, w1, b1)), w2, b2), (C,), n2w, n2b, 1e-5)
        return F.linear(x[:, -1], head, head_bias)

    def make_run(prompts: list[list[int]], new_tokens: int) -> Callable[[Callable[[], None]], list[list[int]]]:
        ids = torch.tensor(prompts, device=device)  # (B, P): the benchmark's prompts share one length

        def run(tick: Callable[[], None]) -> list[list[int]]:
            B, P = ids.shape
            shape = (B, c.nhead, P + new_tokens, c.head_dim)
            with torch.inference_mode():
                k = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
                v = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
                out = [forward(ids, 0, k, v).argmax(dim=-1, keepdim=True)]  # (B, 1) each
                for t in range(P, P + new_tokens - 1):
                    tick()
                    out.append(forward(out[-1], t, k, v).argmax(dim=-1, keepdim=True))
                tokens = torch.cat(out, dim=1).tolist()  # the one read back: on a GPU, it waits for the last step
                tick()
                return tokens

        return run

    return make_run, "torch.nn.functional decode loop (SDPA, preallocated cache, greedy)"
