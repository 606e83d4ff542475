"""Benchmark output: a table for people, JSON and CSV for machines, a PNG plot."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tformer.bench.harness import Record
from tformer.bench.kernels import KernelRecord
from tformer.bench.serve import OFFLINE, ServeRecord, rate_label
from tformer.bench.throughput import ThroughputRecord
from tformer.errors import TformerError
from tformer.files import atomic_path


def record_dict(record: Any) -> dict:
    """A record (`Record`, `KernelRecord`, `ThroughputRecord`: a dataclass with a `flagged`
    property) as a dict."""
    return {**asdict(record), "flagged": record.flagged}


def print_table(records: Sequence[Record], title: str, console: Console | None = None) -> None:
    """Aligned table with units in the headers; a flagged row is marked, never ranked, and rows
    too noisy to rank against each other are marked `~`. Text from the records is printed
    verbatim, never read as rich markup (`pip install 'tformer[hf]'` keeps its brackets)."""
    console = console or Console(width=max(Console().width, 170))
    table = Table(title=title, title_justify="left")
    headers = ("backend", "batch", "TTFT ms", "ITL p50 ms", "ITL p90 ms", "ITL p99 ms", "decode tok/s",
               "e2e tok/s (min-max)", "x naive", "x eager", "x floor", "x ct2", "peak MiB", "warm-up s", "check")  # fmt: skip
    for h in headers:
        table.add_column(h, justify="left" if h in ("backend", "check") else "right")
    timed = [r for r in records if r.status != "skipped"]
    for r in timed:
        mark = "!" if r.flagged else ""
        check = {True: "ok", False: "MISMATCH", None: "n/a"}[r.matches_eager]
        table.add_row(
            escape(r.backend), str(r.batch_size), _num(r.ttft_ms.median),
            *(_num(r.itl_ms[p]) if r.itl_ms else "-" for p in ("p50", "p90", "p99")),
            _num(r.decode_tok_s.median) if r.decode_tok_s else "-",
            f"{_num(r.e2e_tok_s.median)} ({_num(r.e2e_tok_s.min)}-{_num(r.e2e_tok_s.max)})" + ("~" if r.noisy else ""),
            _ratio(r.vs_naive) + mark, _ratio(r.vs_eager) + mark, _ratio(r.vs_floor) + mark,
            _ratio(r.vs_ct2) + mark, _num(r.peak_mem_mib),
            _num((r.setup_s or 0) + (r.warmup_s or 0)), check, style="red" if r.flagged else None,
        )  # fmt: skip
    console.print(table)
    for batch in sorted({r.batch_size for r in timed}):
        ranked = [r for r in timed if r.batch_size == batch and not r.flagged]
        if ranked:
            best = max(ranked, key=lambda r: r.e2e_tok_s.median)
            unsure = " by median, but too noisy to rank (~)" if best.noisy else ""
            console.print(f"batch {batch}: fastest is {escape(best.backend)} ({_num(best.e2e_tok_s.median)} tok/s end to end){unsure}")
    for why in dict.fromkeys(f"batch {r.batch_size}: {part}" for r in timed if r.noisy for part in r.noisy.split("; ")):
        console.print(f"[yellow]~ {escape(why)}[/yellow]")
    for r in timed:
        if r.flagged:
            console.print(f"[red]! {escape(r.backend)} batch {r.batch_size}: {escape(r.reason)}; its figures are not ranked[/red]")
    for r in {r.backend: r for r in timed if r.warm_setup_s is not None}.values():
        console.print(f"{escape(r.backend)}: setup {_num(r.setup_s)} s as found here, {_num(r.warm_setup_s)} s in a second process (warm caches)")
    for name, implementation in dict.fromkeys((r.backend, r.implementation) for r in timed if r.implementation):
        console.print(f"{escape(name)} runs {escape(implementation)}")
    for name, note in dict.fromkeys((r.backend, n) for r in timed for n in r.notes):
        console.print(f"[yellow]{escape(name)}: {escape(note)}[/yellow]")
    for name, reason in dict.fromkeys((r.backend, r.reason) for r in records if r.status == "skipped"):
        console.print(f"skipped {escape(name)}: {escape(reason)}")
    if timed:
        console.print(f"timed: {timed[0].repeats} rounds per batch size, each running every row once, in an order "
                      "rotated each round; figures are medians (min-max) over the rounds")  # fmt: skip
    for source, names in _group(timed, lambda r: r.mem_source, lambda r: r.backend).items():
        bases = [r.mem_base_mib for r in timed if r.mem_source == source and r.mem_base_mib is not None]
        span = "-".join(dict.fromkeys((_num(min(bases, default=None)), _num(max(bases, default=None)))))
        base = f"; before the row's setup it held {span} MiB (interpreter, torch, the model)" if bases else ""
        console.print(f"peak MiB of {', '.join(map(escape, names))}: {escape(source or '-')}{base}")
    console.print("warm-up s = setup (build, export, compile, correctness check) + untimed warm-up runs")


def _group(items: Sequence[Any], key: Callable[[Any], str], label: Callable[[Any], str]) -> dict[str, list[str]]:
    """The labels of `items` by key, each label once, in order."""
    groups: dict[str, list[str]] = {}
    for item in items:
        labels = groups.setdefault(key(item), [])
        if label(item) not in labels:
            labels.append(label(item))
    return groups


def print_kernel_table(records: Sequence[KernelRecord], title: str, copy_bw: float | None, console: Console | None = None) -> None:
    """One row per implementation and case; TFLOP/s for prefill, GB/s (and % of copy) for decode."""
    console = console or Console(width=max(Console().width, 170))
    table = Table(title=title, title_justify="left")
    headers = ("kind", "impl", "batch", "heads", "seq", "D", "dtype", "ms", "ms min-max", "TFLOP/s", "GB/s",
               "% copy bw", "x sdpa", "rel err", "check")  # fmt: skip
    for h in headers:
        table.add_column(h, justify="left" if h in ("kind", "impl", "dtype", "check") else "right")
    for r in records:
        if r.status == "skipped":
            continue
        table.add_row(
            r.kind, r.impl, str(r.batch), str(r.heads), str(r.seq), str(r.head_dim), r.dtype, _num(r.ms.median),
            f"{_num(r.ms.min)}-{_num(r.ms.max)}", _num(r.tflops), _num(r.gb_s),
            "-" if r.copy_fraction is None else f"{100 * r.copy_fraction:.0f}%", _ratio(r.vs_sdpa),
            "-" if r.max_rel_err is None else f"{r.max_rel_err:.1e}", "MISMATCH" if r.flagged else "ok",
            style="red" if r.flagged else None,
        )  # fmt: skip
    console.print(table)
    if copy_bw:
        console.print(f"device copy bandwidth (1 GiB device-to-device, read + write): {copy_bw:.0f} GB/s")
    for r in records:
        if r.flagged:
            console.print(f"[red]! {r.kind} {r.impl} seq {r.seq} D {r.head_dim} {r.dtype}: {escape(r.reason)}[/red]")
    skips = _group([r for r in records if r.status == "skipped"], lambda r: r.reason,
                   lambda r: f"{r.kind} {r.impl} b{r.batch} h{r.heads} s{r.seq} d{r.head_dim} {r.dtype}")  # fmt: skip
    for reason, rows in skips.items():
        console.print(f"skipped {', '.join(rows)}: {escape(reason)}")


def print_throughput_table(records: Sequence[ThroughputRecord], title: str, console: Console | None = None) -> None:
    """One row per backend and batching mode; latency figures as mean / p50 / p99 in ms."""
    console = console or Console(width=max(Console().width, 170))
    table = Table(title=title, title_justify="left")
    headers = ("backend", "batching", "req/s", "output tok/s (min-max)", "x static", "TTFT ms mean/p50/p99",
               "TPOT ms mean/p50/p99", "E2E ms mean/p50/p99", "cache MiB")  # fmt: skip
    for h in headers:
        table.add_column(h, justify="left" if h in ("backend", "batching") else "right")

    for r in records:
        if r.status == "ok":
            tok = r.output_tok_s
            table.add_row(escape(r.backend), r.mode, _num(r.request_per_s), f"{_num(tok.median)} ({_num(tok.min)}-{_num(tok.max)})",
                          _ratio(r.vs_static), _triple(r.ttft_ms), _triple(r.tpot_ms), _triple(r.e2e_ms), _num(r.cache_mib))  # fmt: skip
    console.print(table)
    for reason, rows in _group([r for r in records if r.status == "skipped"], lambda r: r.reason,
                               lambda r: f"{r.backend} {r.mode}").items():  # fmt: skip
        console.print(f"skipped {', '.join(rows)}: {escape(reason)}")


def print_host_table(records: Sequence, title: str, console: Console | None = None) -> None:
    """`tformer-bench engine`: per backend and batch size, a decode step's time, the backend call
    within it and the difference (the engine's host work), in microseconds, and steps/s."""
    console = console or Console(width=max(Console().width, 150))
    table = Table(title=title, title_justify="left")
    for h in ("backend", "batch", "step us (min-max)", "backend call us", "host us (min-max)", "steps/s"):
        table.add_column(h, justify="left" if h == "backend" else "right")
    for r in records:
        spread = lambda s: f"{_num(s.median)} ({_num(s.min)}-{_num(s.max)})"  # noqa: E731
        table.add_row(escape(r.backend), str(r.batch_size), spread(r.step_us), _num(r.backend_us.median) if r.backend_us else "-",
                      spread(r.host_us), _num(r.steps_per_s))  # fmt: skip
    console.print(table)
    if records:
        console.print(f"{records[0].steps} decode steps per round; medians (min-max) over interleaved rounds; the null "
                      "backend does no model work (its step is the engine alone)")  # fmt: skip


def print_serve_table(records: Sequence[ServeRecord], title: str, against: Sequence[dict] = (),
                      console: Console | None = None) -> None:  # fmt: skip
    """One row per run (request rate; HTTP or the offline engine; the round, when there are
    several); latencies as mean / p50 / p99 in ms; failed requests' first errors below the table,
    then `against` (`serve.ratios`: HTTP over the offline engine)."""
    console = console or Console(width=max(Console().width, 220))
    table = Table(title=title, title_justify="left")
    rounds = len({r.round for r in records}) > 1
    headers = ("run", *(["round"] if rounds else []), "rate req/s", "done/failed", "req/s", "output tok/s", "total tok/s",
               "TTFT ms mean/p50/p99", "TPOT ms mean/p50/p99", "ITL ms mean/p50/p99", "E2EL ms mean/p50/p99",
               "CPU us/tok client/server/engine")  # fmt: skip
    for h in headers:
        table.add_column(h, justify="left" if h == "run" else "right")
    for r in records:
        table.add_row(r.run, *([str(r.round + 1)] if rounds else []), rate_label(r.rate), f"{r.completed}/{r.failed}",
                      _num(r.request_throughput), _num(r.output_throughput), _num(r.total_token_throughput),
                      _triple(r.ttft_ms), _triple(r.tpot_ms), _triple(r.itl_ms), _triple(r.e2el_ms), _cpu(r.cpu_us_per_token),
                      style="red" if r.flagged else None)  # fmt: skip
    console.print(table)
    for r in records:
        for error in r.errors:
            console.print(f"[red]! {r.run}, rate {rate_label(r.rate)}: {r.failed} failed: {escape(error)}[/red]")
    sources = {r.output_tokens_from for r in records if r.run != OFFLINE}
    if sources:
        console.print(f"output tokens counted from: {', '.join(sorted(sources))} (usage: the server's count; chunks: streamed text chunks)")
    for a in against:
        itl = a["itl_p50"]
        console.print(f"rate {rate_label(a['rate'])}, HTTP / offline engine over {a['rounds']} round(s), median (min-max): "
                      f"output tok/s {_spread(a['output_throughput'])}, ITL p50 {_spread(itl) if itl else '-'}")  # fmt: skip


def _cpu(per_token: dict[str, float] | None) -> str:
    """CPU us per output token of the load generator, the server's process and its engine ("-": not measured)."""
    per_token = per_token or {}
    return " / ".join(_num(per_token.get(k)) for k in ("client", "server", "engine"))


def _spread(s: dict[str, float]) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def _triple(figures: dict[str, float] | None) -> str:
    return "-" if not figures else " / ".join(_num(figures[k]) for k in ("mean", "p50", "p99"))


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_json(path: str | os.PathLike, records: Sequence[Any], meta: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump({"meta": meta, "records": [record_dict(r) for r in records]}, f, indent=2)


def flatten(record: Any) -> dict:
    """One CSV row: nested figures become `ttft_ms.median`, `itl_ms.p99`, `versions.torch`..."""
    flat = {}
    for key, value in record_dict(record).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def write_csv(path: str | os.PathLike, records: Sequence[Any]) -> None:
    rows = [flatten(r) for r in records]
    fields = list(dict.fromkeys(k for row in sorted(rows, key=len, reverse=True) for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise TformerError("--plot needs matplotlib: pip install 'tformer[plot]'") from None


def write_plot(path: str | os.PathLike, records: Sequence[Record], title: str) -> None:
    """End-to-end tokens/s against batch size, one line per backend (min-max as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(r.backend for r in records if r.e2e_tok_s):
        rows = sorted((r for r in records if r.backend == name and r.e2e_tok_s), key=lambda r: r.batch_size)
        x = [r.batch_size for r in rows]
        y = [r.e2e_tok_s.median for r in rows]
        err = [[m - r.e2e_tok_s.min for m, r in zip(y, rows)], [r.e2e_tok_s.max - m for m, r in zip(y, rows)]]
        flagged = any(r.flagged for r in rows)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, linestyle="--" if flagged else "-",
                    label=name + (" (MISMATCH)" if flagged else ""))  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("end-to-end tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_serve_plot(path: str | os.PathLike, records: Sequence[ServeRecord], title: str) -> None:
    """TTFT and TPOT (p50 solid, p99 dashed) against request rate, one colour per run kind; all at
    once ("inf") sits right of the highest finite rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({r.rate for r in records if r.rate is not None})
    inf_x = 2 * finite[-1] if finite else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric, label in zip(axes, ("ttft_ms", "tpot_ms"), ("TTFT ms", "TPOT ms")):
        for colour, run in zip(("C0", "C1"), dict.fromkeys(r.run for r in records)):
            rows = sorted((r for r in records if r.run == run and getattr(r, metric)), key=lambda r: r.rate or inf_x)
            x = [r.rate or inf_x for r in rows]
            for p, style in (("p50", "-"), ("p99", "--")):
                ax.plot(x, [getattr(r, metric)[p] for r in rows], style, marker="o", color=colour, label=f"{run} {p}")
        ticks = finite + ([inf_x] if any(r.rate is None for r in records) else [])
        ax.set_xticks(ticks, [f"{t:g}" for t in finite] + ["inf"] * (len(ticks) - len(finite)))
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
