"""Crash-safe writes: a writer killed with SIGKILL leaves the target whole or absent, the next
write removes what it left behind, and saved files get the user's umask."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tformer.checkpoint import load_checkpoint, save_checkpoint
from tformer.config import ModelConfig
from tformer.files import atomic_directory, atomic_path, remove_stale_temps
from tformer.model import TransformerLM

BIG = ModelConfig(vocab_size=8192, d_model=1024, nhead=8, d_ff=1024, n_layers=2, max_len=16)  # ~64 MB of weights


def kill_when_temp_appears(proc: subprocess.Popen, directory: Path, name: str, delay: float) -> bool:
    """SIGKILL `proc` `delay` seconds after its temporary path for `name` appears in `directory`;
    False if the process finished first."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(f".{name}.tformer-") for p in directory.iterdir()):
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    proc.wait()
    return False


def debris(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


SAVER = r"""
import sys, torch
from tformer.checkpoint import save_checkpoint
from tformer.config import ModelConfig
from tformer.model import TransformerLM
torch.manual_seed(0)
model = TransformerLM(ModelConfig(**eval(sys.argv[2])))
while True:
    save_checkpoint(sys.argv[1], model)
"""


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.1])
def test_kill_during_save_leaves_whole_or_absent_and_next_save_cleans_up(tmp_path, delay):
    target = tmp_path / "big.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target), repr(BIG.__dict__)])
    assert kill_when_temp_appears(proc, tmp_path, target.name, delay)
    assert proc.returncode == -signal.SIGKILL
    if target.exists():  # a save finished before the kill: it must be whole
        assert load_checkpoint(target).config == BIG
    assert debris(tmp_path), "the kill should have left the temporary file (else this test proves nothing)"
    torch.manual_seed(1)
    save_checkpoint(target, TransformerLM(BIG))
    assert debris(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == [target.name]
    assert load_checkpoint(target).config == BIG


def test_kill_during_export_leaves_nothing_and_next_write_cleans_up(tmp_path, reference_model):
    """`tformer export` killed mid-export leaves no directory and its temporary one behind; the next
    write to the target (an export's own `atomic_directory`, here without the minute of exporting)
    removes the dead writer's debris."""
    pytest.importorskip("onnxruntime")
    torch.save(reference_model.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tformer", "export", str(tmp_path / "model.pt"), "--nhead", "4", "-o", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when_temp_appears(proc, tmp_path, "out", 0.5)
    assert not out.exists() and debris(tmp_path)
    with atomic_directory(out) as tmp:
        (tmp / "tformer.json").write_text("{}")
    assert debris(tmp_path) == [] and (out / "tformer.json").is_file()


def test_a_live_writers_temp_is_never_removed(tmp_path):
    target = tmp_path / "x.json"
    with atomic_path(target) as mine:
        Path(mine).write_text("{}")
        assert remove_stale_temps(target) == []  # this process is alive: its temp stays
        assert Path(mine).exists()
    assert target.read_text() == "{}" and debris(tmp_path) == []


def test_a_dead_writers_directory_is_removed(tmp_path):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(child.stdout)
    from tformer.files import _HOST

    left = tmp_path / f".out.tformer-{_HOST}-{dead_pid}-0a1b2c3d.tmp"
    left.mkdir()
    (left / "model.onnx").write_bytes(b"half")
    other_host = tmp_path / f".out.tformer-00000000-{dead_pid}-0a1b2c3d.tmp"  # another machine's: not ours to judge
    other_host.mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not left.exists() and other_host.exists()


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.txt") as tmp:
            Path(tmp).write_text("partial")
            raise RuntimeError("the writer failed")
    assert list(tmp_path.iterdir()) == []


def test_saved_files_and_exports_follow_the_umask(tmp_path, reference_model):
    from conftest import tformer_copy

    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "m.safetensors", tformer_copy(reference_model))
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
