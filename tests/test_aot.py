"""AOTInductor `.pt2` export: validated, same tokens as eager (and in a fresh process: test_export_integrity),
refused where it cannot run."""

from __future__ import annotations

import json
import re

import pytest

import tformer
from tformer.runtime import Runtime

from conftest import token_ids

PROMPTS = ["import sys\nfrom os import path\n", "def "]


@pytest.fixture(scope="module")
def package(pt2_export):
    """The session's package of the trained model, made by `tformer-export --format pt2`."""
    return pt2_export


def test_package_is_validated(package):
    meta = json.loads((package / "tformer.json").read_text())
    assert meta["format"] == "tformer-pt2" and meta["tokenizer"] is True
    assert all(r["ok"] for r in meta["validation"]["shapes"]) and meta["validation"]["greedy"]["identical"]
    assert {(r["batch"], r["prompt"]) for r in meta["validation"]["shapes"]} == {(1, 1), (1, 17), (3, 1), (3, 17)}
    assert [(i["name"], i["shape"]) for i in meta["inputs"][:6]] == [
        ("input_ids", ["B", "T"]), ("start", ["B"]), ("lengths", ["B"]), ("rows", ["B"]), ("span", ["P"]),
        ("k.0", ["R", meta["config"]["nhead"], "S", meta["config"]["d_model"] // meta["config"]["nhead"]])]  # fmt: skip
    assert meta["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["B", meta["config"]["vocab_size"]]}]


def test_aot_greedy_equals_eager_batched_and_padded(trained, package):
    model, tokenizer = trained
    runtime = tformer.load(package)
    assert runtime.backend.name == "aot"
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    eager = token_ids(Runtime.from_model(model, device="cpu"), prompts, max_new_tokens=40, temperature=0)
    assert token_ids(runtime, prompts, max_new_tokens=40, temperature=0) == eager
    assert all(len(set(row)) >= 5 for row in eager)


def test_package_of_an_earlier_format_version_says_re_export(package, tmp_path):
    """Format 3 packages attended every slot of the cache (no `span` input): refused in one line,
    before any file is read or loaded."""
    from tformer.errors import TformerError
    from tformer.export.formats import FORMATS
    from tformer.export.integrity import verified_meta

    meta = json.loads((package / "tformer.json").read_text())
    assert meta["format_version"] == FORMATS["pt2"].version == 4
    (tmp_path / "tformer.json").write_text(json.dumps({**meta, "format_version": 3}))
    message = "export format version 3 is older than this tformer's (4); re-export it (tformer-export --force)"
    with pytest.raises(TformerError, match=re.escape(message) + "$"):
        verified_meta(tmp_path)


@pytest.mark.parametrize(
    "patch, message",
    [
        (("platform.machine", lambda: "aarch64"), "was compiled for x86_64, this machine is aarch64; re-export it here"),
        (("torch.backends.cpu.get_cpu_capability", lambda: "DEFAULT"), "which this CPU lacks (DEFAULT)"),
        (("torch.__version__", "1.0.0"), "AOTInductor packages run on the torch that built them"),
    ],
    ids=["other architecture", "CPU without the vector extension", "other torch"],
)
def test_package_built_for_another_machine_or_torch_is_refused(package, monkeypatch, patch, message):
    """Machine code for another CPU or torch can die of an illegal instruction: refused first."""
    import platform

    from tformer.errors import TformerError
    from tformer.export.integrity import verified_meta

    if patch[0] == "platform.machine" and platform.machine() != "x86_64":
        pytest.skip("the package is compiled for this machine's architecture, x86_64 expected here")
    if patch[0].endswith("get_cpu_capability") and not any(w.startswith("AVX") for w in _isa(package)):
        pytest.skip("the package needs no vector extension on this machine")
    monkeypatch.setattr(*patch)
    with pytest.raises(TformerError, match=re.escape(message)):
        verified_meta(package)


def _isa(package) -> list[str]:
    import zipfile

    with zipfile.ZipFile(package / "model.pt2") as z:
        name = next(n for n in z.namelist() if n.endswith("wrapper_metadata.json"))
        return json.loads(z.read(name)).get("AOTI_CPU_ISA", "").split()
