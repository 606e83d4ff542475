"""`tformer-bench`: which backend wins for this model on this machine."""

from __future__ import annotations

import platform
import sys
import time

import click
import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from tformer.bench.harness import ALL_BACKENDS, KNOWN_BACKENDS, run_benchmarks, versions
from tformer.bench.report import print_table, require_matplotlib, write_csv, write_json, write_plot
from tformer.checkpoint import load_model
from tformer.cli import CliError, Command
from tformer.config import ModelConfig
from tformer.model import TransformerLM
from tformer.runtime import resolve_device, resolve_dtype

# The built-in model: the size of the speed targets in the issues (random weights time the same).
DEFAULT_MODEL = ModelConfig(vocab_size=256, d_model=256, nhead=4, d_ff=1024, n_layers=4)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f'expected comma-separated integers, got "{text}"') from None
    if not values or min(values) < 1:
        raise CliError(f'expected positive integers, got "{text}"')
    return values


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--nhead", type=int, help="Head count; required for a tutorial state_dict (.pt).")
@click.option("--backends", default=",".join(ALL_BACKENDS), show_default=True,
              help="Comma-separated rows, also 'aot'; 'naive' is the tutorial's full-recompute loop, 'hf' is HF generate.")
@click.option("--batch-sizes", default="1,8", show_default=True)
@click.option("--prompt-len", default=32, show_default=True, help="Prompt tokens per row.")
@click.option("--new-tokens", default=64, show_default=True, help="Tokens generated per row.")
@click.option("--device", help="cpu or cuda [default: cuda if available].")
@click.option("--dtype", default="fp32", show_default=True, help="fp32, bf16 or fp16.")
@click.option("--repeats", default=3, show_default=True, help="Timed runs per row (median, min, max shown).")
@click.option("--warmup", default=1, show_default=True, help="Untimed runs first (compilation happens here).")
@click.option("--threads", type=int, help="CPU threads for torch [default: torch's choice].")
@click.option("--seed", default=0, show_default=True, help="Seed of the random prompts (and weights without MODEL).")
@click.option("--warm-setup", is_flag=True,
              help="Also time compile/aot setup in a second process with warm caches (cold vs warm compile).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every record as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write every record as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Plot tokens/s vs batch size (PNG).")
def main(model, nhead, backends, batch_sizes, prompt_len, new_tokens, device, dtype, repeats, warmup, threads,
         seed, warm_setup, json_path, csv_path, plot_path) -> None:  # fmt: skip
    """Benchmark generation backends side by side on MODEL (default: a built-in random model).

    Reports time to first token, inter-token latency percentiles, decode and end-to-end
    tokens/s, peak memory and the speed-up over the tutorial's loop ('naive') and over eager.
    Each backend's greedy tokens are checked against eager first; a mismatch is flagged, never
    ranked. Backends that cannot run here are listed as skipped, with the reason.
    """
    names = [b.strip() for b in backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in KNOWN_BACKENDS]
    if unknown:
        raise CliError(f"unknown backend(s) {', '.join(unknown)}; choose from {','.join(KNOWN_BACKENDS)}")
    sizes = _int_list(batch_sizes)
    if min(prompt_len, new_tokens, repeats) < 1 or warmup < 0:
        raise CliError("--prompt-len, --new-tokens and --repeats must be >= 1, --warmup >= 0")
    if plot_path:
        require_matplotlib()
    if threads:
        torch.set_num_threads(threads)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if model:
        lm, _ = load_model(model, nhead)
        what = f"{model}"
    else:
        torch.manual_seed(seed)
        lm, what = TransformerLM(DEFAULT_MODEL).eval(), "built-in random model"
    c = lm.config
    if prompt_len + new_tokens > c.max_len:
        raise CliError(f"--prompt-len + --new-tokens = {prompt_len + new_tokens} exceeds the context of {c.max_len}")
    title = (f"{what}: d_model {c.d_model}, {c.n_layers} layers, {c.nhead} heads, d_ff {c.d_ff}, vocab {c.vocab_size} | "
             f"prompt {prompt_len}, {new_tokens} new tokens, greedy | {dev.type} {str(dt).removeprefix('torch.')}, "
             f"torch {torch.__version__}")  # fmt: skip
    began = time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting")
        records = run_benchmarks(lm, names, sizes, prompt_len, new_tokens, dev, dt, repeats, warmup, seed,
                                 progress=lambda text: bar.update(task, description=text), warm_setup=warm_setup)  # fmt: skip
    print_table(records, title)
    meta = dict(model=what, config=c.__dict__, backends=names, batch_sizes=sizes, prompt_len=prompt_len,
                new_tokens=new_tokens, device=dev.type, dtype=str(dt).removeprefix("torch."), repeats=repeats,
                warmup=warmup, seed=seed, threads=torch.get_num_threads(), versions=versions(),
                platform=platform.platform(), python=platform.python_version(),
                seconds=round(time.perf_counter() - began, 1), command=" ".join(["tformer-bench", *sys.argv[1:]]))  # fmt: skip
    if json_path:
        write_json(json_path, records, meta)
    if csv_path:
        write_csv(csv_path, records)
    if plot_path:
        write_plot(plot_path, records, title)


if __name__ == "__main__":
    main(prog_name="tformer-bench")
