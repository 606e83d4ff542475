"""Checkpoint forms users have, our own format, and every kind of bad file."""

from __future__ import annotations

import os

import pytest
import torch

from tformer.checkpoint import load_checkpoint, load_model, save_checkpoint
from tformer.errors import TformerError

from conftest import TINY, tformer_copy


def same_weights(model, ref) -> bool:
    theirs = ref.state_dict()
    return all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


def test_bare_state_dict(tmp_path, seed_model):
    path = tmp_path / "model.pt"
    torch.save(seed_model.state_dict(), path)
    ckpt = load_checkpoint(path, nhead=4)
    assert ckpt.kind == "state_dict"
    assert ckpt.config == TINY  # sizes inferred from the weights
    model, tokenizer = load_model(path, nhead=4)
    assert same_weights(model, seed_model) and tokenizer is None


@pytest.mark.parametrize("key", ["model_state_dict", "state_dict", "model"])
def test_training_checkpoint_dict(tmp_path, seed_model, key):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, key: seed_model.state_dict(), "optimizer_state_dict": {"lr": 0.1}}, path)
    model, _ = load_model(path, nhead=4)
    assert load_checkpoint(path, nhead=4).kind == "training checkpoint"
    assert same_weights(model, seed_model)


def test_bare_state_dict_in_safetensors(tmp_path, seed_model):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in seed_model.state_dict().items()}, path)
    model, _ = load_model(path, nhead=4)
    assert same_weights(model, seed_model)


def test_own_format_round_trip_with_tokenizer(tmp_path, trained):
    model, tokenizer = trained
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, tokenizer)
    ckpt = load_checkpoint(path)  # no nhead needed: the file describes itself
    assert ckpt.kind == "tformer" and ckpt.config == model.config
    assert ckpt.tokenizer.to_json() == tokenizer.to_json()
    loaded, _ = load_model(path)
    assert same_weights(loaded, model)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_nhead_required_and_checked(tmp_path, seed_model):
    path = tmp_path / "model.pt"
    torch.save(seed_model.state_dict(), path)
    with pytest.raises(TformerError, match=r"model.pt: .*pass nhead= \(CLI: --nhead N\)"):
        load_checkpoint(path)
    with pytest.raises(TformerError, match="nhead=5 does not divide d_model=32"):
        load_checkpoint(path, nhead=5)


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"encoder.weight": Exploit(marker)}, path)
    with pytest.raises(TformerError, match=r"evil.pt: refused: .*pickled Python objects.*torch.save\(model.state_dict\(\)"):
        load_checkpoint(path, nhead=4)
    assert not marker.exists()


def test_whole_pickled_module_is_refused_with_resave_advice(tmp_path, seed_model):
    path = tmp_path / "whole.pt"
    torch.save(seed_model, path)
    with pytest.raises(TformerError, match=r"TransformerModel.*re-save the weights with torch.save\(model.state_dict\(\), path\)"):
        load_checkpoint(path, nhead=4)


def bad_files(tmp_path, seed_model):
    good = seed_model.state_dict()
    torch.save(good, tmp_path / "good.pt")
    raw = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.bin").write_bytes(b"this is not a checkpoint at all")
    torch.save({**good, "decoder.bias": torch.zeros(7)}, tmp_path / "shape.pt")
    torch.save({**good, "head.weight": torch.zeros(3)}, tmp_path / "extra.pt")
    torch.save({k: v for k, v in good.items() if k != "decoder.bias"}, tmp_path / "missing.pt")
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "noweights.pt")
    model = tformer_copy(seed_model)
    save_checkpoint(tmp_path / "own.safetensors", model)
    raw = (tmp_path / "own.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) - 100])


@pytest.mark.parametrize(
    "name, message",
    [
        ("absent.pt", "absent.pt: file not found"),
        ("empty.pt", "empty.pt: file is empty"),
        ("truncated.pt", "truncated.pt: truncated or corrupt"),
        ("truncated.safetensors", "truncated.safetensors: not a readable checkpoint"),
        ("junk.bin", "junk.bin: not a readable checkpoint"),
        ("shape.pt", r"shape.pt: weight 'decoder.bias' has shape \(7,\), expected \(61,\)"),
        ("extra.pt", "extra.pt: unexpected weights 'head.weight'"),
        ("missing.pt", "missing.pt: missing weights 'decoder.bias'"),
        ("noweights.pt", "noweights.pt: no model weights found"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path, seed_model, name, message):
    bad_files(tmp_path, seed_model)
    with pytest.raises(TformerError, match=message) as info:
        load_checkpoint(tmp_path / name, nhead=4)
    assert "\n" not in str(info.value)
