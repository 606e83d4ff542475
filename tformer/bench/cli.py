"""`tformer-bench`: which backend wins for this model on this machine; `tformer-bench kernels`:
our attention kernels against SDPA; `tformer-bench gpu-pass`: everything that needs a GPU, one report."""

from __future__ import annotations

import contextlib
import platform
import sys
import time
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from tformer.bench.gpupass import PARTS, TIME_LIMIT_S, run_gpu_pass
from tformer.bench.harness import ALL_BACKENDS, run_benchmarks, versions
from tformer.bench.kernels import IMPLS, KINDS, run_kernel_benchmarks
from tformer.bench.report import print_kernel_table, print_table, require_matplotlib, write_csv, write_json, write_plot
from tformer.checkpoint import load_model
from tformer.cli import CliError, Command, Group
from tformer.backends import BACKENDS, REFERENCE, create_backend
from tformer.config import ModelConfig
from tformer.engine.engine import DECODE_STEPS, DEFAULT_BATCH
from tformer.errors import TformerError
from tformer.files import keep_compiled_kernels_in_store
from tformer.model import TransformerLM
from tformer.runtime import Runtime, resolve_device, resolve_dtype

# The built-in model: the size of the speed targets in the issues (random weights time the same).
DEFAULT_MODEL = ModelConfig(vocab_size=256, d_model=256, nhead=4, d_ff=1024, n_layers=4)


class DefaultGroup(Group):
    """Runs `generate` when the first argument names no subcommand, so `tformer-bench [MODEL]`
    keeps meaning the generation benchmark and `tformer-bench kernels` is the kernel one."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["generate", *args]
        return super().parse_args(ctx, args)


CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(cls=DefaultGroup, context_settings=CONTEXT)
def main() -> None:
    """Benchmarks. `tformer-bench [MODEL] [OPTIONS]` (the `generate` command) times generation
    backends side by side; `tformer-bench kernels` times tformer's Triton attention kernels
    against PyTorch's SDPA; `tformer-bench gpu-pass` runs the CUDA tests and both benchmarks on a
    GPU into one dated report. `tformer-bench COMMAND --help` lists each one's options."""
    keep_compiled_kernels_in_store()


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f'expected comma-separated integers, got "{text}"') from None
    if not values or min(values) < 1:
        raise CliError(f'expected positive integers, got "{text}"')
    return values


def _name_list(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise CliError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {','.join(known)}")
    return names


@main.command("generate", cls=Command, context_settings=CONTEXT)
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--nhead", type=click.IntRange(min=1), help="Head count; required for a tutorial state_dict (.pt).")
@click.option("--backends", default=",".join(ALL_BACKENDS), show_default=True,
              help="Comma-separated rows; 'naive' is the tutorial's full-recompute loop, 'floor' a bare decode loop of the "
                   "same model, 'hf' HF generate, 'ct2' CTranslate2 running the same weights.")
@click.option("--batch-sizes", default="1,8", show_default=True, help="Comma-separated batch sizes, one row each.")
@click.option("--prompt-len", default=32, show_default=True, help="Prompt tokens per row.")
@click.option("--new-tokens", default=64, show_default=True, help="Tokens generated per row.")
@click.option("--device", help="cpu or cuda [default: cuda if available].")
@click.option("--dtype", default="fp32", show_default=True, help="fp32, bf16 or fp16.")
@click.option("--repeats", default=3, show_default=True,
              help="Timed rounds per batch size, each running every row once in a rotated order (median, min, max shown).")
@click.option("--warmup", default=1, show_default=True, help="Untimed runs first (compilation happens here).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch [default: torch's choice].")
@click.option("--seed", default=0, show_default=True, help="Seed of the random prompts (and weights without MODEL).")
@click.option("--warm-setup", is_flag=True,
              help="Also report compile/aot setup in the second process that measures memory (warm caches: cold vs warm compile).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every record as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write every record as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Plot tokens/s vs batch size (PNG).")
def generate(model, nhead, backends, batch_sizes, prompt_len, new_tokens, device, dtype, repeats, warmup, threads,
             seed, warm_setup, json_path, csv_path, plot_path) -> None:  # fmt: skip
    """Benchmark generation backends side by side on MODEL (default: a built-in random model).

    Reports time to first token, inter-token latency percentiles, decode and end-to-end
    tokens/s, peak memory and the speed-up over the tutorial's loop ('naive') and over eager.
    Each backend's greedy tokens are checked against eager first; a mismatch is flagged, never
    ranked. Timed runs are interleaved: each round runs every row once, in an order rotated each
    round; rows whose spread cannot tell them apart are marked as too noisy to rank. Peak memory
    is each row's own, measured in a process that sets up only that row. Backends that cannot
    run here are listed as skipped, with the reason.
    """
    names = _name_list(backends, ALL_BACKENDS, "backend(s)")
    sizes = _int_list(batch_sizes)
    if min(prompt_len, new_tokens, repeats) < 1 or warmup < 0:
        raise CliError("--prompt-len, --new-tokens and --repeats must be >= 1, --warmup >= 0")
    if plot_path:
        require_matplotlib()
    if threads:
        torch.set_num_threads(threads)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    lm, what = _model(model, nhead, seed)
    c = lm.config
    if prompt_len + new_tokens > c.max_len:
        raise CliError(f"--prompt-len + --new-tokens = {prompt_len + new_tokens} exceeds the context of {c.max_len}")
    title = (f"{what}: d_model {c.d_model}, {c.n_layers} layers, {c.nhead} heads, d_ff {c.d_ff}, vocab {c.vocab_size} | "
             f"prompt {prompt_len}, {new_tokens} new tokens, greedy | {dev.type} {str(dt).removeprefix('torch.')}, "
             f"torch {torch.__version__}")  # fmt: skip
    began = time.perf_counter()
    with _progress() as note:
        records = run_benchmarks(lm, names, sizes, prompt_len, new_tokens, dev, dt, repeats, warmup, seed,
                                 progress=note, warm_setup=warm_setup)  # fmt: skip
    print_table(records, title)
    meta = dict(model=what, config=c.__dict__, backends=names, batch_sizes=sizes, prompt_len=prompt_len,
                new_tokens=new_tokens, device=dev.type, dtype=str(dt).removeprefix("torch."), repeats=repeats,
                warmup=warmup, seed=seed, threads=torch.get_num_threads(), versions=versions(),
                platform=platform.platform(), python=platform.python_version(),
                seconds=round(time.perf_counter() - began, 1), command=_command_line())  # fmt: skip
    if json_path:
        write_json(json_path, records, meta)
    if csv_path:
        write_csv(csv_path, records)
    if plot_path:
        write_plot(plot_path, records, title)


@main.command("kernels", cls=Command, context_settings=CONTEXT)
@click.option("--kinds", default=",".join(KINDS), show_default=True,
              help="prefill (Tq = Tk = seq, causal) and/or decode (one query per row, a cache of seq keys).")  # fmt: skip
@click.option("--batch", "batches", default="1,8", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--heads", default="16", show_default=True, help="Head counts, comma-separated.")
@click.option("--seq", "seqs", default="512,1024,2048,4096,8192,16384", show_default=True,
              help="Sequence lengths (prefill) / cache lengths (decode).")  # fmt: skip
@click.option("--head-dim", "head_dims", default="64,128", show_default=True, help="Head dims (1..128).")
@click.option("--dtype", "dtypes", default="bf16", show_default=True, help="Comma-separated: fp32, fp16, bf16.")
@click.option("--impls", default=",".join(IMPLS), show_default=True,
              help="tformer (our Triton kernels), sdpa (torch scaled_dot_product_attention), naive (matmul-softmax-matmul).")  # fmt: skip
@click.option("--device", help="cuda [default], or cpu under TRITON_INTERPRET=1 (a smoke test: times mean nothing).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random q, k, v.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every record as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write every record as CSV.")
def kernels(kinds, batches, heads, seqs, head_dims, dtypes, impls, device, seed, json_path, csv_path) -> None:
    """Time tformer's Triton attention kernels against SDPA and a naive implementation.

    Prefill rows report TFLOP/s (causal pairs only), decode rows GB/s of K/V read and the share of
    the GPU's measured copy bandwidth. Each case checks our output against SDPA's first; a
    mismatch is flagged. Times are CUDA-event medians (triton.testing.do_bench).
    """
    kind_list = _name_list(kinds, KINDS, "kind(s)")
    impl_list = _name_list(impls, IMPLS, "implementation(s)")
    dtype_list = [resolve_dtype(d.strip()) for d in dtypes.split(",") if d.strip()]
    sizes = {name: _int_list(text) for name, text in dict(batch=batches, heads=heads, seq=seqs, head_dim=head_dims).items()}
    dev = resolve_device(device)
    try:
        from tformer.kernels.launch import INTERPRET, INTERPRET_HINT
    except ImportError:
        raise CliError("the kernel benchmark needs triton: pip install 'tformer[triton]'") from None
    if dev.type != "cuda" and not INTERPRET:
        raise CliError(f"the kernel benchmark needs a CUDA GPU; {INTERPRET_HINT} (a smoke test: interpreted times mean nothing)")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'cpu'} (Triton interpreter)"
    title = f"attention kernels on {name} | torch {torch.__version__}, triton {versions()['triton']}"
    began = time.perf_counter()
    with _progress() as note:
        records, copy_bw = run_kernel_benchmarks(kind_list, sizes["batch"], sizes["heads"], sizes["seq"], sizes["head_dim"],
                                                 dtype_list, dev, impl_list, seed, note, versions())  # fmt: skip
    print_kernel_table(records, title, copy_bw)
    meta = dict(device=dev.type, device_name=name, copy_bandwidth_gb_s=copy_bw, versions=versions(), seed=seed,
                platform=platform.platform(), seconds=round(time.perf_counter() - began, 1), command=_command_line())  # fmt: skip
    if json_path:
        write_json(json_path, records, meta)
    if csv_path:
        write_csv(csv_path, records)


@main.command("gpu-pass", cls=Command, context_settings=CONTEXT)
@click.option("--part", "parts", default="all", show_default=True,
              help=f"Comma-separated parts, run in this order: {','.join(PARTS)}; or all.")
@click.option("--out", default="docs/benchmarks", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the report, YYYY-MM-DD-gpu-DEVICE.md and .json.")
@click.option("--time-limit", default=TIME_LIMIT_S, show_default=True, type=click.IntRange(min=0),
              help="Seconds for this command (0 = none): a step still running then is stopped, later ones are not run, "
                   "and the report is written.")  # fmt: skip
@click.option("--dry-run", is_flag=True,
              help="Print what the pass runs; without a GPU, also run a tiny CPU stand-in of each step (report: DATE-gpu-dry-run).")  # fmt: skip
def gpu_pass(parts, out, time_limit, dry_run) -> None:
    """Run everything that needs a CUDA GPU and write one dated report (markdown and JSON).

    Parts: the tests' CUDA cases (pytest -m cuda); tformer-bench, every backend, at fp32 and at
    bf16 (batch 1, 8, 32; prompt 128 and 1024); tformer-bench kernels (prefill and decode against
    SDPA, seq 1k-16k, head dim 64 and 128). Each part is sized for one 10-minute command, and
    each adds its section to the same report (a part run again replaces its own). Exit status 1
    when a step failed, timed out, was not run or flagged a mismatch.
    """
    names = list(PARTS) if parts.strip() == "all" else _name_list(parts, tuple(PARTS), "part(s)")
    ordered = [name for name in PARTS if name in names]
    if not run_gpu_pass(ordered, Path(out), time_limit or None, dry_run, click.echo):
        click.get_current_context().exit(1)


@main.command("throughput", cls=Command, context_settings=CONTEXT)
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--nhead", type=click.IntRange(min=1), help="Head count; required for a tutorial state_dict (.pt).")
@click.option("--backends", default=REFERENCE, show_default=True, help="Comma-separated backends, each a pair of rows.")
@click.option("--requests", "count", default=64, show_default=True, type=click.IntRange(min=1), help="Requests in the workload.")
@click.option("--prompt-len", default="16:128", show_default=True, help="Prompt tokens, LOW:HIGH (uniform) or N.")
@click.option("--output-len", default="16:256", show_default=True, help="Output tokens, LOW:HIGH (uniform) or N (EOS ignored).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Cache rows: requests running at once, in both batching modes.")  # fmt: skip
@click.option("--rate", type=click.FloatRange(min=0, min_open=True),
              help="Poisson arrivals at this many requests/s [default: all at once].")  # fmt: skip
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1),
              help="Timed rounds, each running every row once in a rotated order (the median run is shown).")  # fmt: skip
@click.option("--device", help="cpu or cuda [default: cuda if available].")
@click.option("--dtype", default="fp32", show_default=True, help="fp32, bf16 or fp16.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch [default: torch's choice].")
@click.option("--seed", default=0, show_default=True, help="Seed of the workload (and weights without MODEL).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every record as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write every record as CSV.")
def throughput(model, nhead, backends, count, prompt_len, output_len, batch_size, rate, repeats, device, dtype, threads,
               seed, json_path, csv_path) -> None:  # fmt: skip
    """Serve a workload of requests through the engine: continuous batching against static
    batching of the same size (requests admitted only into an empty batch), per backend, side by
    side in one run.

    Reports, with vLLM's names, request/s, output tokens/s, and the mean, median and p99 of TTFT,
    TPOT (time per output token after the first) and end-to-end latency. Greedy, EOS ignored.
    """
    from tformer.bench.report import print_throughput_table
    from tformer.bench.throughput import Workload, parse_range, run_throughput

    names = _name_list(backends, tuple(BACKENDS), "backend(s)")
    prompts, outputs = parse_range(prompt_len, "--prompt-len"), parse_range(output_len, "--output-len")
    if threads:
        torch.set_num_threads(threads)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    lm, what = _model(model, nhead, seed)
    c = lm.config
    if prompts[1] + outputs[1] > c.max_len:
        raise CliError(f"the longest request ({prompts[1]} + {outputs[1]} tokens) exceeds the context of {c.max_len}")
    workload = Workload.draw(count, prompts, outputs, c.vocab_size, rate, seed)
    title = (f"{what}: d_model {c.d_model}, {c.n_layers} layers | {count} requests, prompts {prompt_len}, outputs "
             f"{output_len}, batch {batch_size}, " + (f"{rate:g} req/s Poisson" if rate else "all at once") +
             f" | {dev.type} {str(dt).removeprefix('torch.')}, torch {torch.__version__}")  # fmt: skip
    began = time.perf_counter()
    with _progress() as note:
        runtimes = {}
        for name in names:
            note(f"{name}: setting up")
            try:
                runtimes[name] = Runtime.from_model(lm, backend=name, device=dev, dtype=dt, max_batch_size=batch_size,
                                                    max_len=workload.longest)  # fmt: skip
            except TformerError as exc:
                runtimes[name] = str(exc)
        records = run_throughput(runtimes, workload, batch_size, repeats, rate, note)
    print_throughput_table(records, title)
    meta = dict(model=what, config=c.__dict__, backends=names, requests=count, prompt_len=prompts, output_len=outputs,
                batch_size=batch_size, rate=rate, repeats=repeats, device=dev.type, dtype=str(dt).removeprefix("torch."),
                seed=seed, threads=torch.get_num_threads(), versions=versions(), platform=platform.platform(),
                seconds=round(time.perf_counter() - began, 1), command=_command_line())  # fmt: skip
    if json_path:
        write_json(json_path, records, meta)
    if csv_path:
        write_csv(csv_path, records)


@main.command("engine", cls=Command, context_settings=CONTEXT)
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--nhead", type=click.IntRange(min=1), help="Head count; required for a tutorial state_dict (.pt).")
@click.option("--backends", default="null,eager", show_default=True,
              help="Comma-separated: null (no model work: the engine alone) and tformer backends.")  # fmt: skip
@click.option("--batch-sizes", default="1,16,64", show_default=True, help="Comma-separated rows decoding together.")
@click.option("--steps", default=128, show_default=True, type=click.IntRange(min=1), help="Decode steps timed per round.")
@click.option("--decode-steps", default=DECODE_STEPS, show_default=True, type=click.IntRange(min=1),
              help="Decode steps the engine runs in a row per turn (1: a turn per step).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed rounds, each running every row once in a rotated order.")  # fmt: skip
@click.option("--device", help="cpu or cuda [default: cuda if available].")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch [default: torch's choice].")
@click.option("--seed", default=0, show_default=True, help="Seed of the weights without MODEL.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every record as JSON.")
def engine(model, nhead, backends, batch_sizes, steps, decode_steps, repeats, device, threads, seed, json_path) -> None:
    """The engine's host cost: steps/s over a backend that does no model work (`null`), and for
    each real backend the host time of a decode step beyond its backend call.

    Reports per backend and batch size the time of a decode step, the backend call within it and
    their difference, in microseconds (median, min-max over interleaved rounds), and steps/s.
    """
    from tformer.bench.hostpath import NullBackend, run_host_path
    from tformer.bench.report import print_host_table

    names = _name_list(backends, ("null", *BACKENDS), "backend(s)")
    sizes = _int_list(batch_sizes)
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    lm, what = _model(model, nhead, seed)
    c = lm.config
    if steps + 8 > c.max_len:
        raise CliError(f"--steps {steps} does not fit the context of {c.max_len} tokens")
    title = f"{what}: d_model {c.d_model}, {c.n_layers} layers | {dev.type}, torch {torch.__version__}"
    began = time.perf_counter()
    with _progress() as note:
        built = {}
        for name in names:
            note(f"{name}: setting up")
            try:
                built[name] = NullBackend(c, max(sizes), dev) if name == "null" else create_backend(name, lm, dev, torch.float32)
            except TformerError as exc:
                raise CliError(f"{name}: {exc}") from None
        records = run_host_path(built, sizes, steps, repeats, note, decode_steps)
    print_host_table(records, title)
    meta = dict(model=what, config=c.__dict__, backends=names, batch_sizes=sizes, steps=steps, repeats=repeats,
                decode_steps=decode_steps, device=dev.type, threads=torch.get_num_threads(), versions=versions(), platform=platform.platform(),
                seconds=round(time.perf_counter() - began, 1), command=_command_line())  # fmt: skip
    if json_path:
        write_json(json_path, records, meta)


@main.command("serve", cls=Command, context_settings=CONTEXT)
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--url", help="Base URL of a running OpenAI-compatible server, e.g. http://127.0.0.1:8000 (instead of MODEL).")
@click.option("--model", "model_name",
              help="Served model name to request [default: the first that GET /v1/models lists]; with MODEL, the name "
                   "`tformer serve` serves it under.")  # fmt: skip
@click.option("--num-prompts", default=64, show_default=True, type=click.IntRange(min=1), help="Requests per run.")
@click.option("--request-rate", default="inf", show_default=True,
              help="Poisson arrivals at R requests/s, or inf (all at once); a comma list (1,2,inf) runs a sweep, one row each.")  # fmt: skip
@click.option("--prompt-len", default="16:128", show_default=True, help="Prompt tokens, LOW:HIGH (uniform) or N.")
@click.option("--output-len", default="16:256", show_default=True, help="Output tokens (max_tokens), LOW:HIGH (uniform) or N.")
@click.option("--seed", default=0, show_default=True, help="Seed of the prompts, their lengths and the arrivals.")
@click.option("--max-concurrency", type=click.IntRange(min=1), help="Most requests in flight at once [default: no cap].")
@click.option("--vocab-size", type=click.IntRange(min=2),
              help="Random prompt ids are below this [default: the server's vocab_size in /v1/models, else 256].")  # fmt: skip
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
              help="Send ignore_eos (vLLM's extension; tformer serve honours it) so that every request makes max_tokens.")  # fmt: skip
@click.option("--offline", is_flag=True,
              help="MODEL only: also run the same workload through tformer's engine in this process, in turn with the "
                   "HTTP runs (rows 'offline engine'), to show what HTTP costs: the ratios print below the table.")  # fmt: skip
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1),
              help="Rounds of every run; with --offline the two kinds alternate in each round, and their ratios are "
                   "given as median (min-max) over the rounds.")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1),
              help="MODEL only: torch threads of the server's engine and of the offline one [default: torch's own].")
@click.option("--stream-interval", type=click.IntRange(min=1),
              help="MODEL only: the server's --stream-interval (tokens per streamed chunk) [default: 1].")
@click.option("--nhead", type=click.IntRange(min=1), help="MODEL only: head count; required for a tutorial state_dict (.pt).")
@click.option("--backend", type=click.Choice(list(BACKENDS)), help=f"MODEL only: the backend to serve with [default: {REFERENCE}].")
@click.option("--tokenizer", type=click.Path(dir_okay=False), help="MODEL only: a tokenizer.json for the server (decodes its output).")
@click.option("--max-batch-size", default=DEFAULT_BATCH, show_default=True, type=click.IntRange(min=1),
              help="MODEL only: cache rows of the server (and of the offline engine).")  # fmt: skip
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every record, the settings and versions as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Plot TTFT and TPOT p50/p99 against request rate (PNG).")
def serve(model, url, model_name, num_prompts, request_rate, prompt_len, output_len, seed, max_concurrency, vocab_size,
          ignore_eos, offline, repeats, threads, stream_interval, nhead, backend, tokenizer, max_batch_size, json_path,
          plot_path) -> None:  # fmt: skip
    """Load-test an OpenAI-compatible server (vLLM `bench serve` style): MODEL starts `tformer
    serve MODEL` on a free local port for the runs; --url measures a server already running.

    Streams POST /v1/completions with random token-id prompts (seeded; no tokenizer needed),
    greedy, and reports per request rate, with vLLM's names, completed and failed requests,
    request/s, output and total tokens/s, and the mean, median (p50) and p99 of TTFT, TPOT (time
    per output token after the first), ITL (gaps between streamed chunks) and end-to-end latency,
    and the CPU microseconds per output token of this client and, with MODEL, of the server's
    process and its engine process (Linux). A failed request is counted and its error kept, never
    fatal. OPENAI_API_KEY, if set, is sent as a bearer token.
    """
    from tformer.bench.report import print_serve_table, write_serve_plot
    from tformer.bench.serve import (ServeSettings, benchmark_model, benchmark_url, parse_rates, rate_label, ratios,
                                     require_aiohttp)  # fmt: skip
    from tformer.bench.throughput import parse_range

    if (model is None) == (url is None):
        raise CliError("give MODEL (to start tformer serve) or --url (a running server), exactly one")
    local_only = dict(offline=offline, nhead=nhead, backend=backend, tokenizer=tokenizer, threads=threads,
                      stream_interval=stream_interval)
    if url and any(local_only.values()):
        raise CliError(f"--{next(k for k, v in local_only.items() if v)} needs MODEL: it configures the server tformer-bench starts")
    require_aiohttp()
    if plot_path:
        require_matplotlib()
    settings = ServeSettings(parse_rates(request_rate), num_prompts, parse_range(prompt_len, "--prompt-len"),
                             parse_range(output_len, "--output-len"), seed, max_concurrency, model_name, vocab_size,
                             ignore_eos)  # fmt: skip
    began = time.perf_counter()
    with _progress() as note:
        if url:
            records, server = benchmark_url(url, settings, note, repeats)
        else:
            records, server = benchmark_model(model, settings, nhead, backend, tokenizer, max_batch_size, offline, note,
                                              repeats, threads, stream_interval or 1)  # fmt: skip
    title = (f"{model or server['url']}: model {server['model']} | {num_prompts} requests, prompts {prompt_len}, outputs "
             f"{output_len}, rates {','.join(map(rate_label, settings.rates))} req/s, max concurrency "
             f"{max_concurrency or 'none'}, random ids below {server['vocab_size']} ({server['vocab_from']})")  # fmt: skip
    against = ratios(records)
    print_serve_table(records, title, against)
    meta = dict(model=model, url=server["url"], served_model=server["model"], vocab_size=server["vocab_size"],
                vocab_from=server["vocab_from"], num_prompts=num_prompts, request_rates=list(settings.rates),
                prompt_len=settings.prompt_len, output_len=settings.output_len, seed=seed, max_concurrency=max_concurrency,
                ignore_eos=ignore_eos, offline=offline, repeats=repeats, threads=threads, stream_interval=stream_interval,
                http_over_offline=against, backend=backend, max_batch_size=max_batch_size if model else None,
                versions=versions(), platform=platform.platform(), python=platform.python_version(),
                seconds=round(time.perf_counter() - began, 1), command=_command_line())  # fmt: skip
    if json_path:
        write_json(json_path, records, meta)
    if plot_path:
        write_serve_plot(plot_path, records, title)


def _model(path: str | None, nhead: int | None, seed: int) -> tuple[TransformerLM, str]:
    """MODEL's weights, or the built-in model with random weights (they time the same)."""
    if path:
        return load_model(path, nhead)[0], path
    torch.manual_seed(seed)
    return TransformerLM(DEFAULT_MODEL).eval(), "built-in random model"


@contextlib.contextmanager
def _progress():
    """A spinner on stderr; yields `note(text)`, which updates its description."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting")
        yield lambda text: bar.update(task, description=text)


def _command_line() -> str:
    return " ".join(["tformer-bench", *sys.argv[1:]])


if __name__ == "__main__":
    main(prog_name="tformer-bench")
