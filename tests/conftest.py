"""Shared fixtures: the tutorial's own model as the reference; one tiny trained model and the
artifacts made from it, each built once per test session (a checkpoint, an ONNX export, a .pt2
package, compiled runtimes) and read-only for the tests (a test that changes one changes a copy);
tformer's store in a temporary folder; and the `device` cases of tests that run on a CUDA GPU too."""

from __future__ import annotations

import copy
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before anything imports triton: its kernels then run on the CPU, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tformer.config import ModelConfig
from tformer.model import TransformerLM
from tformer.reference import TransformerModel
from tformer.train import TrainConfig, default_corpus, read_corpus, train

TINY = ModelConfig(vocab_size=61, d_model=32, nhead=4, d_ff=64, n_layers=2)


def cuda_case(unavailable: str | None = None):
    """The "cuda" case of a `device` parametrization. Marked `cuda`, which is how the GPU pass
    (`tformer-bench gpu-pass`) selects these tests (`pytest -m cuda`); skipped, with the reason,
    where there is no GPU or where `unavailable` says what else it lacks here."""
    reason = "no CUDA GPU here" if not CUDA else unavailable
    return pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(reason is not None, reason=str(reason))])


DEVICES = ["cpu", cuda_case()]  # @pytest.mark.parametrize("device", DEVICES): the CPU always, CUDA where there is one


def sigint_default() -> None:
    """`preexec_fn` of a child process that a test interrupts with SIGINT. A shell that starts the
    suite in the background (`cmd &`, nohup) makes it ignore SIGINT, its children inherit that,
    and Python then installs no handler for SIGINT: the child would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stock_copy(model: TransformerLM) -> TransformerModel:
    """The tutorial's own `TransformerModel` with `model`'s weights (dropout off): the reference."""
    c = model.config
    ref = TransformerModel(c.vocab_size, c.d_model, c.nhead, c.d_ff, c.n_layers, 0.0)
    # The tutorial hard-codes a 5000-row table; its first max_len rows are this model's table.
    assert torch.equal(ref.pos_encoder.pe[: c.max_len], model.pos_encoder.pe)
    ref.pos_encoder.pe = ref.pos_encoder.pe[: c.max_len]
    ref.load_state_dict(model.state_dict())
    return ref.eval()


def token_ids(runtime, prompts, **sampling) -> list[list[int]]:
    """The token ids `runtime.generate` gives each prompt: what most tests compare."""
    return [out.token_ids for out in runtime.generate(prompts, **sampling)]


def at_once(call: Callable[[int], Any], n: int) -> list[Any]:
    """`call(i)` for i in 0..n-1, each on its own thread, all released together by a barrier; the
    results in order. An exception in a thread is raised here, in the test's own thread."""
    together = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        together.wait()
        try:
            results[i] = call(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def make_reference_model(config: ModelConfig = TINY, seed: int = 0) -> TransformerModel:
    """The tutorial's TransformerModel with random weights everywhere (biases and norms too), so
    that parity tests exercise every parameter rather than the tutorial's zero-initialised ones."""
    torch.manual_seed(seed)
    ref = TransformerModel(config.vocab_size, config.d_model, config.nhead, config.d_ff, config.n_layers, 0.0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2 if p.ndim == 2 else 0.05)
    return ref.eval()


def reference_of(model: TransformerLM) -> TransformerModel:
    """The tutorial's TransformerModel with `model`'s weights (its positional table cut to the
    model's context, as `TransformerLM` keeps it)."""
    c = model.config
    reference = TransformerModel(c.vocab_size, c.d_model, c.nhead, c.d_ff, c.n_layers, 0.0)
    reference.pos_encoder.pe = reference.pos_encoder.pe[: c.max_len]
    reference.load_state_dict(model.state_dict())
    return reference.eval()


def tformer_copy(ref: TransformerModel, config: ModelConfig = TINY) -> TransformerLM:
    model = TransformerLM(config)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model.eval()


@pytest.fixture
def reference_model() -> TransformerModel:
    return make_reference_model()


@pytest.fixture(scope="session")
def trained():
    """(model, tokenizer) trained for a few seconds on a slice of the standard library: its greedy
    output varies with context, unlike random weights, which collapse onto one token."""
    texts = read_corpus(default_corpus()[:12])
    config = ModelConfig(vocab_size=320, d_model=48, nhead=4, d_ff=96, n_layers=2, max_len=512, dropout=0.0)
    steps = TrainConfig(steps=120, batch_size=16, seq_len=48, lr=3e-3, eval_every=60, eval_batches=2)
    model, tokenizer, _ = train(texts, config, steps, progress=False)
    return model, tokenizer


@pytest.fixture(scope="session", autouse=True)
def store(tmp_path_factory) -> Path:
    """tformer's store ($TFORMER_CACHE: exports made on first use) and inductor's compiled kernels
    in a folder of this test session, never the user's ~/.cache/tformer or /tmp/torchinductor_USER:
    every session compiles from scratch, as CI's fresh machine does; subprocesses inherit both."""
    path = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFORMER_CACHE", str(path))
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(path / "inductor"))
        yield path


@pytest.fixture(scope="session")
def checkpoint(trained, tmp_path_factory) -> Path:
    """The trained model as a tutorial user makes tformer's own file, `m.safetensors`: the weights
    saved by `torch.save(model.state_dict())` (the tutorial's names) and the tokenizer, converted
    (`tformer convert model.pt --nhead 4 --tokenizer tokenizer.json`)."""
    from tformer.checkpoint import convert_checkpoint

    model, tokenizer = trained
    root = tmp_path_factory.mktemp("checkpoint")
    torch.save(model.state_dict(), root / "model.pt")
    convert_checkpoint(root / "model.pt", root / "m.safetensors", model.config.nhead, tokenizer)
    (root / "model.pt").unlink()
    return root / "m.safetensors"


class Exporting:
    """`tformer export` of the session's checkpoint to .pt2 and to ONNX (validated, tokenizer
    inside), and of another model of the same shapes to ONNX (not validated), in one background
    process started as the session's first test begins: a minute of tracing and compiling that
    overlaps the tests that do not need them, which run first (see `pytest_collection_modifyitems`;
    one pytest process keeps less than one of two cores busy)."""

    def __init__(self, checkpoint: Path, other: Path):
        self.checkpoint, self.log = checkpoint, checkpoint.with_name("exports.log")
        runs = [[str(checkpoint), "--format", "pt2"], [str(checkpoint), "--format", "onnx"],
                [str(other), "--no-validate", "-o", str(self.directory("other-onnx"))]]  # fmt: skip
        command = " && ".join(shlex.join([sys.executable, "-m", "tformer", "export", *run]) for run in runs)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(["sh", "-c", command], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)  # fmt: skip

    def directory(self, name: str) -> Path:
        return self.checkpoint.with_name(f"{self.checkpoint.stem}-{name}")

    def wait(self, name: str) -> Path:
        """Export directory `name` ("pt2", "onnx", "other-onnx"), once every export is written."""
        assert self.proc.wait(timeout=1200) == 0, self.log.read_text()[-3000:]
        return self.directory(name)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def uses_exports(item: pytest.Item) -> bool:
    """Whether a test needs the session's exports (a fixture, or `pytest.mark.exports` where it asks
    for them at run time)."""
    exports = {"onnx_export", "pt2_export", "other_onnx_export"}
    return bool(exports & set(item.fixturenames)) or item.get_closest_marker("exports") is not None


def pytest_collection_modifyitems(config, items) -> None:
    """The files with tests of the session's exports run last (whole, so that their module fixtures
    are built once): meanwhile `Exporting` makes them."""
    late = {item.path for item in items if uses_exports(item)}
    items.sort(key=lambda item: item.path in late)  # stable: each part keeps its order


@pytest.fixture(scope="session", autouse=True)
def exporting(request, store) -> Iterator[Exporting | None]:
    """The session's exports, started at its first test if any of its tests needs them."""
    if not any(uses_exports(item) for item in request.session.items):
        yield None
        return
    from tformer.checkpoint import save_checkpoint

    checkpoint = request.getfixturevalue("checkpoint")
    model, tokenizer = request.getfixturevalue("trained")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.decoder.bias.add_(torch.randn(other.decoder.bias.shape, generator=torch.Generator().manual_seed(0)))
    save_checkpoint(checkpoint.with_name("other.safetensors"), other, tokenizer)
    job = Exporting(checkpoint, checkpoint.with_name("other.safetensors"))
    yield job
    job.stop()  # a session cut short (-x): no export left running


@pytest.fixture(scope="session")
def onnx_export(exporting) -> Path:
    """The session's ONNX export of the trained model (its load during validation wrote the
    optimized-graph cache beside model.onnx)."""
    return exporting.wait("onnx")


@pytest.fixture(scope="session")
def pt2_export(exporting) -> Path:
    """The session's AOTInductor package of the trained model."""
    return exporting.wait("pt2")


@pytest.fixture(scope="session")
def other_onnx_export(exporting) -> Path:
    """An ONNX export (not validated) of another model of the trained one's shapes: its decoder's
    bias moved, so that its tokens differ."""
    return exporting.wait("other-onnx")


# The compiled runtime's bounds: 4 cache rows (decode buckets 1, 2, 4: a step of 3 rows is padded
# to 4), 160 tokens a request. Each bucket is a graph compiled with its C++ wrapper: seconds apiece.
COMPILED_ROWS, COMPILED_PROMPT, COMPILED_NEW = 4, 100, 60


@dataclass
class Compiled:
    """A compile-backend runtime of the trained model, compiled once per device and session: first
    lazily, by six threads calling the fresh runtime at once (`first_calls`: the prompts and what
    each thread got), then whatever else the bounds above need, by `warmup`."""

    runtime: Any
    first_calls: tuple[list[list[int]], list[list[int]]]


@pytest.fixture(scope="session")
def compiled(trained) -> Callable[[str], Compiled]:
    """`compiled(device)`: the session's `Compiled` for that device."""
    from tformer.backends import create_backend
    from tformer.runtime import Runtime

    made: dict[str, Compiled] = {}

    def get(device: str) -> Compiled:
        if device not in made:
            model = trained[0]
            backend = create_backend("compile", copy.deepcopy(model), torch.device(device), torch.float32)
            runtime = Runtime(backend, None, COMPILED_ROWS, COMPILED_PROMPT + COMPILED_NEW)
            prompts = [[(7 * i + j) % model.config.vocab_size for j in range(3 + 5 * i)] for i in range(6)]
            got = at_once(lambda i: token_ids(runtime, [prompts[i]], max_new_tokens=20, temperature=0)[0], 6)
            assert runtime.warmup(batch_sizes=(COMPILED_ROWS,), max_prompt_len=COMPILED_PROMPT,
                                  max_new_tokens=COMPILED_NEW) > 0  # fmt: skip
            made[device] = Compiled(runtime, (prompts, got))
        return made[device]

    return get
