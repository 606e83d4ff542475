"""Model hyper-parameters, passed explicitly to everything that builds or checks a model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from tformer.errors import TformerError


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the tutorial's `TransformerModel(ntoken, ninp, nhead, nhid, nlayers, dropout)`.

    `max_len` is the length of the sinusoidal table `pos_encoder.pe` (5000 in the tutorial) and so
    the model's context: positions at or beyond it have no encoding.
    """

    vocab_size: int  # ntoken
    d_model: int = 256  # ninp
    nhead: int = 4
    d_ff: int = 1024  # nhid
    n_layers: int = 4  # nlayers
    max_len: int = 5000
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "nhead", "d_ff", "n_layers", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TformerError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.nhead:
            raise TformerError(
                f"nhead={self.nhead} does not divide d_model={self.d_model}; "
                f"pick a head count that divides {self.d_model}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise TformerError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.nhead

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
