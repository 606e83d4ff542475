"""The GPU pass's report: one JSON file that every part updates, and the markdown rendered from it.

A GPU is lent here for half an hour now and then, one command at most ten minutes, so the pass runs
in parts, often one per command, and all of them land in the same report,
`YYYY-MM-DD-gpu-<device>.json` / `.md`. The JSON is the record: each part's steps as they ran
(command, exit status, seconds, output, embedded benchmark records). A part run again replaces its
own entry and leaves the others alone. The markdown is rendered from the whole JSON after every
step, so a command cut short still leaves a report of what finished. Both are written atomically.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping
from pathlib import Path

from tformer.errors import TformerError
from tformer.files import atomic_path, check_writable

FORMAT_VERSION = 1
KIND = "tformer GPU pass"


def report_stem(date: datetime.date, device: str) -> str:
    """`2026-11-26-gpu-nvidia-h100-80gb-hbm3` for device "NVIDIA H100 80GB HBM3"."""
    return f"{date.isoformat()}-gpu-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}"


class Report:
    """The report of `device`'s pass on `date` in `folder`, created or continued."""

    def __init__(self, folder: Path, date: datetime.date, device: str, parts: Mapping[str, str], dry_run: bool):
        """`parts`: every part's name and what it runs, in report order."""
        stem = report_stem(date, device)
        self.json_path = folder / f"{stem}.json"
        self.md_path = folder / f"{stem}.md"
        self.parts = dict(parts)
        check_writable(self.md_path)  # now, not after the first step's minutes
        self.data = self._read() if self.json_path.exists() else {
            "kind": KIND, "format_version": FORMAT_VERSION, "date": date.isoformat(), "device": device,
            "dry_run": dry_run, "created": _now(), "parts": {}}  # fmt: skip

    def _read(self) -> dict:
        try:
            data = json.loads(self.json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TformerError(f"{self.json_path}: cannot read it as a report ({exc}); move it away or pass another --out") from None
        if not isinstance(data, dict) or data.get("kind") != KIND or data.get("format_version") != FORMAT_VERSION:
            raise TformerError(f"{self.json_path}: not a GPU-pass report of format {FORMAT_VERSION}; move it away or pass another --out")
        return data

    def start_part(self, part: str, environment: dict) -> None:
        """Begin (or begin again) `part`: its earlier entry, if any, is replaced."""
        self.data["environment"] = environment
        self.data["parts"][part] = {"started": _now(), "environment": environment, "steps": []}

    def add_step(self, part: str, step: dict) -> None:
        """Record a finished step and rewrite both files."""
        self.data["parts"][part]["steps"].append(step)
        self.data["updated"] = _now()
        self.write()

    def write(self) -> None:
        with atomic_path(self.json_path) as tmp:
            Path(tmp).write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        with atomic_path(self.md_path) as tmp:
            Path(tmp).write_text(render(self.data, self.parts), encoding="utf-8")


def part_status(entry: dict) -> str:
    """"ok" when every step was; otherwise the first other status of a step ("failed", "timed out", "not run")."""
    return next((s["status"] for s in entry["steps"] if s["status"] != "ok"), "ok" if entry["steps"] else "not run")


def render(data: dict, parts: Mapping[str, str]) -> str:
    """The whole report as markdown: environment, a table of parts, then each part's steps."""
    env = data.get("environment", {})
    lines = [f"# GPU pass, {data['date']}: {data['device']}", ""]
    if data["dry_run"]:
        lines += ["**Dry run on a machine without a GPU.** Each step lists the command a GPU pass runs; what ran here",
                  "is a tiny CPU stand-in (the CUDA test selection, all skipped; toy benchmarks), whose numbers mean",
                  "nothing. It proves the plumbing: subprocesses, time limit, records, this report.", ""]  # fmt: skip
    lines += [
        "Written by `tformer-bench gpu-pass` (docs/bench.md, \"GPU pass\"). Commands ran from the checkout's root with the",
        "checkout first on `PYTHONPATH`; `--json records.json` stands for a temporary file whose records are",
        "embedded in the JSON report beside this file. A part run again replaces its own section.", "",
        "| environment | |", "| --- | --- |", *(f"| {k} | {_cell(v)} |" for k, v in env.items()), "",
        "| part | what | status | seconds | started (UTC) |", "| --- | --- | --- | ---: | --- |",
    ]  # fmt: skip
    for name, what in parts.items():
        entry = data["parts"].get(name)
        if entry is None:
            lines.append(f"| {name} | {what} | not run yet: `--part {name}` | | |")
        else:
            seconds = sum(s["seconds"] for s in entry["steps"])
            lines.append(f"| {name} | {what} | {part_status(entry)} | {seconds:.0f} | {entry['started'][:19]} |")
    for name in [p for p in parts if p in data["parts"]]:
        lines += ["", *_part_section(name, parts[name], data["parts"][name], env)]
    return "\n".join(lines) + "\n"


def _part_section(name: str, what: str, entry: dict, env: dict) -> list[str]:
    lines = [f"## {name}: {what}", ""]
    differs = [k for k in env if entry["environment"].get(k) != env[k]]
    if differs:
        lines += [f"Ran with another {', '.join(differs)} than the header: "
                  + "; ".join(f"{k} {_cell(entry['environment'].get(k))}" for k in differs), ""]  # fmt: skip
    for step in entry["steps"]:
        lines += [f"### {step['title']}: {step['status']}" + (f", {step['seconds']:.0f} s" if step["status"] != "not run" else ""), ""]
        lines += [f"`{step['command']}`", ""]
        if "stands_in_for" in step:
            lines += [f"On a GPU: `{step['stands_in_for']}`", ""]
        if step.get("summary"):
            lines += [f"**{step['summary']}**", ""]
        if step.get("stdout"):  # rich pads its tables' titles with spaces
            lines += ["```text", *(line.rstrip() for line in step["stdout"].rstrip().splitlines()), "```", ""]
        if step["status"] != "ok" and step.get("stderr"):
            lines += ["stderr, last lines:", "", "```text", *step["stderr"].rstrip().splitlines()[-30:], "```", ""]
    return lines[:-1]


def _cell(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
