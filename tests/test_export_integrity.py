"""Export directories are untrusted input: every edit of every file in one (tformer.json field by
field, truncations, byte flips, seeded random corruption) must end in a one-line TformerError or
in tokens identical to the untouched export's; never a crash, a traceback or a silent change.

The checks that are pure Python (the schema, every file's SHA-256, the artifact's embedded
metadata: `verified_meta`) run in this process; only the trials that pass them reach onnxruntime
or AOTInductor, and those run in a worker subprocess (`export_worker.py`), one per format for all
its trials, so that a crash of a native runtime fails the trial it happened in (the worker is
restarted for the trials after it). The session's ONNX and `.pt2` exports are shared by all
trials; each trial is a copy of the directory (hard links, as nothing writes a file in place)
with one file replaced.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import tformer
from tformer.backends import open_export
from tformer.errors import TformerError
from tformer.export.formats import format_named
from tformer.export.integrity import verified_meta
from tformer.runtime import Runtime

from conftest import token_ids
from corrupt import KINDS, mutate

ort = pytest.importorskip("onnxruntime")

WORKER = Path(__file__).with_name("export_worker.py")
INFORMATIONAL = {"exporter", "versions", "export_seconds", "validation"}  # fields that do not decide how it runs
CACHE_FILES = {"model.cpu.opt.onnx", "model.cpu.opt.json"}  # the onnx backend's optimized-graph cache
RANDOM_DRAWS = 4  # per kind of damage (corrupt.KINDS) and format
PROMPTS = ["import sys\nfrom os import path\n", "    def __init__(self, ", "x"]
DELETE = object()  # an edit that removes the field


@dataclass
class Trial:
    name: str
    group: str  # which test checks it: "json", "files", "random", "stale"
    directory: Path
    expect: str  # "error", "same" (tokens of `baseline`), or "either" (the same tokens, or an error naming a `match`)
    match: tuple[str, ...] = ()  # an error message must contain one of these
    baseline: str = "untouched"  # the trial whose tokens "same" means
    file: str = ""  # the file it changed


@dataclass
class Suite:
    """All trials of one format's export and what the worker reported for each."""

    pristine: Path
    trials: list[Trial] = field(default_factory=list)
    outcomes: dict[str, dict] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    def add(self, name: str, group: str, file: str, content: bytes | None, **expect) -> Trial:
        """A trial: a copy of the export with `file` replaced by `content` (None: deleted); the
        expectation is given, or else derived from the change (`expectation`)."""
        directory = self.pristine.parent / f"{self.pristine.name}-trial-{next(self._ids):03d}"
        shutil.copytree(self.pristine, directory, copy_function=os.link)
        if file:
            before = (directory / file).read_bytes()
            (directory / file).unlink()
            if content is not None:
                (directory / file).write_bytes(content)
            expect = expect or dict(zip(("expect", "match"), expectation(file, before, content)))
        assert name not in self.outcomes and all(t.name != name for t in self.trials), name
        trial = Trial(name, group, directory, file=file, **expect)
        self.trials.append(trial)
        return trial

    def check(self, group: str) -> None:
        """Assert that no trial of `group` went wrong; the message lists those that did."""
        found = self._problems(group)
        assert not found, f"{len(found)} trials went wrong:\n" + "\n".join(found)

    def _problems(self, group: str) -> list[str]:
        """What went wrong in the trials of `group`: one line per trial."""
        found = []
        for t in (t for t in self.trials if t.group == group):
            out, base = self.outcomes[t.name], self.outcomes[t.baseline]
            kind, message = out["outcome"], out.get("message", "")
            if kind == "traceback":
                found.append(f"{t.name}: traceback {out['type']}: {message}")
            elif kind == "crash":
                found.append(f"{t.name}: the worker died on it ({out['detail']})")
            elif kind == "error" and "\n" in message:
                found.append(f"{t.name}: error of several lines: {message!r}")
            elif kind == "error" and t.expect == "same":
                found.append(f"{t.name}: error where the tokens should be unchanged: {message}")
            elif kind == "error" and t.match and not any(m in message for m in t.match):
                found.append(f"{t.name}: error does not name {' or '.join(t.match)}: {message}")
            elif kind == "tokens" and t.expect == "error":
                found.append(f"{t.name}: loaded changed content without an error")
            elif kind == "tokens" and out["tokens"] != base.get("tokens"):
                found.append(f"{t.name}: tokens differ from {t.baseline}'s")
        return found


def _json(data: bytes):
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def expectation(file: str, before: bytes, after: bytes | None) -> tuple[str, tuple[str, ...]]:
    """What a load must do once `file` of an export changed from `before` to `after` (None:
    deleted): the cache is rebuilt (same tokens); tformer.json may change in its informational
    fields (same tokens, or an error naming the field) or in form only; anything else is an error."""
    if file in CACHE_FILES or after == before:
        return "same", ()
    if file != "tformer.json" or after is None:
        return "error", ()
    old, new = _json(before), _json(after)
    if isinstance(new, dict) and new.keys() == old.keys():
        changed = [k for k in old if _canonical(old[k]) != _canonical(new[k])]
        if not changed:
            return "same", ()
        if set(changed) <= INFORMATIONAL:
            return "either", tuple(f"'{k}'" for k in changed)
    return "error", ()


def edited(meta: dict, path: tuple[str, ...], value) -> bytes:
    new = copy.deepcopy(meta)
    target = new
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(new, indent=2).encode()


def other_type(value):
    """A value of another JSON type than `value`."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return str(value)
    return {str: 7, list: {}, dict: []}.get(type(value), 5)


def add_json_trials(suite: Suite, other_format: str) -> None:
    """Every field of tformer.json (and of its config) deleted, of another type, and set to
    another plausible value; whole-file replacements."""
    meta = json.loads((suite.pristine / "tformer.json").read_text())
    config, artifact = meta["config"], next(n for n in meta["files"] if n.startswith("model."))
    fields = [(key,) for key in meta] + [("config", key) for key in config]
    for path in fields:
        name = ".".join(path)
        current = meta[path[0]] if len(path) == 1 else config[path[1]]
        for what, value in (("deleted", DELETE), ("of another type", other_type(current))):
            new = edited(meta, path, value)
            suite.add(f"tformer.json: {name} {what}", "json", "tformer.json", new, expect="error", match=(path[-1],))
    plausible = {
        ("format_version",): [(meta["format_version"] - 1, "re-export"), (meta["format_version"] + 1, "upgrade tformer")],
        ("dtype",): [("float16" if meta["dtype"] == "float32" else "float32", "'dtype'"), ("nonsense", "'dtype'")],
        ("weights_sha256",): [(hashlib.sha256(b"other").hexdigest(), "'weights_sha256'")],
        ("inputs",): [(meta["inputs"][:-1], "'inputs'")],
        ("outputs",): [(meta["outputs"][:-1], "'outputs'")],
        ("tokenizer",): [(not meta["tokenizer"], "'tokenizer'")],
        ("files",): [({**meta["files"], artifact: hashlib.sha256(b"other").hexdigest()}, artifact),
                     ({k: v for k, v in meta["files"].items() if k != "tokenizer.json"}, "'tokenizer'"),
                     ({**meta["files"], "../elsewhere": meta["files"][artifact]}, "'files'")],
        **({("opset",): [(meta["opset"] - 1, "opset")]} if "opset" in meta else {}),
        **{("config", key): [(value, f"'config.{key}'")] for key, value in {
            "vocab_size": config["vocab_size"] + 1, "d_model": config["d_model"] * 2, "nhead": config["nhead"] * 2,
            "d_ff": config["d_ff"] * 2, "n_layers": config["n_layers"] + 1, "max_len": config["max_len"] * 2,
            "dropout": 0.5}.items()},
    }  # fmt: skip
    for path, values in plausible.items():
        for i, (value, match) in enumerate(values):
            new = edited(meta, path, value)
            name = f"tformer.json: {'.'.join(path)} = {value!r:.40} (#{i})"
            suite.add(name, "json", "tformer.json", new, expect="error", match=(match,))
    other = format_named(other_format)  # the other format at its own version: its schema has other fields
    new = edited({**meta, "format_version": other.version}, ("format",), other.name)
    suite.add(f"tformer.json: format = {other.name!r}, version {other.version}", "json", "tformer.json", new,
              expect="error", match=("opset",))  # fmt: skip
    informational = {"exporter": "something else", "versions": {**meta["versions"], "onnx": "0.0"},
                     "export_seconds": 999.5, "validation": None}  # fmt: skip
    for key, value in informational.items():
        suite.add(f"tformer.json: {key} = {value!r}", "json", "tformer.json", edited(meta, (key,), value), expect="same")
    # The torch that built it: informational for ONNX, the one torch that can run a .pt2.
    new = edited(meta, ("versions",), {**meta["versions"], "torch": "0.0"})
    suite.add("tformer.json: versions.torch = '0.0'", "json", "tformer.json", new, expect="either", match=("'versions'",))
    suite.add("tformer.json re-indented", "json", "tformer.json", json.dumps(meta, indent=4).encode(), expect="same")
    for content in (b"[]", b"{}", b"{", b"", b"null", b'"tformer"', None):
        suite.add(f"tformer.json = {content!r}", "json", "tformer.json", content, expect="error", match=("tformer.json",))


def add_file_trials(suite: Suite) -> None:
    """Every file of the directory deleted, emptied, truncated, and with its first, middle or last byte flipped."""
    for path in sorted(p for p in suite.pristine.iterdir()):
        data = path.read_bytes()

        def flipped(i: int) -> bytes:
            return data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1 :]

        changes = {
            "deleted": None, "emptied": b"", "cut in half": data[: len(data) // 2], "without its last byte": data[:-1],
            "first byte flipped": flipped(0), "middle byte flipped": flipped(len(data) // 2),
            "last byte flipped": flipped(len(data) - 1),
        }  # fmt: skip
        for what, content in changes.items():
            suite.add(f"{path.name} {what}", "files", path.name, content)


def add_random_trials(suite: Suite, seed: int) -> None:
    """Seeded: for each kind of damage of `corrupt.mutate` (bit flips, a truncation, a zeroed run),
    a few random files of the directory damaged at random places."""
    rng = random.Random(seed)
    files = sorted(p.name for p in suite.pristine.iterdir())
    for kind in KINDS:
        for i in range(RANDOM_DRAWS):
            name = rng.choice(files)
            data, what = mutate((suite.pristine / name).read_bytes(), rng, kind)
            suite.add(f"random {kind} {i}: {name} {what[:60]}", "random", name, data)


def verify_here(suite: Suite) -> list[Trial]:
    """Run `verified_meta` on every trial in this process (pure Python: nothing in it can crash
    the interpreter): record the trials it refuses; the others, which a load hands to a native
    runtime, are returned for the worker."""
    native = []
    for t in suite.trials:
        try:
            verified_meta(t.directory)
        except TformerError as exc:
            suite.outcomes[t.name] = {"outcome": "error", "message": str(exc)}
        except Exception as exc:  # what the checks count as a traceback
            suite.outcomes[t.name] = {"outcome": "traceback", "type": type(exc).__name__, "message": str(exc)}
        else:
            native.append(t)
    return native


def run_worker(suite: Suite, trials: list[Trial], prompts: list[list[int]]) -> None:
    """Load and generate from each of `trials` in worker subprocesses; a trial the worker died on
    is recorded as a crash and the worker restarted with the trials after it."""
    remaining = list(trials)
    while remaining:
        spec = suite.pristine.parent / f"{suite.pristine.name}-spec.json"
        spec.write_text(json.dumps({"prompts": prompts, "text": "def ",
                                    "trials": [{"name": t.name, "directory": str(t.directory)} for t in remaining]}))  # fmt: skip
        try:
            proc = subprocess.run([sys.executable, str(WORKER), str(spec)], capture_output=True, text=True, timeout=900)
            stdout, detail = proc.stdout, f"exit status {proc.returncode}: {proc.stderr[-600:]!r}"
        except subprocess.TimeoutExpired as exc:
            stdout, detail = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or "", "hung"
        for line in stdout.splitlines():
            if line.startswith("TRIAL "):
                result = json.loads(line[len("TRIAL ") :])
                suite.outcomes[result.pop("name")] = result
        remaining = [t for t in remaining if t.name not in suite.outcomes]
        if remaining:
            suite.outcomes[remaining.pop(0).name] = {"outcome": "crash", "detail": detail}


@pytest.fixture(scope="module")
def suites(trained, onnx_export, pt2_export, other_onnx_export, tmp_path_factory) -> dict[str, Suite]:
    """Every trial on copies of the session's ONNX and .pt2 exports, and the outcomes."""
    model, tokenizer = trained
    root = tmp_path_factory.mktemp("integrity")
    for fmt, export in (("onnx", onnx_export), ("pt2", pt2_export)):
        shutil.copytree(export, root / fmt, copy_function=os.link)  # beside the trials: Suite.add copies from there
    assert CACHE_FILES <= {p.name for p in (root / "onnx").iterdir()}  # written by validation's load
    shutil.copytree(other_onnx_export, root / "onnx-other", copy_function=os.link)  # another model, same shapes

    onnx, pt2 = Suite(root / "onnx"), Suite(root / "pt2")
    for suite, other_format, seed in ((onnx, "tformer-pt2", 1), (pt2, "tformer-onnx", 2)):
        suite.add("untouched", "baseline", "", None, expect="same")
        add_json_trials(suite, other_format)
        add_file_trials(suite)
        add_random_trials(suite, seed)
    # a graph cache made for another model.onnx, copied beside this one: not used, rebuilt
    onnx.add("other export, untouched", "baseline", "", None, expect="same", baseline="other export, untouched")
    stale = onnx.add("stale cache", "stale", "", None, expect="same", baseline="other export, untouched")
    for t in onnx.trials[-2:]:
        shutil.rmtree(t.directory)
        shutil.copytree(root / "onnx-other", t.directory)
    for name in CACHE_FILES:
        shutil.copy(root / "onnx" / name, stale.directory / name)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    for suite in (onnx, pt2):
        run_worker(suite, verify_here(suite), prompts)
    return {"onnx": onnx, "pt2": pt2}


def cache_is_valid(directory: Path) -> bool:
    """The optimized-graph cache matches its record, and the record is for this model.onnx."""
    record = json.loads((directory / "model.cpu.opt.json").read_text())
    graph = hashlib.sha256((directory / "model.cpu.opt.onnx").read_bytes()).hexdigest()
    model = hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest()
    return record["sha256"] == graph and record["key"]["graph_sha256"] == model


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_untouched_export_loads_in_a_fresh_process_with_eagers_tokens(suites, trained, fmt):
    """The untouched export, loaded by the worker (a process that never saw the model), gives
    eager's greedy tokens and text."""
    suite = suites[fmt]
    baseline = suite.outcomes["untouched"]
    assert baseline["outcome"] == "tokens", baseline
    ids, text = baseline["tokens"]
    assert len({t for row in ids for t in row}) >= 8 and text  # varied enough that a changed model would show
    model, tokenizer = trained
    eager = Runtime.from_model(copy.deepcopy(model), tokenizer, device="cpu")
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert ids == token_ids(eager, prompts, max_new_tokens=12, temperature=0)
    assert text == eager.generate("def ", max_new_tokens=8, temperature=0)[0].text
    assert verified_meta(suite.pristine) == json.loads((suite.pristine / "tformer.json").read_text())


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_every_tformer_json_edit_fails_in_one_line_or_changes_nothing(suites, fmt):
    assert len([t for t in suites[fmt].trials if t.group == "json"]) >= 60
    suites[fmt].check("json")


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_every_file_deleted_truncated_or_flipped_fails_in_one_line_or_changes_nothing(suites, fmt):
    suites[fmt].check("files")


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_random_corruption_never_crashes_and_never_loads_changed_content(suites, fmt):
    trials = [t for t in suites[fmt].trials if t.group == "random"]
    assert {t.name.split()[1] for t in trials} == set(KINDS)
    assert sum(t.expect == "error" for t in trials) >= len(trials) // 2  # most changes must be refused
    suites[fmt].check("random")


def test_damaged_graph_cache_is_rebuilt_with_the_same_tokens(suites):
    suite = suites["onnx"]
    damaged = [t for t in suite.trials if t.file in CACHE_FILES]
    assert {t.name for t in damaged} >= {"model.cpu.opt.onnx emptied", "model.cpu.opt.onnx cut in half",
                                         "model.cpu.opt.onnx middle byte flipped", "model.cpu.opt.json deleted"}  # fmt: skip
    for t in damaged:  # same tokens: checked with their groups
        assert suite.outcomes[t.name]["outcome"] == "tokens", (t.name, suite.outcomes[t.name])
        assert cache_is_valid(t.directory), f"{t.name}: the cache was not rebuilt"


def test_stale_graph_cache_is_not_used(suites):
    suite = suites["onnx"]
    assert suite.outcomes["other export, untouched"]["tokens"] != suite.outcomes["untouched"]["tokens"]
    suite.check("stale")  # the other export's tokens, not those of the cache's model
    assert cache_is_valid(next(t for t in suite.trials if t.name == "stale cache").directory)


def test_onnx_export_refuses_a_device_it_cannot_run_on(suites, monkeypatch):
    directory = suites["onnx"].pristine
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA and onnxruntime's CUDA provider are both here")
    loads = (lambda: tformer.load(directory, device="cuda"), lambda: open_export(directory, torch.device("cuda")))
    for load in loads:
        with pytest.raises(TformerError, match="CUDA") as info:
            load()
        assert "\n" not in str(info.value)
    # torch sees a GPU, onnxruntime is the CPU-only package: refused, not run on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(TformerError, match="onnxruntime has no CUDA provider"):
        open_export(directory, torch.device("cuda"))


def graph_value(values, name: str):
    """The graph input or output (ValueInfoProto) called `name`."""
    return next(v for v in values if v.name == name)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda graph: graph_value(graph.input, "past.0.key").type.tensor_type.shape.dim[1].__setattr__("dim_value", 8),
         "graph's inputs differ"),  # heads
        (lambda graph: graph_value(graph.input, "last_index").type.tensor_type.__setattr__("elem_type", 6),
         "graph's inputs differ"),  # int32
        (lambda graph: graph.output[0].type.tensor_type.__setattr__("elem_type", 10), "graph's outputs differ"),  # float16
        (lambda graph: graph_value(graph.input, "past.0.value").__setattr__("name", "past.0.val"), "graph's inputs differ"),
    ],
)
def test_onnx_graph_that_differs_from_the_config_is_refused(suites, tmp_path, edit, message):
    """A graph whose metadata_props and hash agree with tformer.json but whose signature does not
    (a deliberate two-file edit): refused before onnxruntime binds a buffer."""
    import onnx

    directory = tmp_path / "export"
    shutil.copytree(suites["onnx"].pristine, directory)
    model = onnx.load(str(directory / "model.onnx"))
    edit(model.graph)
    onnx.save(model, str(directory / "model.onnx"))
    meta = json.loads((directory / "tformer.json").read_text())
    meta["files"]["model.onnx"] = hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest()
    (directory / "tformer.json").write_text(json.dumps(meta))
    with pytest.raises(TformerError, match=message):
        verified_meta(directory)
