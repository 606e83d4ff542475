"""Training, the tutorial's recipe: CrossEntropyLoss, Adam, batches from a DataLoader.

The built-in default corpus is the Python standard library's own source, which every Python
install has, so `tformer demo` trains a model that writes Python-looking text with no download.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from tformer.config import ModelConfig
from tformer.errors import TformerError
from tformer.inputs import as_float, as_int
from tformer.model import TransformerLM
from tformer.tokenizer import EOS_TOKEN, Tokenizer

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 450
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    seed: int = 0
    val_fraction: float = 0.1
    eval_every: int = 100
    eval_batches: int = 8

    def __post_init__(self) -> None:
        # Refused up front: a bad value would otherwise train for minutes and write garbage.
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            object.__setattr__(self, name, as_int(name, getattr(self, name), minimum=1))
        object.__setattr__(self, "seed", as_int("seed", self.seed, minimum=0, maximum=2**64 - 1))
        lr = as_float("lr", self.lr, "a finite number in (0, 1]")
        if not 0 < lr <= 1:
            raise TformerError(f"lr must be a finite number in (0, 1] (Adam's usual range is 1e-4 to 1e-2), got {lr}")
        object.__setattr__(self, "lr", lr)
        if not 0 < self.val_fraction < 1:
            raise TformerError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class TrainReport:
    train_loss: float
    val_loss: float
    seconds: float
    train_tokens: int
    val_tokens: int


def default_corpus() -> list[Path]:
    """The standard library's top-level `.py` files (about 5 MB): present wherever Python is."""
    return sorted(Path(os.__file__).parent.glob("*.py"))


def read_corpus(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Texts of the given files; a directory contributes its .py/.txt/.md/.rst files, recursively."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise TformerError(f"{p}: corpus file not found")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TformerError(f"the corpus ({', '.join(map(str, paths))}) holds no text; pass text files or directories")
    return texts


class TokenWindows(Dataset):
    """Overlapping windows of `seq_len + 1` tokens from one long token stream: (input, target)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.stride = max(1, seq_len // 2)
        self.count = (len(tokens) - seq_len - 1) // self.stride + 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.tokens[i * self.stride : i * self.stride + self.seq_len + 1]
        return window[:-1], window[1:]


def train(
    texts: Sequence[str],
    model_config: ModelConfig,
    train_config: TrainConfig,
    tokenizer: Tokenizer | None = None,
    progress: bool = True,
) -> tuple[TransformerLM, Tokenizer, TrainReport]:
    """Train a tokenizer (unless given) and a `TransformerLM` on `texts`.

    The token stream (documents joined by EOS) is split: the last `val_fraction` is held out for
    the validation loss. Returns the model in eval mode, the tokenizer and the final losses.
    """
    torch.manual_seed(train_config.seed)
    began = time.perf_counter()
    if tokenizer is None:
        tokenizer = Tokenizer.train(texts, model_config.vocab_size)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise TformerError(f"tokenizer has {tokenizer.vocab_size} ids but vocab_size is {model_config.vocab_size}")
    if train_config.seq_len > model_config.max_len:
        raise TformerError(f"seq_len {train_config.seq_len} exceeds the context max_len {model_config.max_len}")
    tokens = torch.tensor(tokenizer.encode(EOS_TOKEN.join(texts)), dtype=torch.long)
    split = int(len(tokens) * (1 - train_config.val_fraction))
    train_set = TokenWindows(tokens[:split], train_config.seq_len)
    val_set = TokenWindows(tokens[split:], train_config.seq_len)
    if len(train_set) < 1 or len(val_set) < 1:
        raise TformerError(
            f"the corpus has only {len(tokens)} tokens, too few for seq_len {train_config.seq_len}; "
            "add text or lower --seq-len"
        )
    loader = DataLoader(
        train_set,
        batch_size=train_config.batch_size,
        shuffle=True,
        drop_last=len(train_set) >= train_config.batch_size,
        generator=torch.Generator().manual_seed(train_config.seed),
    )
    model = TransformerLM(model_config)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, train_config.steps))

    columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
    val_loss, running = float("nan"), None
    with Progress(*columns, disable=not progress, console=Console(stderr=True)) as bar:
        task = bar.add_task("train", total=train_config.steps, status="")
        step, batches = 0, _forever(loader)
        model.train()
        while step < train_config.steps:
            x, y = next(batches)
            loss = criterion(model(x).flatten(0, 1), y.flatten())
            if not torch.isfinite(loss):
                raise TformerError(
                    f"training diverged at step {step + 1}: the loss is {loss.item()}; nothing was written. "
                    f"Lower --lr (now {train_config.lr:g}) or raise --batch-size"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if step % train_config.eval_every == 0 or step == train_config.steps:
                val_loss = evaluate(model, val_set, criterion, train_config)
                if not math.isfinite(val_loss):  # the last update can break the weights after the last loss
                    raise TformerError(f"training diverged at step {step}: the validation loss is {val_loss}; nothing "
                                   f"was written. Lower --lr (now {train_config.lr:g})")  # fmt: skip
                model.train()
            bar.update(task, advance=1, status=f"loss {running:.3f}  val {val_loss:.3f}")
    model.eval()
    report = TrainReport(running, val_loss, time.perf_counter() - began, split, len(tokens) - split)
    return model, tokenizer, report


@torch.no_grad()
def evaluate(model: TransformerLM, dataset: TokenWindows, criterion: nn.Module, config: TrainConfig) -> float:
    """Mean loss over up to `eval_batches` evenly spread batches of `dataset` (deterministic)."""
    model.eval()
    n = min(len(dataset), config.eval_batches * config.batch_size)
    picks = torch.linspace(0, len(dataset) - 1, n).long().tolist()
    losses = []
    for i in range(0, n, config.batch_size):
        x, y = zip(*(dataset[j] for j in picks[i : i + config.batch_size]))
        losses.append(criterion(model(torch.stack(x)).flatten(0, 1), torch.stack(y).flatten()).item())
    return sum(losses) / len(losses)


def _forever(loader: DataLoader):
    while True:
        yield from loader


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10%: Adam at a fixed lr is
    unstable early for post-norm transformers, and decay buys a lower final loss in a short run."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
