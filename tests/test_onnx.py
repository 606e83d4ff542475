"""ONNX export and the onnxruntime backend, against the tutorial model and against eager."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tformer
from tformer.checkpoint import save_checkpoint
from tformer.cli import export_cmd
from tformer.errors import TformerError
from tformer import exporter
from tformer.export.onnx import input_names, output_names
from tformer.exporter import export_model
from tformer.runtime import Runtime

from conftest import cuda_case, reference_of, token_ids

ort = pytest.importorskip("onnxruntime")

NO_PROVIDER = "onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)"
DEVICES = ["cpu", cuda_case(None if "CUDAExecutionProvider" in ort.get_available_providers() else NO_PROVIDER)]


@pytest.fixture(scope="module")
def export(trained, onnx_export):
    """The session's ONNX export of the trained model (made by `tformer-export`), and the tutorial's
    own model with the same weights: (reference, export directory, config)."""
    return reference_of(trained[0]), onnx_export, trained[0].config


def stock_logits(ref, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return ref(ids.T, ref.generate_square_subsequent_mask(ids.shape[1])).transpose(0, 1).numpy()


def test_checkpoint_exports_and_validates(export):
    _, out, c = export
    # the export, plus the optimized-graph cache that validation's load wrote (not in `files`)
    assert sorted(p.name for p in out.iterdir()) == [
        "model.cpu.opt.json", "model.cpu.opt.onnx", "model.onnx", "tformer.json", "tokenizer.json"]  # fmt: skip
    meta = json.loads((out / "tformer.json").read_text())
    assert meta["format_version"] == 3 and list(meta["files"]) == ["model.onnx", "tokenizer.json"]
    assert [i["name"] for i in meta["inputs"]] == input_names(c.n_layers)
    assert [o["name"] for o in meta["outputs"]] == output_names(c.n_layers)
    assert meta["inputs"][3] == {"name": "last_index", "dtype": "int64", "shape": ["batch"]}
    assert meta["inputs"][4] == {"name": "past.0.key", "dtype": "float32", "shape": ["batch", c.nhead, "past", c.head_dim]}
    assert meta["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", c.vocab_size]}
    assert meta["outputs"][1] == {"name": "new.0.key", "dtype": "float32", "shape": ["batch", c.nhead, "seq", c.head_dim]}
    report = meta["validation"]
    assert report["checker"] == "ok" and report["greedy"]["identical"]
    assert {(r["batch"], r["seq"], r["past"]) for r in report["shapes"]} == {
        (b, s, p) for b in (1, 3) for s in (1, 17) for p in (0, 9)
    }
    assert all(r["ok"] and r["max_abs_diff"] <= 1e-4 for r in report["shapes"])


def readme_contract(n_layers: int, dtype: str, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """The table of the graph's inputs and outputs in docs/export.md, read as an app developer
    would: `{i}` expanded over the layers, "model dtype" and the named sizes filled in."""
    text = (Path(__file__).parents[1] / "docs" / "export.md").read_text()
    table = text[text.index("| name | dtype | shape | meaning |") :].split("\n\n")[0].splitlines()[2:]
    contract: dict[str, list[dict]] = {"inputs": [], "outputs": []}
    for line in table:
        names, kind, shape = (cell.strip() for cell in line.strip("|").split(" | ")[:3])
        dims = [sizes.get(d, d) for d in shape.strip("`[]").split(", ")]
        entries = [
            {"name": name.replace("{i}", str(i)), "dtype": dtype if kind == "model dtype" else kind, "shape": dims}
            for i in range(n_layers if "{i}" in names else 1) for name in re.findall(r"`([^`]+)`", names)
        ]  # fmt: skip
        contract["outputs" if "(output" in names else "inputs"] += entries
    return contract


def test_docs_table_is_the_graphs_contract(export):
    """Apps in other languages code against docs/export.md's table alone: it must be exactly what
    tformer.json lists, and what the graph itself takes and returns."""
    _, out, c = export
    meta = json.loads((out / "tformer.json").read_text())
    sizes = {"heads": c.nhead, "head_dim": c.head_dim, "vocab": c.vocab_size}
    assert readme_contract(c.n_layers, "float32", sizes) == {"inputs": meta["inputs"], "outputs": meta["outputs"]}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i["name"] for i in meta["inputs"]]
    assert [o.name for o in session.get_outputs()] == [o["name"] for o in meta["outputs"]]


def test_graph_serves_rows_of_different_lengths_in_one_call(export):
    """The contract driven by hand, as an app would from docs/export.md's table: the caller keeps each
    row's keys and values; rows at different lengths (prefill chunks beside decodes, a row joining
    with no past, a row sitting a step out) share each call. Every row's logits equal the tutorial
    model's on that row's sequence alone, and holes (past slots beyond a row's length, padding)
    hold large garbage that must never be attended to."""
    ref, out, c = export
    meta = json.loads((out / "tformer.json").read_text())
    past_names = [i["name"] for i in meta["inputs"][4:]]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    plan = [(5, 9, 0), (1, 5, 2), (1, 0, 1), (1, 1, 3), (1, 1, 0)]  # new tokens of each row per call (0: not in it)
    seqs = [rng.integers(0, c.vocab_size, sum(counts)) for counts in zip(*plan)]
    cache = [[np.zeros((c.nhead, 0, c.head_dim), np.float32) for _ in past_names] for _ in seqs]
    for counts in plan:
        rows = [r for r, n in enumerate(counts) if n]
        B, T, P = len(rows), max(counts), max(cache[r][0].shape[1] for r in rows)
        feeds = {"input_ids": rng.integers(0, c.vocab_size, (B, T)), "position_ids": np.zeros((B, T), np.int64),
                 "attention_mask": np.zeros((B, P + T), np.int64), "last_index": np.zeros(B, np.int64),
                 **{name: rng.normal(0, 1e3, (B, c.nhead, P, c.head_dim)).astype(np.float32)
                    for name in past_names}}  # fmt: skip
        for b, r in enumerate(rows):
            n, p = counts[r], cache[r][0].shape[1]
            feeds["input_ids"][b, :n] = seqs[r][p : p + n]
            feeds["position_ids"][b, :n] = np.arange(p, p + n)
            feeds["attention_mask"][b, :p] = feeds["attention_mask"][b, P : P + n] = 1
            feeds["last_index"][b] = n - 1
            for name, kept in zip(past_names, cache[r]):
                feeds[name][b, :, :p] = kept
        logits, *new = session.run(None, feeds)
        for b, r in enumerate(rows):
            n, p = counts[r], cache[r][0].shape[1]
            cache[r] = [np.concatenate([kept, fresh[b, :, :n]], axis=1) for kept, fresh in zip(cache[r], new)]
            expected = stock_logits(ref, torch.from_numpy(seqs[r][None, : p + n]))[0, -1]
            assert np.abs(logits[b] - expected).max() <= 1e-4, (counts, r)
    assert [c[0].shape[1] for c in cache] == [len(s) for s in seqs]


@pytest.mark.parametrize("device", DEVICES)
def test_onnx_backend_greedy_equals_eager_batched_padded_64_steps(trained, onnx_export, device):
    model, tokenizer = trained
    runtime = tformer.load(onnx_export, device=device)
    assert runtime.backend.name == "onnx" and runtime.tokenizer is not None  # tokenizer.json came along
    assert runtime.backend.device.type == device
    prompts = [tokenizer.encode(t) for t in ("x", "    def __init__(self, ", "import sys\nfrom os import path\n")]
    ours = token_ids(runtime, prompts, max_new_tokens=64, temperature=0)
    eager = token_ids(Runtime.from_model(copy.deepcopy(model), device=device), prompts, max_new_tokens=64, temperature=0)
    assert ours == eager
    assert all(len(set(row)) >= 5 for row in ours)
    assert runtime.generate("def ", max_new_tokens=20, temperature=0) == Runtime.from_model(
        copy.deepcopy(model), tokenizer, device=device
    ).generate("def ", max_new_tokens=20, temperature=0)


def reuse_graph(monkeypatch, onnx_export: Path) -> list[Path]:
    """From now on, exports of the trained model (fp32, default opset) skip the tracing: the
    session export's graph (the same weights and shapes) is written in place with this export's
    embedded metadata, and the rest of the export (checker, hashes, tformer.json, validation)
    runs as ever. Returns the list of the paths so written."""
    import onnx

    written: list[Path] = []

    def copy_graph(model, path, opset, embedded):
        graph = onnx.load(str(onnx_export / "model.onnx"))
        del graph.metadata_props[:]
        onnx.helper.set_model_props(graph, embedded)
        onnx.save(graph, str(path))
        written.append(path)

    monkeypatch.setattr("tformer.export.onnx._export", copy_graph)
    return written


def test_load_checkpoint_on_onnx_exports_once_to_the_cache(tmp_path, monkeypatch, trained, onnx_export):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    model, tokenizer = trained
    save_checkpoint(tmp_path / "m.safetensors", model, tokenizer)
    first = tformer.load(tmp_path / "m.safetensors", backend="onnx", device="cpu")
    exports = list((tmp_path / "cache" / "onnx").iterdir())
    assert len(exports) == 1
    stamp = (exports[0] / "model.onnx").stat().st_mtime_ns
    second = tformer.load(tmp_path / "m.safetensors", backend="onnx", device="cpu")
    assert (exports[0] / "model.onnx").stat().st_mtime_ns == stamp  # reused, not exported again
    want = token_ids(first, [[1, 2, 3]], max_new_tokens=8, temperature=0)
    assert token_ids(second, [[1, 2, 3]], max_new_tokens=8, temperature=0) == want
    (exports[0] / "model.onnx").write_bytes(b"")  # a damaged cache entry is exported again, not reported
    written = reuse_graph(monkeypatch, onnx_export)  # the export again, without its tracing
    third = tformer.load(tmp_path / "m.safetensors", backend="onnx", device="cpu")
    assert len(written) == 1 and (exports[0] / "model.onnx").stat().st_size > 0
    assert token_ids(third, [[1, 2, 3]], max_new_tokens=8, temperature=0) == want


def no_leftovers(directory) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".")]


def test_bad_export_inputs(tmp_path, reference_model, onnx_export):
    existing = onnx_export
    torch.save(reference_model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "afile").write_text("x")
    cases = [
        ([str(tmp_path / "absent.pt"), "--nhead", "4"], "absent.pt: file not found"),
        ([str(tmp_path / "model.pt"), "--nhead", "5"], "nhead=5 does not divide d_model=32"),
        ([str(tmp_path / "model.pt")], "pass nhead= (CLI: --nhead N)"),
        ([str(tmp_path / "model.pt"), "--nhead", "4", "-o", str(tmp_path / "afile" / "out")], "cannot write to"),
        ([str(tmp_path / "model.pt"), "--nhead", "4", "-o", str(existing)], "already exists; pass --force"),
    ]
    before = sorted(p.name for p in existing.iterdir())
    for args, message in cases:
        result = CliRunner().invoke(export_cmd, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert sorted(p.name for p in existing.iterdir()) == before
    assert no_leftovers(tmp_path) and no_leftovers(existing.parent) and not (tmp_path / "model-onnx").exists()


def test_failed_validation_names_the_shape_and_leaves_nothing(tmp_path, monkeypatch, trained, onnx_export):
    monkeypatch.setitem(exporter.TOLERANCE, torch.float32, 0.0)  # nothing can pass
    written = reuse_graph(monkeypatch, onnx_export)
    with pytest.raises(TformerError, match=r"validation failed at batch 1, 1 new tokens, past 0"):
        export_model(trained[0], tmp_path / "out", "onnx")
    assert written and list(tmp_path.iterdir()) == []


def test_export_directory_runs_only_on_onnx(onnx_export):
    with pytest.raises(TformerError, match="is an export for backend 'onnx', not 'eager'"):
        tformer.load(onnx_export, backend="eager")


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_export_at_a_chosen_opset_validates_at_its_own_tolerance(tmp_path, reference_model, device):
    """Validated (logits against PyTorch in fp16, then greedy tokens) and run on `device`; the
    opset asked for (17, not the default 18) is the graph's own."""
    import onnx

    from conftest import tformer_copy

    meta = export_model(tformer_copy(reference_model), tmp_path / "fp16", "onnx", dtype=torch.float16,
                        device=torch.device(device), opset=17)  # fmt: skip
    graph = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    assert meta["opset"] == 17 == next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert meta["dtype"] == "float16" and meta["inputs"][4]["dtype"] == "float16"
    assert meta["validation"]["device"] == device and meta["validation"]["greedy"]["identical"]
    assert all(r["ok"] and r["tolerance"] == exporter.TOLERANCE[torch.float16] for r in meta["validation"]["shapes"])
    runtime = tformer.load(tmp_path / "fp16", device=device)
    assert runtime.backend.dtype == torch.float16 and runtime.backend.device.type == device
    assert len(token_ids(runtime, [[1, 2, 3], [4]], max_new_tokens=6)[1]) == 6
    with pytest.raises(TformerError, match="was exported as torch.float16"):
        tformer.load(tmp_path / "fp16", device="cpu", dtype="fp32")


def test_info_describes_a_verified_export_directory(onnx_export):
    from tformer.cli import cli

    out = onnx_export
    result = CliRunner().invoke(cli, ["info", str(out)])
    assert result.exit_code == 0, result.output
    assert f"directory   {out} (tformer-onnx export, format version 3)" in result.output
    assert "ONNX opset 18" in result.output and "heads       4" in result.output
    assert "verified    SHA-256 of model.onnx, tokenizer.json; model.onnx's embedded metadata matches tformer.json" in result.output


@pytest.mark.parametrize("opset", [5, 16, 23, 99])
def test_unsupported_opsets_are_refused_up_front(tmp_path, reference_model, opset):
    from conftest import tformer_copy

    torch.save(reference_model.state_dict(), tmp_path / "model.pt")
    result = CliRunner().invoke(export_cmd, [str(tmp_path / "model.pt"), "--nhead", "4", "--opset", str(opset)])
    assert result.exit_code == 2 and f"'--opset': {opset} is not in the range 17<=x<=22" in result.output
    assert result.output.count("\n") == 1
    with pytest.raises(TformerError, match=f"opset {opset} is not supported; use 17 to 22"):
        export_model(tformer_copy(reference_model), tmp_path / "out", "onnx", opset=opset)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_step_takes_a_batch_of_non_contiguous_ids(export):
    """IOBinding keeps only an address: what it binds must be contiguous and live until the run.
    A `Batch` copies the ids into its own buffer (a column slice of a batch is not contiguous)."""
    from tformer.backends import open_export
    from tformer.backends.batch import Batch

    _, out, c = export
    backend = open_export(out, torch.device("cpu"))
    ids = torch.randint(0, c.vocab_size, (2, 12))
    results = []
    for columns in (ids[:, 3:9], ids[:, 3:9].clone()):
        batch = Batch.of(columns, [0, 0], [6, 4], [1, 0])
        assert all(t.is_contiguous() for t in (batch.input_ids, batch.start, batch.lengths, batch.rows))
        results.append(backend.step(batch, backend.allocate_cache(2, 6)))
    assert not ids[:, 3:9].is_contiguous() and torch.equal(results[0], results[1])
