"""The command line, end to end: train, info, generate, demo, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from tformer.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def trained_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def add(a, b):\n    return a + b\n" * 200)
    (corpus / "b.txt").write_text("import os\nprint(os.getcwd())\n" * 200)
    out = root / "model.safetensors"
    result = run("train", str(corpus), "-o", str(out), "--layers", "1", "--d-model", "32", "--d-ff", "64",
                 "--vocab-size", "300", "--seq-len", "32", "--batch-size", "8", "--steps", "30", "--seed", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "validation loss" in result.output and out.exists()
    return out


def test_info(trained_file):
    result = run("info", str(trained_file))
    assert result.exit_code == 0
    assert "layers      1" in result.output and "d_model     32" in result.output
    assert "tokenizer   yes (" in result.output and "context     5000 tokens" in result.output


def test_generate_streams_prompt_and_completion(trained_file):
    result = run("generate", str(trained_file), "def ", "-n", "20", "-t", "0")
    assert result.exit_code == 0
    assert result.output.startswith("def ") and len(result.output) > len("def \n")
    again = run("generate", str(trained_file), "def ", "-n", "20", "--seed", "3")
    assert again.output == run("generate", str(trained_file), "def ", "-n", "20", "--seed", "3").output


def test_generate_with_ids_on_a_tutorial_checkpoint(tmp_path, seed_model):
    torch.save(seed_model.state_dict(), tmp_path / "model.pt")
    result = run("generate", str(tmp_path / "model.pt"), "--ids", "1 2 3", "--nhead", "4", "-n", "6")
    assert result.exit_code == 0
    ids = [int(t) for t in result.output.split()]
    assert len(ids) == 6 and all(0 <= t < 61 for t in ids)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "{tmp}/absent.pt", "hi"], "absent.pt: file not found"),
        (["generate", "{tmp}/model.pt", "hi"], "pass nhead= (CLI: --nhead N)"),
        (["generate", "{tmp}/model.pt", "hi", "--nhead", "4"], "this model has no tokenizer"),
        (["generate", "{tmp}/model.pt", "--ids", "1 x", "--nhead", "4"], "--ids must be integers"),
        (["generate", "{tmp}/model.pt", "--nhead", "4"], 'give either a PROMPT or --ids "1 2 3"'),
        (["generate", "{tmp}/model.pt", "--ids", "1", "--nhead", "4", "-t", "-2"], "'-t': -2.0 is not in the range x>=0"),
        (["generate", "{tmp}/model.pt", "--ids", "1", "--nhead", "4", "-n", "5000"], "exceeds the model's context"),
        (["info", "{tmp}/whole.pt", "--nhead", "4"], "refused: the file holds pickled Python objects"),
        (["train", "{tmp}/no-corpus", "-o", "{tmp}/x.safetensors"], "no-corpus: corpus file not found"),
        (["train", "-o", "{tmp}/x.safetensors", "--nhead", "5"], "nhead=5 does not divide d_model=128"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, seed_model, args, message):
    torch.save(seed_model.state_dict(), tmp_path / "model.pt")
    torch.save(seed_model, tmp_path / "whole.pt")
    result = CliRunner().invoke(cli, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_console_script_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tformer", "info", str(tmp_path / "nope.pt")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"Error: {tmp_path / 'nope.pt'}: file not found" and proc.stdout == ""


def test_export_is_announced_as_not_built_yet():
    from tformer.cli import export_main

    with pytest.raises(SystemExit) as info:
        export_main()
    assert info.value.code == 2


def test_demo_end_to_end(tmp_path):
    """The README's first command, shortened to 3 training steps: trains on the stdlib, samples."""
    out = tmp_path / "demo.safetensors"
    result = run("demo", "-o", str(out), "--steps", "3")
    assert result.exit_code == 0
    assert out.exists() and result.output.count("--- sample") == 3
