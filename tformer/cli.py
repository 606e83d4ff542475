"""Command line: `tformer train | generate | demo | info | serve`, plus `tformer-export` and `tformer-bench`.

Bad input ends in one line, `Error: <problem and fix>`, and exit code 2; never a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import click
import torch

from tformer.checkpoint import convert_checkpoint, load_checkpoint, load_model, save_checkpoint
from tformer.config import ModelConfig
from tformer.engine.engine import DECODE_STEPS, DEFAULT_BATCH
from tformer.errors import TformerError, TformerNote
from tformer.export.formats import FORMATS
from tformer.export.onnx import DEFAULT_OPSET, OPSETS
from tformer.files import check_writable, keep_compiled_kernels_in_store
from tformer.model import TransformerLM
from tformer.runtime import load
from tformer.tokenizer import Tokenizer
from tformer.train import TrainConfig, default_corpus, read_corpus, train

DEMO_PROMPTS = ("def ", "class ", "import os\n")
DEFAULT_TRAIN = TrainConfig()
DEMO_MODEL = ModelConfig(vocab_size=768, d_model=128, nhead=4, d_ff=512, n_layers=3, dropout=0.0)


class CliError(click.ClickException):
    exit_code = 2


class FriendlyErrors:
    """Every error a command ends with is one line on stderr, `Error: ...`: TformerError, OSError
    and click's usage errors exit with code 2, Ctrl-C with 130 (128 + SIGINT, as shells report it).
    TformerNote warnings become `note: ...` lines."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:  # click would print the usage, a hint and the error on 3 lines
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            click.echo(f"Error: {exc.format_message()}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C (click has already closed the ^C line)
            click.echo("Interrupted: nothing was left half-written.", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):
        with warnings.catch_warnings():  # restores showwarning afterwards
            fallback = warnings.showwarning

            def show(message, category, *args, **kwargs) -> None:
                if issubclass(category, TformerNote):
                    click.echo(f"note: {message}", err=True)
                else:
                    fallback(message, category, *args, **kwargs)

            warnings.showwarning = show
            try:
                return super().invoke(ctx)
            except TformerError as exc:
                raise CliError(str(exc)) from None
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # stdout closed early (`| head`): click exits quietly
                    raise
                raise CliError(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from None


class Group(FriendlyErrors, click.Group):
    pass


class Command(FriendlyErrors, click.Command):
    pass


CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(package_name="tformer")
def cli() -> None:
    """Train, run and inspect transformer language models from the classic PyTorch tutorial.

    Start with `tformer demo`: it trains a small model on Python's own standard library
    (about two minutes on a laptop CPU) and generates from it.
    """
    keep_compiled_kernels_in_store()


NHEAD_HELP = ("Head count; required for a tutorial state_dict (.pt), which does not store it. A wrong count "
              "that divides d_model cannot be detected: it silently gives another model.")


def _options(*options):
    """Apply click options so that --help lists them in the order given."""

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


model_options = _options(
    click.option("--backend", help="Engine: eager, compile, onnx, aot, triton, naive [default: eager; for an export directory, its own]."),
    click.option("--device", help="cpu or cuda [default: cuda if available]."),
    click.option("--dtype", help="fp32, bf16 or fp16 [default: fp32]."),
    click.option("--nhead", type=click.IntRange(min=1), help=NHEAD_HELP),
    click.option("--tokenizer", type=click.Path(dir_okay=False), help="tokenizer.json to use."),
)
sampling_options = _options(
    click.option("--max-new-tokens", "-n", default=128, show_default=True, type=click.IntRange(min=1), help="Tokens to generate."),
    click.option("--temperature", "-t", default=0.8, show_default=True, type=click.FloatRange(min=0), help="Sampling temperature; 0 = greedy."),
    click.option("--top-k", default=50, show_default=True, type=click.IntRange(min=0), help="Sample among the k likeliest (0 = all)."),
    click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling mass (1 = off)."),
    click.option("--seed", type=click.IntRange(0, 2**64 - 1), help="Seed for reproducible sampling."),
)


def _sampling(max_new_tokens, temperature, top_k, top_p, seed) -> dict:
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None,
                top_p=None if top_p == 1.0 else top_p, seed=seed)  # fmt: skip


@cli.command()
@click.argument("model", type=click.Path())
@click.argument("prompt", required=False)
@click.option("--ids", help='Prompt as token ids, e.g. "1 2 3"; prints ids back (no tokenizer needed).')
@click.option("--stop", multiple=True, help=r"Stop at this string (repeatable). Backslash escapes are interpreted: "
              r"\n, \t, \r, \\, \xHH, \uHHHH, so --stop '\n\n' stops at a blank line.")
@model_options
@sampling_options
def generate(model, prompt, ids, stop, backend, device, dtype, nhead, tokenizer, **sampling) -> None:
    """Continue PROMPT with MODEL (a checkpoint or an export directory), streaming to stdout."""
    if (prompt is None) == (ids is None):
        raise CliError('give either a PROMPT or --ids "1 2 3"')
    runtime = load(model, backend=backend, device=device, dtype=dtype, nhead=nhead, tokenizer=tokenizer, max_batch_size=1)
    if runtime.backend.traits.export_format:  # say what runs an export (which onnxruntime provider)
        click.echo(f"running on {runtime.backend.implementation}", err=True)
    params = _sampling(**sampling) | dict(stop=[unescape(s) for s in stop])  # stop strings need a tokenizer
    if ids is not None:
        try:
            prompt_ids = [int(t) for t in ids.replace(",", " ").split()]
        except ValueError:
            raise CliError(f'--ids must be integers separated by spaces, got "{ids}"') from None
        for piece in runtime.stream(prompt_ids, **params):  # checks its input before returning
            click.echo("".join(f"{token} " for token in piece.token_ids), nl=False)
    else:
        pieces = runtime.stream(prompt, **params)  # checks its input before returning
        click.echo(prompt, nl=False)
        for piece in pieces:
            click.echo(piece.text, nl=False)
    click.echo()


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|[ntr\\])")


def unescape(text: str) -> str:
    r"""Interpret \n, \t, \r, \\, \xHH and \uHHHH: a shell passes `--stop "\n"` as a backslash and
    an n, and a stop string nobody can type would be useless. Other backslashes stay as they are."""
    simple = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return _ESCAPE.sub(lambda m: simple.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), text)


@cli.command(name="train")
@click.argument("corpus", nargs=-1, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write (.safetensors).")
@click.option("--layers", default=DEMO_MODEL.n_layers, show_default=True, type=click.IntRange(min=1), help="Encoder layers.")
@click.option("--d-model", default=DEMO_MODEL.d_model, show_default=True, type=click.IntRange(min=1), help="Embedding width.")
@click.option("--nhead", default=DEMO_MODEL.nhead, show_default=True, type=click.IntRange(min=1),
              help="Attention heads; must divide --d-model. Stored in the checkpoint.")  # fmt: skip
@click.option("--d-ff", default=DEMO_MODEL.d_ff, show_default=True, type=click.IntRange(min=1), help="Feed-forward width.")
@click.option("--vocab-size", default=DEMO_MODEL.vocab_size, show_default=True, type=click.IntRange(min=257),
              help="BPE vocabulary (>= 257: 256 bytes + end of text).")  # fmt: skip
@click.option("--max-len", default=DEMO_MODEL.max_len, show_default=True, type=click.IntRange(min=1),
              help="Context length (positional table size).")  # fmt: skip
@click.option("--dropout", default=DEMO_MODEL.dropout, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Raise for long runs on small corpora.")  # fmt: skip
@click.option("--seq-len", default=DEFAULT_TRAIN.seq_len, show_default=True, type=click.IntRange(min=1),
              help="Tokens per training window; at most --max-len.")  # fmt: skip
@click.option("--batch-size", default=DEFAULT_TRAIN.batch_size, show_default=True, type=click.IntRange(min=1),
              help="Windows per optimizer step.")  # fmt: skip
@click.option("--steps", default=DEFAULT_TRAIN.steps, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--lr", default=DEFAULT_TRAIN.lr, show_default=True, type=float,
              help="Peak Adam learning rate, in (0, 1] (warm-up, then cosine decay).")  # fmt: skip
@click.option("--seed", default=DEFAULT_TRAIN.seed, show_default=True, type=click.IntRange(0, 2**64 - 1),
              help="Seed of the weights and the batch order.")  # fmt: skip
def train_cmd(corpus, output, layers, d_model, nhead, d_ff, vocab_size, max_len, dropout, **train_args) -> None:
    """Train a model on CORPUS files or directories (default: Python's standard library).

    The defaults train in about two minutes on two CPU cores. If the loss turns NaN or infinite,
    training stops with an error and nothing is written.
    """
    model_config = ModelConfig(vocab_size, d_model, nhead, d_ff, layers, max_len, dropout)
    _train_and_save(corpus, Path(output), model_config, TrainConfig(**train_args))


def _train_and_save(corpus, output: Path, model_config: ModelConfig, train_config: TrainConfig) -> None:
    check_writable(output)
    texts = read_corpus(corpus or default_corpus())
    click.echo(f"corpus: {len(texts)} files, {sum(map(len, texts)) / 1e6:.1f} M characters", err=True)
    model, tokenizer, report = train(texts, model_config, train_config)
    save_checkpoint(output, model, tokenizer)
    click.echo(
        f"trained in {report.seconds:.0f} s: train loss {report.train_loss:.3f}, "
        f"validation loss {report.val_loss:.3f}; wrote {output}",
        err=True,
    )


@cli.command()
@click.option("-o", "--output", default="tformer-demo.safetensors", show_default=True, type=click.Path(dir_okay=False),
              help="Checkpoint to write.")  # fmt: skip
@click.option("--steps", default=DEFAULT_TRAIN.steps, show_default=True, type=click.IntRange(min=1),
              help="Training steps (fewer = faster, worse).")  # fmt: skip
def demo(output, steps) -> None:
    """Train a small model on Python's standard library, then generate from it."""
    _train_and_save((), Path(output), DEMO_MODEL, TrainConfig(steps=steps))
    runtime = load(output)
    for prompt in DEMO_PROMPTS:
        click.secho(f"\n--- sample (prompt {prompt!r}) ---", fg="cyan")
        click.echo(prompt, nl=False)
        for piece in runtime.stream(prompt, max_new_tokens=120, temperature=0.8, top_k=50, seed=0):
            click.echo(piece.text, nl=False)
        click.echo()
    click.echo(f"\nTry: tformer generate {output} \"def main(\" --temperature 0.7")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--nhead", type=click.IntRange(min=1), help=NHEAD_HELP)
def info(model, nhead) -> None:
    """Show MODEL's configuration, size, tokenizer and what was verified when reading it.

    MODEL is a checkpoint or an export directory (which is verified as a load would verify it)."""
    rows = _export_rows(Path(model)) if Path(model).is_dir() else _checkpoint_rows(model, nhead)
    for key, value in rows:
        click.echo(f"{key:<11} {value}")


def _config_rows(c: ModelConfig) -> list[tuple[str, object]]:
    with torch.device("meta"):
        params = sum(t.numel() for k, t in TransformerLM(c).state_dict().items() if k != "pos_encoder.pe")
    per_token = 2 * c.n_layers * c.d_model * 4  # keys and values of every layer, fp32
    full = DEFAULT_BATCH * c.max_len * per_token / 2**20
    return [("parameters", f"{params:,}"), ("layers", c.n_layers), ("d_model", c.d_model), ("heads", c.nhead),
            ("d_ff", c.d_ff), ("vocab", c.vocab_size), ("context", f"{c.max_len} tokens"),
            ("KV cache", f"{per_token / 1024:g} KiB per token in fp32 (half in bf16/fp16); an engine of "
                         f"{DEFAULT_BATCH} rows x the whole context: {full:.0f} MiB")]  # fmt: skip


def _checkpoint_rows(model: str, nhead: int | None) -> list[tuple[str, object]]:
    ckpt = load_checkpoint(model, nhead)
    rows = [("file", f"{model} ({ckpt.kind})"), *_config_rows(ckpt.config)]
    rows[rows.index(("heads", ckpt.config.nhead))] = ("heads", _heads(ckpt))
    return rows + [
        ("dtype", str(next(iter(ckpt.state_dict.values())).dtype).removeprefix("torch.")),
        ("tokenizer", f"yes ({ckpt.tokenizer.vocab_size} ids)" if ckpt.tokenizer else "no (use --tokenizer or --ids)"),
        ("verified", ckpt.integrity),
    ]  # fmt: skip


def _export_rows(directory: Path) -> list[tuple[str, object]]:
    from tformer.export.formats import format_named
    from tformer.export.integrity import verified_meta

    meta = verified_meta(directory)
    artifact = format_named(meta["format"]).artifact
    size = (directory / artifact).stat().st_size / 2**20
    validation = meta["validation"]
    checked = "not validated (exported with --no-validate)" if validation is None else (
        f"passed on {validation.get('device', 'cpu')}: logits within tolerance, greedy tokens identical to PyTorch")  # fmt: skip
    tokenizer = "no (use --tokenizer or --ids)"
    if meta["tokenizer"]:
        tokenizer = f"yes ({Tokenizer.from_file(directory / 'tokenizer.json').vocab_size} ids)"
    return [
        ("directory", f"{directory} ({meta['format']} export, format version {meta['format_version']})"),
        ("runs", f"{artifact} ({size:.1f} MiB)" + (f", ONNX opset {meta['opset']}" if "opset" in meta else "")),
        *_config_rows(ModelConfig.from_dict(meta["config"])),
        ("dtype", meta["dtype"]),
        ("tokenizer", tokenizer),
        ("validation", checked),
        ("verified", f"SHA-256 of {', '.join(meta['files'])}; {artifact}'s embedded metadata matches tformer.json"),
        ("exported by", ", ".join(f"{k} {v}" for k, v in meta["versions"].items())),
    ]


def _heads(ckpt) -> str:
    """The head count, and whether it was read or supplied: no weight shape reveals it."""
    if not ckpt.nhead_supplied:
        return str(ckpt.config.nhead)
    how = "supplied at `tformer convert`" if ckpt.kind == "tformer" else "supplied with --nhead"
    return f"{ckpt.config.nhead} ({how}, not read: a state_dict does not store it; a wrong count that divides d_model goes undetected)"


@cli.command(name="convert")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--nhead", type=click.IntRange(min=1), help=NHEAD_HELP)
@click.option("--tokenizer", type=click.Path(dir_okay=False), help="tokenizer.json to store inside (replaces the checkpoint's own).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="File to write [default: MODEL's name with .safetensors].")
def convert_cmd(model, nhead, tokenizer, output) -> None:
    """Rewrite MODEL (a tutorial .pt, a training checkpoint, any checkpoint) as tformer's own
    .safetensors file, which carries the head count, the tokenizer and a content hash: after
    this, no --nhead or --tokenizer is needed, and corruption is detected at load."""
    out = Path(output) if output else Path(model).with_suffix(".safetensors")
    if not output and out.suffix == Path(model).suffix:
        raise CliError(f"{model} is already a .safetensors file; name the converted file with -o")
    ckpt = convert_checkpoint(model, out, nhead, Tokenizer.from_file(tokenizer) if tokenizer else None)
    tok = "with" if tokenizer or ckpt.tokenizer else "without"
    click.echo(f"wrote {out} ({ckpt.config.n_layers} layers, {ckpt.config.nhead} heads, {tok} tokenizer, SHA-256 inside)")


@cli.command()
@click.argument("model", type=click.Path())
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port.")
@click.option("--max-batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="KV cache rows: requests generating at once (the rest wait).")
@click.option("--max-len", type=click.IntRange(min=2), help="Cache slots per request: its prompt + max_tokens at most "
              "[default: the model's context].")
@click.option("--max-waiting", default=64, show_default=True, type=click.IntRange(min=0),
              help="Requests that may wait for a row; beyond that, 503 with Retry-After.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), help="Largest request body taken; a larger one is "
              "refused with 413 before it is read [default: 1 MiB, or what one prompt of --max-len tokens can take if "
              "more: 6 bytes per byte of the tokenizer's longest token, at least 8, per token].")
@click.option("--api-key", envvar="TFORMER_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* "
              "[default: $TFORMER_API_KEY, else none].")
@click.option("--model-name", help="The name clients pass as 'model' [default: MODEL's file name without its suffix].")
@click.option("--grace", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="On SIGTERM or Ctrl-C (SIGINT): stop accepting, give requests in flight this many seconds to "
                   "finish, then end the rest (a stream's last chunk says finish_reason 'abort', then [DONE]) and "
                   "exit 0 (130 after SIGINT). A second signal ends them at once.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads of the engine's torch [default: torch's "
              "own, one per core: on a 2-core CPU leaving a core to the HTTP side measured slower (docs/benchmarks)].")
@click.option("--stream-interval", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tokens of a request streamed together in one chunk (its first token goes at once): fewer chunks "
                   "cost the server less CPU under many streams, at a coarser stream (vLLM's --stream-interval).")
@click.option("--decode-steps", type=click.IntRange(min=1), help="Decode steps the engine runs in a row while no "
              f"request waits for a row: tokens then reach clients that many at a time [default: {DECODE_STEPS}].")
@click.option("--ray", "on_ray", is_flag=True, help="Deploy on Ray Serve: replicas of this server (one engine each) "
              "behind Ray's proxy at --host:--port, on a local Ray instance or the cluster at --ray-address.")
@click.option("--replicas", type=click.IntRange(min=1), help="--ray: a fixed number of replicas [default: 1].")
@click.option("--min-replicas", type=click.IntRange(min=0), help="--ray: autoscale, at least this many replicas.")
@click.option("--max-replicas", type=click.IntRange(min=1), help="--ray: autoscale, at most this many replicas.")
@click.option("--target-ongoing-requests", type=click.FloatRange(min=0, min_open=True),
              help="--ray: autoscaling keeps about this many requests in flight per replica [default: --max-batch-size].")
@click.option("--ray-address", help="--ray: the cluster to join ('auto': the one this node is in; 'ray://HEAD:10001') "
              "[default: start a local Ray instance].")
@click.option("--num-gpus-per-replica", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="--ray: GPUs Ray reserves for each replica (fractions share one GPU).")
@click.option("--print-config", is_flag=True, help="--ray: print the equivalent Ray Serve config file (YAML, for "
              "'serve deploy') and exit.")
def serve(model, backend, device, dtype, nhead, tokenizer, host, port, max_batch_size, max_len, max_waiting,
          max_body_bytes, api_key, model_name, grace, threads, stream_interval, decode_steps, on_ray, replicas, min_replicas,
          max_replicas, target_ongoing_requests, ray_address, num_gpus_per_replica, print_config) -> None:  # fmt: skip
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models), with /health, /metrics (Prometheus) and a playground page at /; with --ray, as
    replicas on Ray Serve.

    SIGTERM or Ctrl-C (to the process or its whole group): stop accepting, let requests in flight
    finish within --grace seconds, end the rest (streams with a last chunk whose finish_reason is
    'abort', then [DONE]; other requests with their JSON, finish_reason 'abort'), exit 0 (130
    after Ctrl-C)."""
    try:
        from tformer.serve.server import run
        from tformer.serve.worker import EngineProcess, WorkerSpec
    except ImportError as exc:
        raise CliError(f"tformer serve needs {exc.name}: pip install 'tformer[serve]'") from None
    name = model_name or Path(model).stem
    ray_only = dict(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas, ray_address=ray_address,
                    target_ongoing_requests=target_ongoing_requests, print_config=print_config,
                    num_gpus_per_replica=num_gpus_per_replica)  # fmt: skip
    if not on_ray:
        if given := next((k for k, v in ray_only.items() if v), None):
            raise CliError(f"--{given.replace('_', '-')} needs --ray")
    else:
        # Each replica's engine takes --threads cores (default 1), and Ray reserves that many for it. Paths that
        # exist here are made absolute: replicas (and `serve deploy`) do not start in this directory.
        model_path, tokenizer_path = (str(Path(p).resolve()) if p and Path(p).exists() else p for p in (model, tokenizer))
        spec = WorkerSpec(model_path, backend, device, dtype, nhead, tokenizer_path, max_batch_size, max_len,
                          threads or 1, stream_interval, decode_steps)  # fmt: skip
        app_options = dict(model_name=name, max_waiting=max_waiting, api_key=api_key, max_body_bytes=max_body_bytes)
        _serve_on_ray(spec, app_options, host, port, grace, **ray_only)
        return
    _check_port(host, port)
    # The engine runs in a process of its own (no interpreter lock shared with the HTTP side).
    spec = WorkerSpec(model, backend, device, dtype, nhead, tokenizer, max_batch_size, max_len, threads, stream_interval,
                      decode_steps)  # fmt: skip
    engine = EngineProcess(spec)
    s = engine.served
    cache = f"cache {s.cache_bytes / 2**20:.1f} MiB" if s.cache_bytes is not None else "cache"
    click.echo(f"tformer serve: http://{host}:{port} | model '{name}' | {s.backend} on {s.device} | {cache} "
               f"({s.max_batch_size} rows x {s.max_len} slots) | warm-up {s.warmup_s:.1f} s | grace {grace:g} s",
               err=True)  # fmt: skip
    stopped_by = run(engine, host, port, grace, say=lambda line: click.echo(line, err=True), model_name=name,
                     max_waiting=max_waiting, api_key=api_key, max_body_bytes=max_body_bytes)  # fmt: skip
    _stopped(stopped_by)


def _stopped(stopped_by: int | None) -> None:
    """The last line, and the exit status: 130 after SIGINT (128 + 2, as shells report Ctrl-C), else 0."""
    click.echo("tformer serve: stopped", err=True)
    if stopped_by == signal.SIGINT:
        click.get_current_context().exit(130)


def _serve_on_ray(spec, app_options: dict, host: str, port: int, grace: float, replicas, min_replicas, max_replicas,
                  target_ongoing_requests, ray_address, print_config, num_gpus_per_replica) -> None:  # fmt: skip
    """`tformer serve --ray`: print the Ray Serve config, or deploy and serve until SIGTERM/Ctrl-C."""
    if ray_address is None:  # our own local instance (rayserve.LocalRay), with token authentication as Ray's
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # default: set before Ray is imported, which reads it once
    try:
        from tformer.serve import rayserve
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] != "ray":
            raise
        raise CliError("tformer serve --ray needs Ray Serve: pip install 'tformer[ray]'") from None
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise CliError("give --replicas (a fixed count) or --min-replicas/--max-replicas (autoscaling), not both")
    if min_replicas is not None and max_replicas is not None and min_replicas > max_replicas:
        raise CliError(f"--min-replicas {min_replicas} is more than --max-replicas {max_replicas}")
    if target_ongoing_requests is not None and min_replicas is None and max_replicas is None:
        raise CliError("--target-ongoing-requests is for autoscaling: give --min-replicas and/or --max-replicas")
    scaling = rayserve.Scaling(replicas or 1, min_replicas, max_replicas, target_ongoing_requests, spec.threads,
                               num_gpus_per_replica)  # fmt: skip
    options = rayserve.AppOptions(**app_options)
    if print_config:
        import yaml  # a dependency of Ray

        click.echo(yaml.safe_dump(rayserve.config(spec, options, scaling, host, port, grace), sort_keys=False), nl=False)
        return
    if ray_address is None:
        if not Path(spec.model).exists():
            raise CliError(f"{spec.model}: no such file or directory")
        _check_port(host, port)

    def ready(where: str) -> None:
        click.echo(f"tformer serve: http://{host}:{port} on Ray Serve ({where}) | model "
                   f"'{options.model_name}' | {scaling.describe()}, {spec.threads} thread(s) each | grace {grace:g} s",
                   err=True)  # fmt: skip

    _stopped(rayserve.run(spec, options, scaling, host, port, ray_address, grace, ready,
                          say=lambda line: click.echo(line, err=True)))  # fmt: skip


def _check_port(host: str, port: int) -> None:
    """One line for a port that is taken, before minutes of loading and warming up."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As uvicorn binds: connections of a server just stopped (TIME_WAIT) do not hold the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from None


def main() -> None:
    cli(prog_name="tformer")


@cli.command(name="export", cls=Command, context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Output directory [default: MODEL's name + '-onnx' or '-pt2'].")
@click.option("--format", "fmt", default="onnx", show_default=True, type=click.Choice(list(FORMATS)),
              help="onnx (onnxruntime, any language) or pt2 (AOTInductor package, PyTorch/C++, CPU).")
@click.option("--nhead", type=click.IntRange(min=1), help=NHEAD_HELP)
@click.option("--opset", type=click.IntRange(OPSETS.start, OPSETS.stop - 1),
              help=f"ONNX opset version, {OPSETS.start} to {OPSETS.stop - 1} [default: {DEFAULT_OPSET}].")  # fmt: skip
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]), help="Weights and cache dtype.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="Where validation runs PyTorch and the export (ONNX on cuda needs onnxruntime-gpu; pt2 is CPU-only).")
@click.option("--no-validate", is_flag=True, help="Skip the comparison with PyTorch (not recommended).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def export_cmd(model, output, fmt, nhead, opset, dtype, device, no_validate, force) -> None:
    """Export MODEL with a KV cache to ONNX (default) or an AOTInductor .pt2, validated against PyTorch.

    Writes a directory with model.onnx or model.pt2, tformer.json (config, input/output contract,
    versions, SHA-256 of every file, validation report) and tokenizer.json when the checkpoint has
    one. Run it with `tformer generate DIR "..."` or `tformer.load(DIR)`.
    """
    from tformer.exporter import export_model
    from tformer.runtime import resolve_device, resolve_dtype

    keep_compiled_kernels_in_store()  # also when run as tformer-export, outside the group
    options = {} if opset is None else {"opset": opset}
    lm, tokenizer = load_model(model, nhead)
    out = Path(output) if output else Path(model).with_name(f"{Path(model).stem}-{fmt}")
    began = time.perf_counter()
    log = lambda line: click.echo(line, err=True)  # noqa: E731
    meta = export_model(lm, out, fmt, tokenizer, resolve_dtype(dtype), validate=not no_validate, force=force, log=log,
                        device=resolve_device(device), **options)  # fmt: skip
    artifact = FORMATS[fmt].artifact
    size = (out / artifact).stat().st_size / 2**20
    checked = "validated" if meta["validation"] else "NOT validated"
    click.echo(f"wrote {out}/ ({artifact} {size:.1f} MiB, {checked}) in {time.perf_counter() - began:.0f} s")


def export_main() -> None:
    export_cmd(prog_name="tformer-export")


if __name__ == "__main__":
    main()
