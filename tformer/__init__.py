"""tformer: fast, portable inference and export for the classic PyTorch transformer LM.

    import tformer
    rt = tformer.load("model.safetensors")            # or a tutorial state_dict + nhead=
    [out.text for out in rt.generate(["def main(", "import "], max_new_tokens=64, temperature=0)]
"""

from tformer.config import ModelConfig
from tformer.errors import TformerError
from tformer.engine import Engine, Output, Piece, SamplingParams
from tformer.model import KVCache, TransformerLM
from tformer.runtime import Runtime, load
from tformer.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "KVCache",
    "ModelConfig",
    "Output",
    "Piece",
    "Runtime",
    "SamplingParams",
    "TformerError",
    "Tokenizer",
    "TransformerLM",
    "load",
]
