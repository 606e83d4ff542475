"""`tformer-bench gpu-pass`: its orchestration on this CPU with fake steps (every part's steps run
as subprocesses that print and write what the real ones would, in milliseconds: the records, the
report, the summaries), the time limit, a part run again, and bad input; that every command the
pass runs on a GPU parses; and that the CUDA test selection has cases in every file the pass
counts on. The real steps run only on a GPU."""

from __future__ import annotations

import datetime
import json
import shutil
import time

import pytest
from click.testing import CliRunner

from tformer.bench import gpupass
from tformer.bench.cli import main as bench
from tformer.bench.gpupass import GPU, PARTS, RECORDS, Step, run_step, steps
from tformer.bench.gpureport import Report
from tformer.errors import TformerError
from tformer.files import proc_stat_fields

from conftest import CUDA

STEM = f"{datetime.date.today().isoformat()}-gpu-dry-run"
CUDA_TEST_FILES = ("test_model.py", "test_generate.py", "test_compile.py", "test_onnx.py", "test_kernels.py")

# A step's stand-in: prints what pytest or a benchmark would, and writes records where the step would.
FAKE_STEP = """
import json, sys
part, records = sys.argv[1], (sys.argv[2:] or [None])[0]
if part == "tests":
    print("tests/test_model.py::test_logits[cuda] SKIPPED (no CUDA GPU here)")
    print("========== 3 skipped, 40 deselected in 0.50s ==========")
else:
    rows = [{"backend": name, "status": "ok", "flagged": False} for name in ("eager", "naive")]
    print(f"{part}: e2e tok/s of {len(rows)} rows   ")
    json.dump({"meta": {"device": "cpu"}, "records": rows}, open(records, "w"))
"""


def fake_steps(part: str, sizes) -> list[Step]:
    """The pass's own steps on a GPU; elsewhere (the dry run) each one's fake stand-in."""
    real = REAL_STEPS(part, sizes)
    if sizes is GPU:
        return real
    return [Step(part, s.title, ("-c", FAKE_STEP, part, *([RECORDS] if RECORDS in s.argv else []))) for s in real]


REAL_STEPS = steps


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole pass, dry, with fake steps: (CliRunner result, report folder)."""
    if CUDA:
        pytest.skip("on a GPU the dry run only prints (test_dry_run_on_a_gpu_only_prints)")
    out = tmp_path_factory.mktemp("benchmarks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpupass, "steps", fake_steps)
        return CliRunner().invoke(bench, ["gpu-pass", "--dry-run", "--out", str(out)]), out


def test_dry_run_prints_the_gpu_steps_and_runs_their_stand_ins(dry_run):
    result, out = dry_run
    assert result.exit_code == 0, result.output
    for part in PARTS:
        for step in steps(part, GPU):
            assert f"[{part}] {step.command}" in result.output
            assert "--device cpu" not in step.command and "TRITON_INTERPRET" not in step.command
    assert "--device cuda --dtype bf16 --prompt-len 1024 --batch-sizes 1,8,32" in result.output
    assert "--kinds decode --device cuda --batch 1,8 --heads 16 --seq 1024,2048,4096,8192,16384 --head-dim 64,128" in result.output
    assert "engine --device cuda --decode-steps 1 --backends null,eager --batch-sizes 1,16,64" in result.output
    assert f"report: {out / STEM}.md" in result.output
    assert sorted(p.name for p in out.iterdir()) == [f"{STEM}.json", f"{STEM}.md"]


def test_dry_run_report_json(dry_run):
    _, out = dry_run
    data = json.loads((out / f"{STEM}.json").read_text())
    assert data["kind"] == "tformer GPU pass" and data["dry_run"] is True and data["device"] == "dry-run"
    assert list(data["parts"]) == list(PARTS)
    assert {"device", "versions", "onnxruntime providers", "python", "platform", "checkout"} <= set(data["environment"])
    for part, entry in data["parts"].items():
        assert [s["status"] for s in entry["steps"]] == ["ok"] * len(steps(part, GPU)), part
        assert [s["stands_in_for"] for s in entry["steps"]] == [s.command for s in steps(part, GPU)]
        assert all(s["returncode"] == 0 and s["seconds"] >= 0 for s in entry["steps"])
    (tests,) = data["parts"]["tests"]["steps"]
    assert tests["counts"] == {"skipped": 3, "deselected": 40} and tests["summary"] == "3 skipped, 40 deselected in 0.50s"
    assert "test_logits[cuda] SKIPPED (no CUDA GPU here)" in tests["stdout"] and "records" not in tests
    for part in ("bench-fp32", "bench-bf16", "kernels"):
        for step in data["parts"][part]["steps"]:
            assert [r["backend"] for r in step["records"]["records"]] == ["eager", "naive"]
            assert step["records"]["meta"]["device"] == "cpu" and step["counts"] == {"ok": 2}
            assert step["summary"] == "2 rows: 2 ok"
    assert [s["title"] for s in data["parts"]["kernels"]["steps"]] == ["prefill", "decode"]
    assert [s["title"] for s in data["parts"]["engine"]["steps"]] == ["8 decode steps a turn", "1 decode step a turn"]


def test_dry_run_report_markdown(dry_run):
    _, out = dry_run
    md = (out / f"{STEM}.md").read_text()
    assert md.startswith(f"# GPU pass, {datetime.date.today().isoformat()}: dry-run\n")
    assert "**Dry run on a machine without a GPU.**" in md and "| versions | torch " in md
    for part, what in PARTS.items():
        assert f"\n## {part}: {what}\n" in md and f"| {part} | {what} | ok |" in md
    assert md.count("\nOn a GPU: `python -m tformer.bench.cli ") == 8 and "\nOn a GPU: `python -m pytest -v -m cuda" in md
    assert "**2 rows: 2 ok**" in md and "bench-bf16: e2e tok/s of 2 rows\n" in md and "**3 skipped, 40 deselected" in md
    assert not any(line != line.rstrip() for line in md.splitlines())


def test_every_gpu_step_is_a_command_that_parses():
    """What the fake steps stand in for: each benchmark step's options as the real command parses
    them (an option renamed there would otherwise surface only on a GPU), and the tests step's
    marker is the suite's own."""
    for part in PARTS:
        for step in steps(part, GPU):
            if part == "tests":
                assert step.argv[:5] == ("-m", "pytest", "-v", "-m", "cuda") and step.argv[-1] == "tests"
                continue
            assert step.argv[:2] == ("-m", "tformer.bench.cli")
            name, *args = step.argv[2:]
            context = bench.commands[name].make_context(name, list(args))
            assert context.params["device"] == "cuda", step.command


def test_the_cuda_selection_has_cases_in_every_file_the_pass_counts_on(request):
    """`pytest -m cuda` (the tests part) selects each test file's `cuda` cases: found among this
    session's own collected tests, which must hold those files (the whole suite, as .ci/run runs it)."""
    collected = {item.path.name for item in request.session.items}
    if not set(CUDA_TEST_FILES) <= collected:
        pytest.skip("collects the CUDA cases from the whole suite's tests: run the suite, not this file alone")
    marked = {item.path.name for item in request.session.items if item.get_closest_marker("cuda")}
    assert set(CUDA_TEST_FILES) <= marked, set(CUDA_TEST_FILES) - marked
    assert any(line.startswith("cuda:") for line in request.config.getini("markers"))


def test_a_part_run_again_replaces_its_section_within_the_time_limit(dry_run, tmp_path, monkeypatch):
    """A part's first step outlasts --time-limit: recorded as timed out, the next as not run, the
    exit status is 1, and the other parts' sections stay as they were."""
    shutil.copytree(dry_run[1], tmp_path / "out")
    before = json.loads((tmp_path / "out" / f"{STEM}.json").read_text())

    def slow_step(step: Step, seconds: float | None) -> dict:
        time.sleep(seconds + 0.1)
        return {"title": step.title, "command": step.command, "status": "timed out", "returncode": -9, "seconds": seconds}

    monkeypatch.setattr(gpupass, "run_step", slow_step)
    result = CliRunner().invoke(bench, ["gpu-pass", "--dry-run", "--part", "bench-fp32", "--time-limit", "1",
                                        "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 1, result.output
    after = json.loads((tmp_path / "out" / f"{STEM}.json").read_text())
    timed_out, not_run = after["parts"]["bench-fp32"]["steps"]
    assert (timed_out["status"], not_run["status"]) == ("timed out", "not run")
    assert "time limit of 1 s was reached; run --part bench-fp32 again" in not_run["summary"]
    assert {k: v for k, v in after["parts"].items() if k != "bench-fp32"} == {
        k: v for k, v in before["parts"].items() if k != "bench-fp32"}  # fmt: skip
    assert "| bench-fp32 | tformer-bench, every backend, fp32 | timed out |" in (tmp_path / "out" / f"{STEM}.md").read_text()


def test_a_step_past_its_time_is_stopped_with_its_children():
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('child', child.pid, flush=True)\ntime.sleep(60)")  # fmt: skip
    began = time.monotonic()
    result = run_step(Step("tests", "sleeper", ("-c", code)), seconds=3)
    assert result["status"] == "timed out" and result["returncode"] == -9 and time.monotonic() - began < 30
    child = int(result["stdout"].split()[1])  # what it printed before it was stopped is kept
    assert _ends(child), "the step's own child outlived it"


def _ends(pid: int) -> bool:
    """Whether process `pid` is gone (or a zombie) within a few seconds."""
    for _ in range(50):
        fields = proc_stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(CUDA, reason="checks what a machine without a GPU says")
def test_without_a_gpu_the_pass_says_to_dry_run(tmp_path):
    result = CliRunner().invoke(bench, ["gpu-pass", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "Error: the GPU pass needs a CUDA GPU" in result.output and "--dry-run" in result.output
    assert list(tmp_path.iterdir()) == []


def test_bad_parts_are_a_one_line_error(tmp_path):
    result = CliRunner().invoke(bench, ["gpu-pass", "--dry-run", "--part", "tests,bench", "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "unknown part(s) bench; choose from tests,bench-fp32,bench-bf16,kernels" in result.output


def test_a_report_that_cannot_be_read_or_written_is_refused_up_front(tmp_path):
    today = datetime.date.today()
    (tmp_path / f"{STEM}.json").write_text('{"records": []}')
    with pytest.raises(TformerError, match=f"{STEM}.json: not a GPU-pass report of format 1; move it away"):
        Report(tmp_path, today, "dry-run", PARTS, dry_run=True)
    (tmp_path / f"{STEM}.json").write_text('{"kind": "tformer GPU pass", "format')
    with pytest.raises(TformerError, match=f"{STEM}.json: cannot read it as a report"):
        Report(tmp_path, today, "dry-run", PARTS, dry_run=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{STEM}.json"]
    with pytest.raises(TformerError, match="is a file, not a folder"):  # before any step runs
        Report(tmp_path / f"{STEM}.json" / "out", today, "dry-run", PARTS, dry_run=True)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU here")
def test_dry_run_on_a_gpu_only_prints(tmp_path):
    result = CliRunner().invoke(bench, ["gpu-pass", "--dry-run", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert all(f"[{s.part}] {s.command}" in result.output for part in PARTS for s in steps(part, GPU))
    assert list(tmp_path.iterdir()) == []
