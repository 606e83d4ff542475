"""ONNX export and the onnxruntime backend, against the tutorial model and against eager."""

from __future__ import annotations

import copy
import json

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

from conftest import TINY, cuda_case

ort = pytest.importorskip("onnxruntime")

NO_PROVIDER = "onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)"
DEVICES = ["cpu", cuda_case(None if "CUDAExecutionProvider" in ort.get_available_providers() else NO_PROVIDER)]


@pytest.fixture(scope="module")
def tutorial_export(tmp_path_factory):
    """A checkpoint saved by the tutorial's own code, exported through the CLI."""
    from conftest import make_reference_model

    root = tmp_path_factory.mktemp("onnx")
    ref = make_reference_model()
    torch.save(ref.state_dict(), root / "model.pt")
    result = CliRunner().invoke(export_cmd, [str(root / "model.pt"), "--nhead", "4"])
    assert result.exit_code == 0, result.output
    return ref, root / "model-onnx"


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory, trained):
    model, tokenizer = trained
    out = tmp_path_factory.mktemp("trained") / "export"
    export_model(model, out, "onnx", tokenizer)
    return out


def stock_logits(ref, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return ref(ids.T, ref.generate_square_subsequent_mask(ids.shape[1])).transpose(0, 1).numpy()


def test_tutorial_checkpoint_exports_and_validates(tutorial_export):
    _, out = tutorial_export
    # the export, plus the optimized-graph cache that validation's load wrote (not in `files`)
    assert sorted(p.name for p in out.iterdir()) == ["model.cpu.opt.json", "model.cpu.opt.onnx", "model.onnx", "tformer.json"]
    meta = json.loads((out / "tformer.json").read_text())
    assert meta["format_version"] == 2 and list(meta["files"]) == ["model.onnx"]
    assert [i["name"] for i in meta["inputs"]] == input_names(TINY.n_layers)
    assert [o["name"] for o in meta["outputs"]] == output_names(TINY.n_layers)
    assert meta["inputs"][3] == {"name": "past.0.key", "dtype": "float32", "shape": ["batch", 4, "past", 8]}
    assert meta["outputs"][1]["shape"] == ["batch", 4, "past + seq", 8]
    report = meta["validation"]
    assert report["checker"] == "ok" and report["greedy"]["identical"]
    assert {(r["batch"], r["seq"], r["past"]) for r in report["shapes"]} == {
        (b, s, p) for b in (1, 3) for s in (1, 17) for p in (0, 9)
    }
    assert all(r["ok"] and r["max_abs_diff"] <= 1e-4 for r in report["shapes"])


def test_exported_graph_matches_the_stock_encoder(tutorial_export):
    """Prefill, then 6 decode steps feeding presents back as pasts, vs the tutorial model."""
    ref, out = tutorial_export
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, TINY.vocab_size, (2, 15))
    expected = stock_logits(ref, ids)
    feeds = {"input_ids": ids[:, :9].numpy(), "position_ids": np.tile(np.arange(9), (2, 1)),
             "attention_mask": np.ones((2, 9), np.int64)}  # fmt: skip
    for name in input_names(TINY.n_layers)[3:]:
        feeds[name] = np.zeros((2, TINY.nhead, 0, TINY.head_dim), np.float32)
    logits, *presents = session.run(None, feeds)
    assert np.abs(logits - expected[:, :9]).max() <= 1e-4
    for t in range(9, 15):
        feeds = {"input_ids": ids[:, t : t + 1].numpy(), "position_ids": np.full((2, 1), t),
                 "attention_mask": np.ones((2, t + 1), np.int64),
                 **dict(zip(input_names(TINY.n_layers)[3:], presents))}  # fmt: skip
        logits, *presents = session.run(None, feeds)
        assert np.abs(logits[:, 0] - expected[:, t]).max() <= 1e-4, f"decode step {t}"


@pytest.mark.parametrize("device", DEVICES)
def test_onnx_backend_greedy_equals_eager_batched_padded_64_steps(trained, trained_export, device):
    model, tokenizer = trained
    runtime = tformer.load(trained_export, device=device)
    assert runtime.backend.name == "onnx" and runtime.tokenizer is not None  # tokenizer.json came along
    assert runtime.backend.device.type == device
    prompts = [tokenizer.encode(t) for t in ("x", "    def __init__(self, ", "import sys\nfrom os import path\n")]
    ours = runtime.generate_ids(prompts, max_new_tokens=64, temperature=0)
    eager = Runtime.from_model(copy.deepcopy(model), device=device).generate_ids(prompts, max_new_tokens=64, temperature=0)
    assert ours == eager
    assert all(len(set(row)) >= 5 for row in ours)
    assert runtime.generate("def ", max_new_tokens=20, temperature=0) == Runtime.from_model(
        copy.deepcopy(model), tokenizer, device=device
    ).generate("def ", max_new_tokens=20, temperature=0)


def test_load_checkpoint_on_onnx_exports_once_to_the_cache(tmp_path, monkeypatch, trained):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    model, tokenizer = trained
    save_checkpoint(tmp_path / "m.safetensors", model, tokenizer)
    first = tformer.load(tmp_path / "m.safetensors", backend="onnx", device="cpu")
    exports = list((tmp_path / "cache" / "onnx").iterdir())
    assert len(exports) == 1
    stamp = (exports[0] / "model.onnx").stat().st_mtime_ns
    second = tformer.load(tmp_path / "m.safetensors", backend="onnx", device="cpu")
    assert (exports[0] / "model.onnx").stat().st_mtime_ns == stamp  # reused, not exported again
    assert first.generate_ids([[1, 2, 3]], max_new_tokens=8, temperature=0) == second.generate_ids(
        [[1, 2, 3]], max_new_tokens=8, temperature=0
    )
    (exports[0] / "model.onnx").write_bytes(b"")  # a damaged cache entry is exported again, not reported
    third = tformer.load(tmp_path / "m.safetensors", backend="onnx", device="cpu")
    assert (exports[0] / "model.onnx").stat().st_size > 0
    assert third.generate_ids([[1, 2, 3]], max_new_tokens=8, temperature=0) == first.generate_ids(
        [[1, 2, 3]], max_new_tokens=8, temperature=0
    )


def no_leftovers(directory) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".")]


def test_bad_export_inputs(tmp_path, tutorial_export):
    ref, existing = tutorial_export
    torch.save(ref.state_dict(), tmp_path / "model.pt")
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


def test_failed_validation_names_the_shape_and_leaves_nothing(tmp_path, monkeypatch, reference_model):
    from conftest import tformer_copy

    monkeypatch.setitem(exporter.TOLERANCE, torch.float32, 0.0)  # nothing can pass
    with pytest.raises(TformerError, match=r"validation failed at batch 1, 1 new tokens, past 0"):
        export_model(tformer_copy(reference_model), tmp_path / "out", "onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_directory_runs_only_on_onnx(tutorial_export):
    with pytest.raises(TformerError, match="is an export for backend 'onnx', not 'eager'"):
        tformer.load(tutorial_export[1], backend="eager")


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_export_validates_at_its_own_tolerance(tmp_path, reference_model, device):
    """Validated (logits against PyTorch in fp16, then greedy tokens) and run on `device`."""
    from conftest import tformer_copy

    meta = export_model(tformer_copy(reference_model), tmp_path / "fp16", "onnx", dtype=torch.float16,
                        device=torch.device(device))  # fmt: skip
    assert meta["dtype"] == "float16" and meta["inputs"][3]["dtype"] == "float16"
    assert meta["validation"]["device"] == device and meta["validation"]["greedy"]["identical"]
    assert all(r["ok"] and r["tolerance"] == exporter.TOLERANCE[torch.float16] for r in meta["validation"]["shapes"])
    runtime = tformer.load(tmp_path / "fp16", device=device)
    assert runtime.backend.dtype == torch.float16 and runtime.backend.device.type == device
    assert len(runtime.generate_ids([[1, 2, 3], [4]], max_new_tokens=6)[1]) == 6
    with pytest.raises(TformerError, match="was exported as torch.float16"):
        tformer.load(tmp_path / "fp16", device="cpu", dtype="fp32")


def test_info_describes_a_verified_export_directory(tutorial_export):
    from tformer.cli import cli

    _, out = tutorial_export
    result = CliRunner().invoke(cli, ["info", str(out)])
    assert result.exit_code == 0, result.output
    assert f"directory   {out} (tformer-onnx export, format version 2)" in result.output
    assert "ONNX opset 18" in result.output and "heads       4" in result.output
    assert "verified    SHA-256 of model.onnx; model.onnx's embedded metadata matches tformer.json" in result.output


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


def test_a_supported_opset_is_the_graphs_own(tmp_path, reference_model):
    import onnx

    from conftest import tformer_copy

    meta = export_model(tformer_copy(reference_model), tmp_path / "out", "onnx", opset=17)
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert meta["opset"] == 17 == next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


def test_step_takes_non_contiguous_ids(tutorial_export):
    """IOBinding keeps only an address: a temporary contiguous copy of the ids must live until
    the run (a column slice of a batch is not contiguous)."""
    from tformer.backends import open_export

    backend = open_export(tutorial_export[1], torch.device("cpu"))
    ids = torch.randint(0, TINY.vocab_size, (2, 12))
    results = []
    for batch in (ids[:, 3:9], ids[:, 3:9].clone()):
        cache = backend.allocate_cache(2, 6)
        results.append(backend.step(batch, torch.arange(6), torch.tensor([0, 2]), cache))
    assert not ids[:, 3:9].is_contiguous() and torch.equal(results[0], results[1])
