"""Decode speed, side by side in one run: the tutorial's loop vs tformer eager vs HF generate.

    tformer-bench                      # d_model 256, 4 layers, 16-token prompt, 256 new tokens
    python -m tformer.bench.decode --batch 8 --json out.json

Every row generates greedily from the same random prompt with a model of the same size:
- seed: the tutorial's step 5, re-running the whole sequence for every token (no cache), on the
  tutorial's own `TransformerModel`;
- eager: `tformer` with its KV cache, same weights as seed (its tokens are checked against seed's);
- hf: `transformers`' `GPT2LMHeadModel.generate` (KV cache), same sizes, ReLU, random weights:
  what users would otherwise pick. Skipped, with the reason, when transformers is missing.
Figures are tokens/s over the whole generation (prefill included), median of `--repeats` timed runs
after one warm-up run, the rows timed in turn. The full multi-backend harness builds on this.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import click
import torch
from rich.console import Console
from rich.table import Table

from tformer.config import ModelConfig
from tformer.model import TransformerLM
from tformer.runtime import Runtime
from tformer.seed import TransformerModel, generate_full_recompute


@dataclass
class Row:
    name: str
    tokens_per_s: float | None
    ms_per_token: float | None
    runs_s: list[float]
    matches_seed: bool | None
    note: str = ""


def time_interleaved(
    runners: dict[str, Callable[[], list[list[int]]]], repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[list[int]]]]:
    """One untimed warm-up per runner, then `repeats` rounds that time each runner once in turn.

    Interleaving spreads the drift and noise of a shared machine over all rows alike, so their
    ratios stay honest. Returns the seconds of each run and the tokens of the warm-up run.
    """
    tokens = {name: run() for name, run in runners.items()}
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - began)
    return seconds, tokens


def hf_runner(config: ModelConfig, prompts: torch.Tensor, new_tokens: int, device: torch.device):
    """HF GPT-2 of the same sizes, greedy with its KV cache; None and a reason when unavailable."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None, "transformers is not installed (pip install 'tformer[hf]')"
    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=prompts.shape[1] + new_tokens, n_embd=config.d_model,
        n_layer=config.n_layers, n_head=config.nhead, n_inner=config.d_ff, activation_function="relu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(hf_config).to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = prompts.to(device)

    def run() -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, use_cache=True,
            )  # fmt: skip
        return out[:, ids.shape[1]:].tolist()

    return run, f"transformers {__import__('transformers').__version__}"


def run_benchmark(
    config: ModelConfig, batch: int, prompt_len: int, new_tokens: int, repeats: int, device: torch.device
) -> list[Row]:
    torch.manual_seed(0)
    seed_model = TransformerModel(config.vocab_size, config.d_model, config.nhead, config.d_ff, config.n_layers, 0.0)
    seed_model = seed_model.to(device).eval()
    prompts = torch.randint(0, config.vocab_size, (batch, prompt_len))
    model = TransformerLM(config)
    model.load_state_dict(seed_model.state_dict())
    runtime = Runtime.from_model(model, device=device)
    candidates = {
        "seed": (lambda: generate_full_recompute(seed_model, prompts.tolist(), new_tokens), "full recompute, no cache"),
        "eager": (lambda: runtime.generate_ids(prompts.tolist(), max_new_tokens=new_tokens, temperature=0), "KV cache, SDPA"),
        "hf": hf_runner(config, prompts, new_tokens, device),
    }  # fmt: skip
    runnable = {name: run for name, (run, _) in candidates.items() if run is not None}
    seconds, tokens = time_interleaved(runnable, repeats, device)
    rows = []
    for name, (run, note) in candidates.items():
        if run is None:
            rows.append(Row(name, None, None, [], None, f"skipped: {note}"))
            continue
        median = statistics.median(seconds[name])
        matches = tokens[name] == tokens["seed"] if name == "eager" else None  # hf has other weights
        rows.append(Row(name, batch * new_tokens / median, 1000 * median / new_tokens, seconds[name], matches, note))
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--d-model", default=256, show_default=True)
@click.option("--layers", default=4, show_default=True)
@click.option("--heads", default=4, show_default=True)
@click.option("--d-ff", default=1024, show_default=True)
@click.option("--vocab-size", default=256, show_default=True)
@click.option("--batch", default=1, show_default=True)
@click.option("--prompt-len", default=16, show_default=True)
@click.option("--new-tokens", default=256, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Timed runs per row (median reported).")
@click.option("--threads", default=2, show_default=True, help="torch CPU threads.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results as JSON.")
def main(d_model, layers, heads, d_ff, vocab_size, batch, prompt_len, new_tokens, repeats, threads, device, json_path):
    """Greedy decode tokens/s: the tutorial's full-recompute loop vs tformer eager vs HF generate."""
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("CUDA is not available on this machine; use --device cpu")
    torch.set_num_threads(threads)
    config = ModelConfig(vocab_size, d_model, heads, d_ff, layers, max_len=max(5000, prompt_len + new_tokens))
    dev = torch.device(device)
    rows = run_benchmark(config, batch, prompt_len, new_tokens, repeats, dev)
    by_name = {r.name: r for r in rows}
    table = Table(title=(
        f"greedy decode, batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, d_model {d_model}, "
        f"{layers} layers, {heads} heads, d_ff {d_ff}, vocab {vocab_size}, {device}, {threads} threads, "
        f"torch {torch.__version__}"
    ))  # fmt: skip
    for column in ("row", "tokens/s", "ms/token", "x seed", "x hf", "tokens == seed", "note"):
        table.add_column(column, justify="left" if column in ("row", "note") else "right")
    for r in rows:
        ratio = lambda other: f"{r.tokens_per_s / other.tokens_per_s:.2f}" if r.tokens_per_s and other and other.tokens_per_s else "-"  # noqa: E731
        table.add_row(
            r.name, f"{r.tokens_per_s:.0f}" if r.tokens_per_s else "-", f"{r.ms_per_token:.2f}" if r.ms_per_token else "-",
            ratio(by_name["seed"]), ratio(by_name.get("hf")), {None: "-", True: "yes", False: "NO"}[r.matches_seed], r.note,
        )  # fmt: skip
    Console().print(table)
    if json_path:
        meta = dict(torch=torch.__version__, machine=platform.machine(), processor=platform.processor(), threads=threads,
                    device=device, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, config=asdict(config))  # fmt: skip
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
