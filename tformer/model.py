"""The tutorial's transformer language model, rewritten batch-first with a KV cache.

`TransformerLM` computes exactly what the tutorial's `TransformerModel` computes (embedding scaled
by sqrt(d_model), sinusoidal positions, post-norm ReLU encoder layers under a causal mask, linear
decoder), and its parameters carry exactly the tutorial's names and shapes, so
`load_state_dict(torch.load("model.pt"), strict=True)` needs no renaming. What it adds is what
inference needs: batch-first tensors, per-row positions for left-padded batches, and a
preallocated KV cache written in place at a position tensor (the gpt-fast recipe, which is what
`torch.compile` with CUDA graphs and the other backends build on).

Cache layout: slot `j` of the cache holds the key/value of column `j` of the (left-padded) batch.
Row `b` is valid from slot `start[b]` on; its token in slot `j` sits at position `j - start[b]`.
A query in slot `s` of row `b` attends to keys `start[b] <= j <= s`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tformer.config import ModelConfig


@dataclass
class KVCache:
    """Per-layer key and value buffers, each `(B, H, S, Dh)`, preallocated and updated in place.

    One tensor per layer and kind (not one stacked tensor) so that a compiled step writes only the
    slots it touches. `S` is the longest sequence this cache serves (prompt + new tokens).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(
        cls, config: ModelConfig, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> KVCache:
        # Zeros, not empty: masked slots get weight exactly 0, and 0 * garbage could be NaN.
        shape = (batch, config.nhead, max_len, config.head_dim)
        k, v = ([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)] for _ in range(2))
        return cls(k, v)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def prefix(self, length: int) -> KVCache:
        """Views of the first `length` slots: writes go through to this cache, reads skip the rest."""
        return KVCache([k[:, :, :length] for k in self.k], [v[:, :, :length] for v in self.v])

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` `(B, H, T, Dh)` of `layer` at slots `input_pos` `(T,)`; return the whole
        buffers `(B, H, S, Dh)` to attend over. (Any object with this method can be the cache.)"""
        self.k[layer].index_copy_(2, input_pos, k)
        self.v[layer].index_copy_(2, input_pos, v)
        return self.k[layer], self.v[layer]


# A function that computes attention in place of SDPA (the triton backend's kernels): given q
# `(B, H, T, Dh)` and the k, v `(B, H, S, Dh)` that the cache returned, the output `(B, H, T, Dh)`.
# The masking it applies is its own business (the backend knows the rows' start and length).
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def row_positions(input_pos: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    """Positional-encoding rows `(B or 1, T)`: slot `j` of row `b` is position `j - start[b]` (0 for padding)."""
    return input_pos[None, :] if start is None else (input_pos[None, :] - start[:, None]).clamp(min=0)


def attention_bias(
    input_pos: torch.Tensor, key_pos: torch.Tensor, key_valid: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive attention mask `(B or 1, 1, T, S)`: 0 where a query may attend, else a large negative.

    input_pos: `(T,)` int64 slot of each query. key_pos: `(S,)` int64 slot of each key.
    key_valid: `(B, S)` bool, False for padding keys, or None when no row is padded. A query
    attends to valid keys at or before its own slot. The masked value is `finfo(dtype).min`, never
    `-inf`: a fully masked row (a padding query) then gives a uniform softmax instead of NaN, in
    eager SDPA, onnxruntime and our kernels alike.
    """
    allowed = key_pos[None, None, :] <= input_pos[None, :, None]  # (1, T, S): causal
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]  # (B, T, S): left padding
    zero = torch.zeros((), device=input_pos.device, dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min).unsqueeze(1)  # (B, 1, T, S)


# Decode steps are small enough that call overhead shows in tokens/s: on a 2-core CPU a module
# __call__ costs ~8 us and a no-op dropout ~10 us, together a fifth of a d_model-256 step. The
# layers keep their submodules (for the tutorial's weight names) but run the functional ops.


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, True) if training and p > 0 else x


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


def layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


class PositionalEncoding(nn.Module):
    """The tutorial's sinusoidal table, stored as buffer `pe` of shape `(max_len, 1, d_model)`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.p = config.dropout
        position = torch.arange(config.max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, config.d_model, 2) * -(math.log(10000.0) / config.d_model))
        pe = torch.zeros(config.max_len, 1, config.d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: (B, T, C), positions: (B, T) -> (B, T, C)
        return dropout(x + self.pe[positions, 0], self.p, self.training)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention named like `nn.MultiheadAttention` (fused `in_proj`)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # which of the cache's layers is ours
        self.nhead = config.nhead
        self.dropout = config.dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * config.d_model, config.d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * config.d_model))
        self.out_proj = nn.Linear(config.d_model, config.d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        cache: KVCache | None,
        input_pos: torch.Tensor,
        attend: AttendFn | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C): one fused matmul
        q, k, v = qkv.view(B, T, 3, self.nhead, C // self.nhead).permute(2, 0, 3, 1, 4)  # each (B, H, T, Dh)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, input_pos)  # (B, H, S, Dh)
        if attend is not None:
            y = attend(q, k, v)  # (B, H, T, Dh)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, is_causal=bias is None
            )  # (B, H, T, Dh)
        return linear(self.out_proj, y.transpose(1, 2).reshape(B, T, C))


class EncoderLayer(nn.Module):
    """Post-norm ReLU block with `nn.TransformerEncoderLayer`'s parameter names and math."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = SelfAttention(config, layer)
        self.linear1 = nn.Linear(config.d_model, config.d_ff)
        self.linear2 = nn.Linear(config.d_ff, config.d_model)
        self.norm1 = nn.LayerNorm(config.d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(config.d_model, eps=1e-5)
        self.p = config.dropout

    def forward(self, x, bias, cache, input_pos, attend=None):
        p, train = self.p, self.training
        x = layer_norm(self.norm1, x + dropout(self.self_attn(x, bias, cache, input_pos, attend), p, train))
        hidden = dropout(F.relu(linear(self.linear1, x)), p, train)  # (B, T, d_ff)
        return layer_norm(self.norm2, x + dropout(linear(self.linear2, hidden), p, train))


class Encoder(nn.Module):
    """Holds `layers` so that weight names read `transformer_encoder.layers.{i}...`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config, i) for i in range(config.n_layers))


class TransformerLM(nn.Module):
    """Decoder-only LM with the tutorial's weight names; batch-first, with an optional KV cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_encoder = PositionalEncoding(config)
        self.transformer_encoder = Encoder(config)
        self.decoder = nn.Linear(config.d_model, config.vocab_size)
        # The tutorial's init_weights.
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits `(B, T, V)` for `input_ids` `(B, T)` int64.

        input_pos: `(T,)` int64 cache slots of the columns (default `arange(T)`, a fresh sequence).
        start: `(B,)` int64 first valid slot per row of a left-padded batch (default: all 0).
        cache: when given, K/V of these columns are written at `input_pos` and the queries attend
        to every valid slot of the cache; without it they attend to these columns only (training).
        Row `b`'s token in slot `j` gets positional encoding `j - start[b]`; padding slots
        (`j < start[b]`) are never attended to, and their own outputs are finite but meaningless.
        """
        B, T = input_ids.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=input_ids.device)
        positions = row_positions(input_pos, start)
        if cache is None and start is None:
            bias = None  # plain causal attention over the T columns
        else:
            key_pos = torch.arange(cache.max_len, device=input_ids.device) if cache is not None else input_pos
            key_valid = None if start is None else key_pos[None, :] >= start[:, None]  # (B, S)
            bias = attention_bias(input_pos, key_pos, key_valid, self.decoder.weight.dtype)
        return self.run(input_ids, positions.expand(B, T), bias, cache, input_pos)

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        bias: torch.Tensor | None,
        cache: KVCache | None,
        input_pos: torch.Tensor,
        attend: AttendFn | None = None,
    ) -> torch.Tensor:
        """The network itself, given what `forward` derives: logits `(B, T, V)`.

        positions: `(B, T)` int64 positional-encoding rows. bias: `(B or 1, 1, T, S)` additive mask
        from `attention_bias`, or None for plain causal attention over the T columns (no cache).
        attend: computes attention in place of SDPA in every layer (then `bias` is unused).
        Exporters that take masks and positions as inputs (ONNX) and backends with their own
        attention kernels call this directly.
        """
        x = self.encoder(input_ids) * math.sqrt(self.config.d_model)  # (B, T, C)
        x = self.pos_encoder(x, positions)
        for layer in self.transformer_encoder.layers:
            x = layer(x, bias, cache, input_pos, attend)
        return self.decoder(x)  # (B, T, V)


def column_major_weights(model: TransformerLM) -> None:
    """Store each projection weight `(out, in)` column-major, i.e. as a contiguous `(in, out)`.

    Shapes, names and values stay the same; only the memory layout changes. Decoding multiplies a
    few rows by every weight matrix per token, which is bound by streaming the weights from memory,
    and on x86 CPUs `x @ W` with `W` contiguous `(in, out)` streams 30-40% faster than `x @ W.T`
    (measured on the 2-core CI CPU at d_model 256, batch 1 and 8). The eager and compile backends
    do this on the CPU.
    """
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.ndim == 2 and not isinstance(module, torch.nn.Embedding):
                param.data = param.data.t().contiguous().t()
