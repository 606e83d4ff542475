"""The benchmark harness: statistics, skip path, correctness guard, output schema. No timing asserts."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from tformer.backends.eager import EagerBackend
from tformer.bench.cli import main as bench
from tformer.bench.ct2 import ct2_generation
from tformer.bench.harness import Clock, Record, benchmark_runtime, mark_noisy, run_benchmarks
from tformer.bench.report import print_table
from tformer.bench.stats import Spread, percentiles
from tformer.checkpoint import save_checkpoint
from tformer.config import ModelConfig
from tformer.model import TransformerLM
from tformer.reference import generate_full_recompute
from tformer.runtime import Runtime

from conftest import stock_copy

SMALL = ModelConfig(vocab_size=64, d_model=32, nhead=4, d_ff=64, n_layers=1, max_len=128)
FAST = dict(batch_sizes=(1, 2), prompt_len=4, new_tokens=5, repeats=2, warmup=1)


@pytest.fixture
def model() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(SMALL).eval()


def in_process(model):
    """`run_benchmarks`' default build, as a custom one: the rows' memory is then measured in this
    process, not each in a process of its own (test_cli_json_... checks those)."""
    return lambda name: Runtime.from_model(model, backend=name, device="cpu")


def test_percentiles_on_known_samples():
    assert percentiles(range(1, 101)) == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01})
    assert percentiles([4.0]) == {"p50": 4.0, "p90": 4.0, "p99": 4.0}
    assert percentiles([10, 20], qs=(0, 25, 100)) == {"p0": 10.0, "p25": 12.5, "p100": 20.0}
    assert Spread.of([3.0, 1.0, 2.0, 10.0]) == Spread(median=2.5, min=1.0, max=10.0)
    with pytest.raises(ValueError):
        percentiles([])


def test_unavailable_backends_are_skipped_with_the_reason(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    monkeypatch.setattr("tformer.kernels.launch.INTERPRET", False)  # as on a CPU without the interpreter
    records = run_benchmarks(model, ["eager", "triton", "onnx", "hf", "ct2"], **FAST, build=in_process(model))
    by_name = {(r.backend, r.batch_size): r for r in records}
    assert by_name["triton", 1].status == "skipped" and "needs a CUDA GPU" in by_name["triton", 1].reason
    assert "TRITON_INTERPRET=1" in by_name["triton", 1].reason
    assert by_name["onnx", 2].status == "skipped" and "onnxruntime is not installed" in by_name["onnx", 2].reason
    assert by_name["hf", 2].status == "skipped" and "transformers is not installed" in by_name["hf", 2].reason
    assert by_name["hf", 1].e2e_tok_s is None
    assert by_name["ct2", 1].status == "skipped" and by_name["ct2", 1].reason == "ctranslate2 is not installed (pip install 'tformer[ct2]')"
    assert by_name["eager", 2].status == "ok" and by_name["eager", 2].e2e_tok_s.median > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only where there is no GPU")
def test_interpreted_triton_is_skipped_not_timed(model):
    pytest.importorskip("triton")
    records = run_benchmarks(model, ["eager", "triton"], **FAST, build=in_process(model))
    triton_rows = [r for r in records if r.backend == "triton"]
    assert triton_rows and all(r.status == "skipped" and "interpreter" in r.reason for r in triton_rows)


class WrongBackend(EagerBackend):
    """Deliberately wrong, and faster than any real row: predicts the input id + 1, no model."""

    name = "wrong"

    def step(self, batch, cache):
        last = batch.input_ids[torch.arange(batch.size), batch.lengths - batch.start - 1]  # (B,) each row's last new token
        return torch.nn.functional.one_hot((last + 1) % self.config.vocab_size, self.config.vocab_size).float()


def build_with_wrong(model):
    def build(name):
        if name == "wrong":
            return Runtime(WrongBackend(model, torch.device("cpu"), torch.float32), None)
        return Runtime.from_model(model, backend=name, device="cpu")

    return build


def test_a_backend_that_disagrees_with_eager_is_flagged_and_never_ranked(model):
    records = run_benchmarks(model, ["eager", "naive", "wrong"], build=build_with_wrong(model), **FAST)
    wrong = [r for r in records if r.backend == "wrong"]
    assert all(r.status == "mismatch" and r.flagged and r.matches_eager is False for r in wrong)
    assert "greedy tokens differ from eager" in wrong[0].reason
    assert all(r.matches_eager and not r.flagged for r in records if r.backend in ("eager", "naive"))
    console = Console(record=True, width=250)
    print_table(records, "test", console)
    text = console.export_text()
    assert "MISMATCH" in text and "! wrong batch 1: greedy tokens differ from eager" in text
    assert "fastest is wrong" not in text and "batch 1: fastest is" in text


def test_the_ct2_row_runs_the_tutorial_model_converted_exactly(trained):
    """CTranslate2's greedy tokens from the converted weights are the tutorial loop's own, batched,
    each step ticked once; its end token is never picked. (The row's prompts share one length, as
    the benchmark's do: CTranslate2 steps through the tail of a longer prompt as generation.)"""
    pytest.importorskip("ctranslate2")
    model, tokenizer = trained
    make_run, implementation, _ = ct2_generation(model, torch.device("cpu"), torch.float32)
    prompts = [tokenizer.encode(t)[:5] for t in ("def main(", "import sys\nfrom os import path\n", "class Foo:\n")]
    assert {len(p) for p in prompts} == {5}
    ticks = []
    ours = make_run(prompts, 48)(lambda at: ticks.append(at))
    reference = stock_copy(model)
    assert ours == [generate_full_recompute(reference, [prompt], 48)[0] for prompt in prompts]
    assert len(ticks) == 48 and ticks == sorted(ticks) and "CTranslate2" in implementation
    assert all(len(set(tokens)) >= 5 for tokens in ours), "degenerate output would make this comparison meaningless"


def test_benchmark_runtime_is_a_library_call(model):
    runtime = Runtime.from_model(model, device="cpu")
    record = benchmark_runtime(runtime, batch_size=3, prompt_len=4, new_tokens=6, repeats=2, warmup=0)
    assert isinstance(record, Record)
    assert (record.backend, record.batch_size, record.status, record.dtype) == ("eager", 3, "ok", "float32")
    assert record.ttft_ms.min <= record.ttft_ms.median <= record.ttft_ms.max
    assert set(record.itl_ms) == {"p50", "p90", "p99"} and record.peak_mem_mib > 0


RECORD_FIELDS = {
    "backend", "batch_size", "prompt_len", "new_tokens", "status", "reason", "device", "device_name", "dtype",
    "implementation", "notes", "versions", "repeats", "warmup", "setup_s", "warmup_s", "warm_setup_s", "ttft_ms", "itl_ms", "decode_tok_s",
    "e2e_tok_s", "e2e_samples", "peak_mem_mib", "mem_source", "cache_mib", "mem_base_mib", "matches_eager", "vs_naive", "vs_eager",
    "vs_floor", "vs_ct2", "noisy", "flagged",
}  # fmt: skip


def test_cli_json_csv_and_plot_schema_and_each_rows_memory_in_a_process_of_its_own(tmp_path, model, monkeypatch):
    """The records' schema in JSON, CSV and the plot; and each row's memory: in one process every
    row would count what this process already holds (here 512 MiB of ballast, as earlier rows
    would leave); each row's own process holds only that row."""
    monkeypatch.setattr("tformer.kernels.launch.INTERPRET", False)  # triton: a skipped row, not minutes interpreted
    save_checkpoint(tmp_path / "m.safetensors", model)
    ballast = torch.ones(512 * 2**18)  # 512 MiB, touched
    with open("/proc/self/status") as f:
        here = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    out = {ext: tmp_path / f"bench.{ext}" for ext in ("json", "csv", "png")}
    result = CliRunner().invoke(bench, [
        str(tmp_path / "m.safetensors"), "--backends", "floor,eager,naive,triton,ct2", "--batch-sizes", "1,2", "--prompt-len", "4",
        "--new-tokens", "5", "--repeats", "2", "--device", "cpu",
        "--json", str(out["json"]), "--csv", str(out["csv"]), "--plot", str(out["png"]),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "e2e tok/s" in result.output and "skipped triton" in result.output
    data = json.loads(out["json"].read_text())
    assert data["meta"]["batch_sizes"] == [1, 2] and data["meta"]["config"]["d_model"] == 32
    assert len(data["records"]) == 10
    for record in data["records"]:
        assert set(record) == RECORD_FIELDS
        assert set(record["versions"]) == {"torch", "triton", "onnxruntime", "transformers", "ctranslate2"}
        if record["status"] == "ok":
            assert set(record["ttft_ms"]) == set(record["e2e_tok_s"]) == {"median", "min", "max"}
            assert set(record["itl_ms"]) == {"p50", "p90", "p99"}
            assert record["vs_naive"] > 0 and record["vs_eager"] > 0 and record["vs_floor"] > 0 and record["vs_ct2"] > 0
            assert record["matches_eager"] is True  # the floor's bare loop and CTranslate2 too
            assert len(record["e2e_samples"]) == 2 and record["e2e_tok_s"]["max"] == max(record["e2e_samples"])
            assert "process that set up this row alone" in record["mem_source"]
            assert 0 < record["mem_base_mib"] < record["peak_mem_mib"] < here - 256, (record, here)
            assert record["warm_setup_s"] is None  # neither compiles
    del ballast
    eager1 = next(r for r in data["records"] if r["backend"] == "eager" and r["batch_size"] == 1)
    assert eager1["vs_eager"] == pytest.approx(1.0)
    rows = list(csv.DictReader(out["csv"].open()))
    assert len(rows) == 10 and "itl_ms.p99" in rows[0] and "versions.torch" in rows[0]
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backends", "eager,tensorrt"], "unknown backend(s) tensorrt"),
        (["--batch-sizes", "1,x"], 'expected comma-separated integers, got "1,x"'),
        (["--batch-sizes", "0"], "expected positive integers"),
        (["--new-tokens", "6000"], "exceeds the context of 5000"),
        (["nope.pt"], "nope.pt: file not found"),
    ],
)
def test_cli_bad_input(args, message):
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(bench, ["--plot", "x.png"])
    assert result.exit_code == 2 and "pip install 'tformer[plot]'" in result.output


class Paced(EagerBackend):
    """eager's tokens at a set pace on the machine's fake clock: each step takes `delay` s, plus
    `machine.extra` s while the machine is in a noisy spell. Logs the start of each of its
    generations on the machine."""

    def __init__(self, model, name, delay, machine):
        super().__init__(model, torch.device("cpu"), torch.float32)
        self.name, self.delay, self.machine = name, delay, machine

    def step(self, batch, cache):
        if 0 in batch.host_start:  # a row's first chunk: a generation begins
            self.machine.log.append((self.name, self.machine.noisy))
        self.machine.clock.sleep(self.delay + (self.machine.extra if self.machine.noisy else 0.0))
        return super().step(batch, cache)


class Machine:
    """Shared by the paced backends: a fake clock that moves only when a step or the benchmark's
    pause says so, and a noisy spell that lasts while the benchmark times round `spell`."""

    def __init__(self, spell: str, extra: float):
        self.spell, self.extra, self.noisy, self.log, self.t = spell, extra, False, [], 0.0
        self.clock = Clock(now=lambda: self.t, sleep=self._advance)

    def _advance(self, seconds: float) -> None:
        self.t += seconds

    def progress(self, what: str) -> None:
        self.noisy = self.spell in what


def test_a_noisy_spell_slows_one_round_of_every_row_and_no_rank_changes(model):
    """Timed repeats run in rounds, each round every row once in a rotated order, so a noisy spell
    of the machine costs each row one repeat; the median (and the rank by it) ignores it. Timed one
    row after another, the same spell would cost one row several repeats. On a fake clock: the
    figures are exact, whatever the machine's speed."""
    machine = Machine("round 2/5", extra=0.1)  # 100 ms more per step during the second round

    def build(name):
        delay = {"quick": 0.002, "steady": 0.01}.get(name)
        backend = Paced(model, name, delay, machine) if delay else EagerBackend(model, torch.device("cpu"), torch.float32)
        return Runtime(backend, None)

    records = run_benchmarks(model, ["quick", "steady"], batch_sizes=(1,), prompt_len=4, new_tokens=5, repeats=5,
                             warmup=1, build=build, progress=machine.progress, clock=machine.clock)  # fmt: skip
    quick, steady = records
    timed = [name for name, _ in machine.log[4:]]  # after each row's correctness check and warm-up
    assert timed == ["quick", "steady", "steady", "quick", "quick", "steady", "steady", "quick", "quick", "steady"]
    assert [noisy for _, noisy in machine.log] == [False] * 6 + [True] * 2 + [False] * 6
    # 5 steps a run: quick 10 ms (102 ms in the spell), steady 50 ms (550 ms): 5 tokens each
    assert quick.e2e_samples == pytest.approx([500, 5 / 0.51, 500, 500, 500])
    assert steady.e2e_samples == pytest.approx([100, 5 / 0.55, 100, 100, 100])
    assert (quick.e2e_tok_s.median, steady.e2e_tok_s.median) == pytest.approx((500, 100))
    assert quick.e2e_tok_s.min < steady.e2e_tok_s.median  # quick's slow repeat is slower than steady's typical one
    # Its 4 decode steps run as one turn of the engine (multi-step decode): they arrive together,
    # 8 ms after the first token, and ITL is the gap between arrivals.
    assert quick.ttft_ms.median == pytest.approx(2) and quick.itl_ms["p50"] == pytest.approx(8)
    assert not quick.noisy and not steady.noisy and quick.matches_eager and steady.matches_eager
    assert "in this process (the other rows' memory included)" in quick.mem_source  # a custom build: no own process
    console = Console(record=True, width=250)
    print_table(records, "test", console)
    text = console.export_text()
    assert "batch 1: fastest is quick" in text and "too noisy" not in text and "5 rounds" in text


def row(name: str, median: float, low: float, high: float, status: str = "ok") -> Record:
    return Record(name, 1, 4, 5, status, e2e_tok_s=Spread(median, low, high), ttft_ms=Spread(1.0, 1.0, 1.0))


def test_rows_that_their_spread_cannot_tell_apart_are_marked_too_noisy_to_rank():
    records = [row("a", 100, 90, 105), row("b", 96, 60, 101), row("c", 50, 48, 60), row("d", 200, 10, 300, "mismatch")]
    mark_noisy(records)
    a, b, c, d = records
    assert "b's fastest repeat (101 tok/s) reaches a's median (100): too noisy to rank a above b" == a.noisy == b.noisy
    assert not c.noisy and not d.noisy  # c's fastest (60) is below b's median (96); a mismatch is never ranked
    console = Console(record=True, width=250)
    print_table(records, "test", console)
    text = console.export_text()
    assert "100 (90-105)~" in text and "50 (48-60) " in text
    assert "batch 1: fastest is a (100 tok/s end to end) by median, but too noisy to rank (~)" in text
    assert "~ batch 1: b's fastest repeat (101 tok/s) reaches a's median (100)" in text


def test_skip_reasons_print_their_brackets(model, monkeypatch):
    """rich reads "[hf]" as markup: the install hints must reach the terminal whole."""
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    records = run_benchmarks(model, ["onnx", "hf"], **FAST)
    console = Console(record=True, width=250)
    print_table(records, "test", console)
    text = console.export_text()
    assert "skipped hf: transformers is not installed (pip install 'tformer[hf]')" in text
    assert "skipped onnx: onnxruntime is not installed (pip install 'tformer[onnx]')" in text


def test_engine_cli_gives_the_host_cost_of_a_step_over_the_null_backend_and_a_real_one(tmp_path, model):
    """`tformer-bench engine`: the null backend's step is the engine alone (no backend time
    reported); a real backend's step splits into its call and the host's share."""
    save_checkpoint(tmp_path / "m.safetensors", model)
    out = tmp_path / "engine.json"
    result = CliRunner().invoke(bench, ["engine", str(tmp_path / "m.safetensors"), "--backends", "null,eager",
                                        "--batch-sizes", "1,4", "--steps", "6", "--repeats", "2", "--device", "cpu",
                                        "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "host us" in result.output and "steps/s" in result.output
    records = {(r["backend"], r["batch_size"]): r for r in json.loads(out.read_text())["records"]}
    assert set(records) == {("null", 1), ("null", 4), ("eager", 1), ("eager", 4)}
    for (name, _), r in records.items():
        assert r["steps"] == 6 and 0 < r["host_us"]["median"] <= r["step_us"]["median"]
        assert r["steps_per_s"] == pytest.approx(1e6 / r["step_us"]["median"])
        assert (r["backend_us"] is None) == (name == "null")
        if name == "eager":
            assert 0 < r["backend_us"]["median"] < r["step_us"]["median"]


def test_throughput_cli_runs_both_batching_modes_side_by_side(tmp_path, model):
    from tformer.bench.cli import main as bench

    save_checkpoint(tmp_path / "m.safetensors", model)
    out = tmp_path / "t.json"
    result = CliRunner().invoke(bench, [
        "throughput", str(tmp_path / "m.safetensors"), "--backends", "eager,naive", "--requests", "6",
        "--prompt-len", "2:6", "--output-len", "1:5", "--batch-size", "3", "--rate", "500", "--device", "cpu",
        "--json", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "output tok/s" in result.output and "x static" in result.output
    data = json.loads(out.read_text())
    assert [(r["backend"], r["mode"]) for r in data["records"]] == [
        ("eager", "continuous"), ("eager", "static"), ("naive", "continuous"), ("naive", "static")]
    for r in data["records"]:
        assert r["status"] == "ok" and r["requests"] == 6 and r["output_tok_s"]["median"] > 0
        assert set(r["ttft_ms"]) == {"mean", "p50", "p99"} and r["e2e_ms"]["p99"] >= r["ttft_ms"]["p50"]
    assert data["meta"]["rate"] == 500 and data["records"][0]["vs_static"] > 0


def test_throughput_ranges_are_checked():
    from tformer.bench.cli import main as bench

    result = CliRunner().invoke(bench, ["throughput", "--prompt-len", "9:3"])
    assert result.exit_code == 2 and "--prompt-len must satisfy 1 <= LOW <= HIGH, got '9:3'" in result.output
