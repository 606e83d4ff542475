"""Checkpoint forms users have, our own format, and every kind of bad file."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch

from tformer.checkpoint import load_checkpoint, load_model, save_checkpoint
from tformer.errors import TformerError

from conftest import TINY, tformer_copy


def same_weights(model, ref) -> bool:
    theirs = ref.state_dict()
    return all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


def test_bare_state_dict(tmp_path, reference_model):
    path = tmp_path / "model.pt"
    torch.save(reference_model.state_dict(), path)
    ckpt = load_checkpoint(path, nhead=4)
    assert ckpt.kind == "state_dict"
    assert ckpt.config == TINY  # sizes inferred from the weights
    model, tokenizer = load_model(path, nhead=4)
    assert same_weights(model, reference_model) and tokenizer is None


@pytest.mark.parametrize("key", ["model_state_dict", "state_dict", "model"])
def test_training_checkpoint_dict(tmp_path, reference_model, key):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, key: reference_model.state_dict(), "optimizer_state_dict": {"lr": 0.1}}, path)
    model, _ = load_model(path, nhead=4)
    assert load_checkpoint(path, nhead=4).kind == "training checkpoint"
    assert same_weights(model, reference_model)


def test_bare_state_dict_in_safetensors(tmp_path, reference_model):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference_model.state_dict().items()}, path)
    model, _ = load_model(path, nhead=4)
    assert same_weights(model, reference_model)


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


def test_nhead_required_and_checked(tmp_path, reference_model):
    path = tmp_path / "model.pt"
    torch.save(reference_model.state_dict(), path)
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


def test_whole_pickled_module_is_refused_with_resave_advice(tmp_path, reference_model):
    path = tmp_path / "whole.pt"
    torch.save(reference_model, path)
    with pytest.raises(TformerError, match=r"TransformerModel.*re-save the weights with torch.save\(model.state_dict\(\), path\)"):
        load_checkpoint(path, nhead=4)


def bad_files(tmp_path, reference_model):
    good = reference_model.state_dict()
    torch.save(good, tmp_path / "good.pt")
    raw = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.bin").write_bytes(b"this is not a checkpoint at all")
    torch.save({**good, "decoder.bias": torch.zeros(7)}, tmp_path / "shape.pt")
    torch.save({**good, "head.weight": torch.zeros(3)}, tmp_path / "extra.pt")
    torch.save({k: v for k, v in good.items() if k != "decoder.bias"}, tmp_path / "missing.pt")
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "noweights.pt")
    model = tformer_copy(reference_model)
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
def test_bad_files_give_one_clear_error(tmp_path, reference_model, name, message):
    bad_files(tmp_path, reference_model)
    with pytest.raises(TformerError, match=message) as info:
        load_checkpoint(tmp_path / name, nhead=4)
    assert "\n" not in str(info.value)


# --- integrity: content hash, zip CRCs, finite weights -------------------------------------------


def rewrite_safetensors(path, change_tensors=None, change_metadata=None):
    """Re-save a tformer file with tensors and/or metadata changed but the recorded hash kept:
    what an edit or a corruption that still parses looks like."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    (change_tensors or (lambda t: None))(tensors)
    (change_metadata or (lambda m: None))(metadata)
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize(
    "edit",
    [
        dict(change_tensors=lambda t: t["decoder.bias"].__setitem__(0, t["decoder.bias"][0] + 1e-3)),
        dict(change_metadata=lambda m: m.__setitem__("config", m["config"].replace('"nhead": 4', '"nhead": 2'))),
        dict(change_metadata=lambda m: m.pop("tokenizer")),
        dict(change_metadata=lambda m: m.__setitem__("format", "other")),
    ],
    ids=["one weight", "config", "tokenizer dropped", "format name"],
)
def test_own_format_content_hash_catches_any_edit(tmp_path, trained, edit):
    model, tokenizer = trained
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, tokenizer)
    assert load_checkpoint(path).integrity.startswith("SHA-256")
    rewrite_safetensors(path, **edit)
    with pytest.raises(TformerError, match=r"m.safetensors: content does not match its SHA-256 .*re-save"):
        load_checkpoint(path, nhead=4)


def test_format_1_files_without_a_hash_still_load(tmp_path, reference_model):
    from safetensors.torch import save_file

    model = tformer_copy(reference_model)
    metadata = {"format": "tformer", "format_version": "1", "config": model.config.to_json()}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "v1.safetensors", metadata=metadata)
    ckpt = load_checkpoint(tmp_path / "v1.safetensors")
    assert ckpt.integrity == "none (format 1)" and same_weights(load_model(tmp_path / "v1.safetensors")[0], reference_model)


def test_tutorial_zip_crcs_are_checked(tmp_path, reference_model):
    """torch.load itself reads a flipped weight without complaint; tformer refuses it."""
    import zipfile

    path = tmp_path / "model.pt"
    torch.save(reference_model.state_dict(), path)
    with zipfile.ZipFile(path) as archive:
        entry = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    raw = bytearray(path.read_bytes())
    local_extra = int.from_bytes(raw[entry.header_offset + 28 : entry.header_offset + 30], "little")
    data_start = entry.header_offset + 30 + len(entry.filename.encode()) + local_extra  # after the local header
    raw[data_start + 5] ^= 0x40
    path.write_bytes(bytes(raw))
    silently = torch.load(path, weights_only=True)  # what torch alone does: loads a different model
    assert not all(torch.equal(v, reference_model.state_dict()[k]) for k, v in silently.items())
    with pytest.raises(TformerError, match=r"model.pt: corrupt file \(entry '.*data/0' fails its CRC-32 check\)"):
        load_checkpoint(path, nhead=4)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, reference_model, fmt):
    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in reference_model.state_dict().items()}
    state["transformer_encoder.layers.1.linear2.weight"][3, 4] = float("nan")
    state["transformer_encoder.layers.1.linear2.weight"][0, 0] = float("inf")
    path = tmp_path / f"bad.{fmt}"
    torch.save(state, path) if fmt == "pt" else save_file(state, path)
    with pytest.raises(TformerError, match=r"weight 'transformer_encoder.layers.1.linear2.weight' holds 2 NaN or infinite"):
        load_checkpoint(path, nhead=4)


def test_non_finite_model_is_never_saved(tmp_path, reference_model):
    model = tformer_copy(reference_model)
    with torch.no_grad():
        model.decoder.bias[0] = float("nan")
    with pytest.raises(TformerError, match="weight 'decoder.bias' holds 1 NaN .*refusing to save it"):
        save_checkpoint(tmp_path / "nan.safetensors", model)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped_with_a_note(tmp_path, reference_model, prefix):
    from tformer.errors import TformerNote

    path = tmp_path / "ddp.pt"
    torch.save({"model_state_dict": {prefix + k: v for k, v in reference_model.state_dict().items()}}, path)
    with pytest.warns(TformerNote, match="stripped the 'module.' prefix|stripped the '_orig_mod.' prefix"):
        model, _ = load_model(path, nhead=4)
    assert same_weights(model, reference_model)
    with pytest.warns(TformerNote):
        assert len(load_checkpoint(path, nhead=4).notes) == prefix.count(".")


def test_corrupt_files_never_blame_pickles_or_give_bare_codes(tmp_path, reference_model):
    """Truncations at every 1/16 of a tutorial .pt and of a tformer file: each a one-line error
    that says the file is truncated or corrupt, never "pickled Python objects" or "(231)"."""
    torch.save(reference_model.state_dict(), tmp_path / "good.pt")
    save_checkpoint(tmp_path / "good.safetensors", tformer_copy(reference_model))
    for name in ("good.pt", "good.safetensors"):
        raw = (tmp_path / name).read_bytes()
        for cut in range(1, 16):
            (tmp_path / "cut").write_bytes(raw[: len(raw) * cut // 16])
            with pytest.raises(TformerError) as info:
                load_checkpoint(tmp_path / "cut", nhead=4)
            message = str(info.value)
            assert "\n" not in message and "pickled" not in message, message
            assert ("truncated or corrupt" in message or "not a readable checkpoint" in message), message
            assert not re.search(r"\((\d+|\[Errno \d+\][^)]*)\)", message), message


# --- tformer convert -----------------------------------------------------------------------------


def test_convert_gives_the_head_count_once_and_keeps_the_model(tmp_path, trained):
    from tformer.checkpoint import convert_checkpoint

    model, tokenizer = trained
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    tokenizer.save(tmp_path / "tokenizer.json")
    convert_checkpoint(tmp_path / "ckpt.pt", tmp_path / "m.safetensors", nhead=4, tokenizer=tokenizer)
    ckpt = load_checkpoint(tmp_path / "m.safetensors")  # no nhead needed any more
    assert ckpt.kind == "tformer" and ckpt.nhead_supplied
    assert dataclasses.replace(ckpt.config, dropout=0.0) == model.config  # dropout is not in a state_dict
    assert ckpt.integrity.startswith("SHA-256") and ckpt.tokenizer.to_json() == tokenizer.to_json()
    import tformer

    ours = tformer.load(tmp_path / "m.safetensors", device="cpu").generate("def ", max_new_tokens=20, temperature=0)
    theirs = tformer.load(tmp_path / "ckpt.pt", nhead=4, tokenizer=tmp_path / "tokenizer.json", device="cpu")
    assert ours == theirs.generate("def ", max_new_tokens=20, temperature=0)
    with pytest.raises(TformerError, match="tokenizer has 320 ids but .* only 61"):
        from conftest import make_reference_model

        torch.save(make_reference_model().state_dict(), tmp_path / "small.pt")
        convert_checkpoint(tmp_path / "small.pt", tmp_path / "x.safetensors", nhead=4, tokenizer=tokenizer)
    assert not (tmp_path / "x.safetensors").exists()
