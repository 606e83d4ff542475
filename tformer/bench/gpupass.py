"""The GPU pass behind `tformer-bench gpu-pass`: every check and benchmark that needs a CUDA GPU,
in one command that writes one dated report.

GPU time here is rare and short (half an hour now and then, one command at most ten minutes), so
the pass is cut into parts that can run one per command: the tests' CUDA cases, the generation
benchmark at fp32 and at bf16, and the kernel benchmark. Each part appends to the same report
(`tformer.bench.gpureport`), and the command stops its running step at `--time-limit` so that the
report is always written before an outer limit kills it.

Everything runs as subprocesses of the existing command lines (`pytest -m cuda`,
`python -m tformer.bench.cli ... --json FILE`), from the checkout's root with the checkout first on
PYTHONPATH: the report embeds what they print and the records they write, and needs nothing from
the benchmark harness's internals. Without a GPU, `--dry-run` runs a tiny CPU stand-in of every
step for real (the CUDA test selection, all skipped; toy benchmarks, the kernels interpreted), so
that the first GPU lent finds the plumbing already proven.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tformer.bench.gpureport import Report
from tformer.bench.harness import device_name, versions
from tformer.bench.kernels import KINDS
from tformer.engine.engine import DECODE_STEPS
from tformer.errors import TformerError

ROOT = Path(__file__).resolve().parents[2]  # the checkout: tests/ beside tformer/
PARTS = {
    "tests": "the tests' CUDA cases (pytest -m cuda)",
    "bench-fp32": "tformer-bench, every backend, fp32",
    "bench-bf16": "tformer-bench, every backend, bf16",
    "kernels": "tformer-bench kernels: prefill and decode against SDPA",
    "engine": "tformer-bench engine: the host's share of a decode step, multi-step and single steps",
}
TIME_LIMIT_S = 540  # nine minutes (+ PIPE_GRACE_S at worst): a 10-minute command ends with its report written
RECORDS = "records.json"  # in a command, the temporary file its records go to (embedded in the report)
OUTPUT_LIMIT = 100_000  # characters of a step's output kept in the report (the end)
PIPE_GRACE_S = 30  # after a stop, for the output to drain


@dataclass(frozen=True)
class Sizes:
    """What the steps run on: the GPU pass itself, or the dry run's CPU stand-ins."""

    device: str
    generate: tuple[str, ...]  # `tformer-bench generate` options besides device, dtype and prompt length
    prompt_lens: tuple[int, ...]
    kernels: tuple[str, ...]  # `tformer-bench kernels` options besides device and kind
    engine: tuple[str, ...]  # `tformer-bench engine` options besides device and decode steps
    env: dict[str, str] = field(default_factory=dict)  # for every step


GPU = Sizes(
    "cuda",
    generate=("--batch-sizes", "1,8,32", "--new-tokens", "128"),  # every backend: the command's default
    prompt_lens=(128, 1024),
    kernels=("--batch", "1,8", "--heads", "16", "--seq", "1024,2048,4096,8192,16384", "--head-dim", "64,128",
             "--dtype", "bf16"),  # fmt: skip
    engine=("--backends", "null,eager", "--batch-sizes", "1,16,64"),
)
# Seconds on a shared 2-core CPU: the cheap backends at toy sizes, the kernels under Triton's
# interpreter, one thread each (two threads on a core that another process holds: 10x slower).
DRY = Sizes(
    "cpu",
    generate=("--backends", "eager,naive", "--batch-sizes", "1,2", "--new-tokens", "4", "--repeats", "1", "--warmup", "0"),
    prompt_lens=(8, 16),
    kernels=("--batch", "1", "--heads", "2", "--seq", "64", "--head-dim", "16", "--dtype", "fp32", "--impls", "tformer,sdpa"),
    engine=("--backends", "null", "--batch-sizes", "1", "--steps", "4", "--repeats", "1"),
    env={"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
)


@dataclass(frozen=True)
class Step:
    """One subprocess of a part: `python ARGV` from the checkout's root."""

    part: str
    title: str
    argv: tuple[str, ...]  # RECORDS stands for the temporary records file
    env: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> str:
        return shlex.join([*(f"{k}={v}" for k, v in self.env.items()), "python", *self.argv])


def steps(part: str, sizes: Sizes) -> list[Step]:
    """The steps of `part` (a key of PARTS) at `sizes`."""
    bench = ("-m", "tformer.bench.cli")
    if part == "tests":
        pytest = ("-m", "pytest", "-v", "-m", "cuda", "-rfEs", "--durations=10", "--disable-warnings", "-p", "no:cacheprovider")
        return [Step(part, "pytest -m cuda", (*pytest, "tests"), sizes.env)]
    if part == "engine":  # the engine's default decode steps a turn, then one: what multi-step decode saves
        return [Step(part, title, (*bench, "engine", "--device", sizes.device, "--decode-steps", n, *sizes.engine,
                                   "--json", RECORDS), sizes.env)
                for title, n in ((f"{DECODE_STEPS} decode steps a turn", str(DECODE_STEPS)), ("1 decode step a turn", "1"))]  # fmt: skip
    if part == "kernels":
        return [Step(part, kind, (*bench, "kernels", "--kinds", kind, "--device", sizes.device, *sizes.kernels, "--json", RECORDS),
                     sizes.env) for kind in KINDS]  # fmt: skip
    dtype = part.removeprefix("bench-")
    return [Step(part, f"{dtype}, prompt {n}", (*bench, "generate", "--device", sizes.device, "--dtype", dtype,
                                                "--prompt-len", str(n), *sizes.generate, "--json", RECORDS), sizes.env)
            for n in sizes.prompt_lens]  # fmt: skip


def run_gpu_pass(parts: Sequence[str], out: Path, time_limit: float | None, dry_run: bool, echo: Callable[[str], None]) -> bool:
    """Run `parts` (keys of PARTS, in that order) and write their results into the report under
    `out`; True when every step ran and passed. `time_limit` (seconds, None: none) bounds the whole
    call: a step still running then is stopped, later ones are recorded as not run. `dry_run`
    prints the GPU steps, and without a GPU runs their CPU stand-ins into a report marked so."""
    cuda = torch.cuda.is_available()
    if not cuda and not dry_run:
        raise TformerError("the GPU pass needs a CUDA GPU and torch sees none here; "
                           "--dry-run shows what it runs and runs its CPU stand-ins")  # fmt: skip
    _check_can_run(parts)
    planned = {part: steps(part, GPU) for part in parts}
    if dry_run:
        echo("On a GPU the pass runs, from the checkout's root:")
        for step in (s for part in parts for s in planned[part]):
            echo(f"  [{step.part}] {step.command}")
        if cuda:
            return True
        echo("No GPU here: running a tiny CPU stand-in of each step instead.")
    device = torch.device("cuda" if cuda else "cpu")
    report = Report(out, datetime.date.today(), torch.cuda.get_device_name(device) if cuda else "dry-run", PARTS, dry_run)
    environment = describe(device)
    deadline = None if time_limit is None else time.monotonic() + time_limit
    ok = True
    for part in parts:
        report.start_part(part, environment)
        for step, gpu_step in zip(steps(part, DRY if dry_run else GPU), planned[part], strict=True):
            echo(f"[{part}] {step.title}: {step.command}")
            left = None if deadline is None else deadline - time.monotonic()
            result = run_step(step, left) if left is None or left > 0 else _not_run(step, time_limit)
            if dry_run:
                result["stands_in_for"] = gpu_step.command
            report.add_step(part, result)
            echo(f"  {result['status']}, {result['seconds']:.0f} s" + (f": {result['summary']}" if result.get("summary") else ""))
            ok = ok and result["status"] == "ok"
    echo(f"report: {report.md_path} (records in {report.json_path.name})")
    return ok


def _check_can_run(parts: Sequence[str]) -> None:
    """Before anything runs: the tests part needs the checkout's tests and pytest."""
    if "tests" not in parts:
        return
    if not (ROOT / "tests" / "conftest.py").is_file():
        raise TformerError(f"the tests part runs the checkout's tests, and {ROOT} has no tests/: run the GPU pass from a clone")
    if importlib.util.find_spec("pytest") is None:
        raise TformerError("the tests part needs pytest: pip install -e '.[dev]'")


def run_step(step: Step, seconds: float | None) -> dict:
    """Run `step` (stopped after `seconds`, None: no limit) and return its entry in the report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels unless the step asks
    env.update(step.env, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp) / RECORDS
        argv = [sys.executable, *(str(records) if a == RECORDS else a for a in step.argv)]
        began = time.monotonic()
        # A session of its own, so that a stop ends the step's own children too (compile workers).
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=seconds)
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill(proc)
            stdout, stderr = _remaining_output(proc)
            status = "timed out"
        except BaseException:  # Ctrl-C: the step is in another session and would run on
            _kill(proc)
            raise
        result = {"title": step.title, "command": step.command, "status": status, "returncode": proc.returncode,
                  "seconds": round(time.monotonic() - began, 1), "stdout": stdout[-OUTPUT_LIMIT:], "stderr": stderr[-OUTPUT_LIMIT:]}  # fmt: skip
        if records.exists():
            result["records"] = json.loads(records.read_text())
    result.update(_summary(result))
    if status == "ok" and result.get("counts", {}).get("flagged"):
        result["status"] = "flagged"
    return result


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def _remaining_output(proc: subprocess.Popen) -> tuple[str, str]:
    """What a stopped step printed (kept from before the stop too). A process that left the step's
    session could hold its pipes open forever: then the report is written without the output."""
    try:
        return proc.communicate(timeout=PIPE_GRACE_S)
    except subprocess.TimeoutExpired:
        return "", f"(output lost: a process the step started kept its pipes open for {PIPE_GRACE_S} s after the stop)"


def _not_run(step: Step, time_limit: float | None) -> dict:
    return {"title": step.title, "command": step.command, "status": "not run", "seconds": 0.0,
            "summary": f"the time limit of {time_limit:.0f} s was reached; run --part {step.part} again"}  # fmt: skip


def _summary(result: dict) -> dict:
    """`summary` and `counts`: pytest's closing line and its counts, or the records' statuses."""
    if "records" in result:
        rows = result["records"].get("records", [])
        counts = dict(Counter(str(r.get("status", "ok")) for r in rows))  # (the engine's rows have none)
        flagged = sum(bool(r.get("flagged")) for r in rows)
        counts |= {"flagged": flagged} if flagged else {}
        return {"summary": f"{len(rows)} rows: " + ", ".join(f"{n} {s}" for s, n in counts.items()), "counts": counts}
    last = next((line for line in reversed(result["stdout"].splitlines()) if line.strip()), "")
    found = re.search(r"\d+ (?:passed|failed|skipped|deselected|errors?|xfailed|xpassed).* in [\d.]+s", last)
    if not found:
        return {}
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", found[0])}
    return {"summary": found[0], "counts": counts}


def describe(device: torch.device) -> dict:
    """What the figures depend on, for the report's header."""
    env: dict = {"device": device_name(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["GPU"] = f"compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
        env["CUDA (torch's build)"] = torch.version.cuda
    env |= {"CPU cores": os.cpu_count(), "versions": versions(), "onnxruntime providers": _ort_providers(),
            "python": platform.python_version(), "platform": platform.platform(), "checkout": _checkout()}  # fmt: skip
    return env


def _ort_providers() -> list[str] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.get_available_providers()


def _checkout() -> str | None:
    """The commit the pass ran, and whether the code differed from it (reports under docs/ aside)."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=30)
        changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs"],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" with uncommitted changes" if changed.stdout.strip() else "")
