"""The README's own commands, run as written, as a newcomer runs them after `tformer demo`.

Every fenced ```bash command and ```python block of README.md is either run here, in a temporary
directory holding the `tformer-demo.safetensors` the demo would have written (the session's small
trained model, not a 6-minute training run), or listed in SKIPPED with the reason; a README block
that is neither fails `test_every_readme_block_is_run_or_skipped`. `tformer` commands run
in-process through click's CliRunner; `curl` and the `openai` client talk to a real server on a
free port (`serve_in_thread`), the one substitution being the README's port 8000 for that port.
The docs pages' commands are checked more cheaply: their options must parse (the CLI's own parser),
their Python must compile, and every relative link must lead to a file and heading that exist.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import tformer
from tformer.bench.cli import main as bench_main
from tformer.checkpoint import save_checkpoint
from tformer.cli import cli, export_cmd

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
DEMO = "tformer-demo.safetensors"  # what `tformer demo` writes in the current directory
PORT = "8000"  # the port the README's server examples name

ENTRY_POINTS: dict[str, click.Command] = {"tformer": cli, "tformer-export": export_cmd, "tformer-bench": bench_main}
MODULES = {"tformer.cli": "tformer", "tformer.bench.cli": "tformer-bench"}  # python -m MODULE


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, the line of its opening fence, its text."""

    lang: str
    line: int
    text: str
    source: Path

    def commands(self) -> list[tuple[int, str]]:
        """A shell block's commands: (line, command) with `\\` continuations joined, `a && b` as
        two commands, blank and comment-only lines left out."""
        found, pending, start = [], "", 0
        for n, raw in enumerate(self.text.splitlines(), self.line + 1):
            if not pending and (not raw.strip() or raw.lstrip().startswith("#")):
                continue
            start = start if pending else n
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            found += [(start, part) for part in and_list(pending + raw)]
            pending = ""
        return found


def and_list(command: str) -> list[str]:
    """`a && b` as its commands a and b (an `&&` inside quotes or a comment does not count)."""
    parts, quote, i, begin = [], None, 0, 0
    while i < len(command):
        c = command[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or command[i - 1].isspace()):
            break
        elif command.startswith("&&", i):
            parts.append(command[begin:i])
            begin = i = i + 2
            continue
        i += 1
    return [part.strip() for part in [*parts, command[begin:]] if part.strip()]


def blocks(path: Path) -> list[Block]:
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        if m := re.fullmatch(r"```(\w*)\s*", lines[i]):
            end = lines.index("```", i + 1)
            found.append(Block(m.group(1), i + 1, "\n".join(lines[i + 1 : end]), path))
            i = end
        i += 1
    return found


def words(command: str) -> list[str]:
    """A command's words as a POSIX shell splits them, comments dropped, `>` `&&` `|` `;` apart."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


# --- what the test does with each README command ---------------------------------------------------

SKIPPED = {  # a shell command matching the pattern (first match wins) -> why it is not run here
    r"^pip install ": "installs packages: CI's own install (.ci/run) does it in a fresh venv",
    r"^tformer demo\b": "trains for minutes; tests/test_cli.py::test_demo_end_to_end runs it with 3 steps",
    r"^python -m pytest\b": "that is this suite",
    r"^tformer-export ": "an export and its validation take 10-30 s; tests/test_onnx.py and tests/test_aot.py "
                         "run `tformer-export` (CliRunner on export_cmd)",
    r"^tformer generate tformer-demo-onnx\b": "needs the export above; tests/test_onnx.py generates from exports",
    r"^tformer serve .*--ray(?!.*--print-config)": "starts Ray and serves until Ctrl-C; tests/test_rayserve.py",
    r"^tformer serve (?!.*--print-config)": "a server runs until Ctrl-C; the curl and openai examples run here against "
                                            "the same file served in a thread, and tests/test_serve.py runs `tformer serve`",
}
SKIPPED_PYTHON: dict[str, str] = {}  # a substring of a python block -> why it is not run here


@dataclass
class Session:
    """The directory the README's commands run in, and a server for its HTTP examples, started
    the first time one needs it."""

    cwd: Path
    stack: contextlib.ExitStack
    capsys: pytest.CaptureFixture
    _url: str | None = None

    def url(self) -> str:
        if self._url is None:
            from tformer.serve.server import serve_in_thread

            runtime = tformer.load(self.cwd / DEMO, device="cpu")  # as `tformer serve DEMO` loads it
            self._url = self.stack.enter_context(serve_in_thread(runtime, model_name=Path(DEMO).stem))
        return self._url

    def greedy(self, prompt: str, max_tokens: int) -> str:
        """The demo model's greedy completion, in-process: what the server must answer."""
        return tformer.load(self.cwd / DEMO, device="cpu").generate([prompt], max_new_tokens=max_tokens, temperature=0)[0].text


def invoke(command: str, cwd: Path) -> click.testing.Result:
    """Run a `tformer`, `tformer-export` or `tformer-bench` command in-process; `> FILE` at its
    end writes its stdout to FILE, as the shell would."""
    args = words(command)
    target = None
    if len(args) > 2 and args[-2] == ">":
        args, target = args[:-2], args[-1]
    assert not {">", ">>", "<", "|", "&&", "||", ";", "&"} & set(args), f"not one command: {command}"
    result = CliRunner().invoke(ENTRY_POINTS[args[0]], args[1:], prog_name=args[0])
    assert result.exit_code == 0, f"{command}\nexit code {result.exit_code}:\n{result.output}"
    if target is not None:
        (cwd / target).write_text(result.stdout)
    return result


def run_generate(command: str, s: Session) -> None:
    result = invoke(command, s.cwd)
    assert result.stdout.startswith(words(command)[3]), result.output  # the prompt, then its (sampled) completion


def run_generate_ids(command: str, s: Session) -> None:
    result = invoke(command, s.cwd)
    args = words(command)
    ids = [int(t) for t in result.stdout.split()]
    vocab = tformer.load(s.cwd / args[2], nhead=int(args[args.index("--nhead") + 1])).config.vocab_size
    assert len(ids) <= int(args[args.index("-n") + 1]) and all(0 <= t < vocab for t in ids), result.output


def run_convert(command: str, s: Session) -> None:
    args = words(command)
    out = s.cwd / args[args.index("-o") + 1]
    result = invoke(command, s.cwd)
    assert result.stdout.startswith(f"wrote {out.name}") and "with tokenizer" in result.stdout, result.output
    assert out.exists()


def run_info(command: str, s: Session) -> None:
    result = invoke(command, s.cwd)
    rows = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert rows["heads"].startswith("4") and rows["tokenizer"].startswith("yes") and "SHA-256" in rows["verified"], rows


def run_throughput(command: str, s: Session) -> None:
    result = invoke(command, s.cwd)
    assert re.search(r"continuous\s", result.stdout) and re.search(r"static\s", result.stdout), result.output


def run_ray_config(command: str, s: Session) -> None:
    import yaml  # a dependency of Ray, as --print-config's own

    invoke(command, s.cwd)
    args = words(command)
    config = yaml.safe_load((s.cwd / args[-1]).read_text())
    app = config["applications"][0]
    assert app["import_path"] == "tformer.serve.rayserve:app_builder", app
    assert app["args"]["model"] == str(s.cwd / DEMO) and app["args"]["model_name"] == "tformer-demo", app
    assert app["deployments"][0]["num_replicas"] == int(args[args.index("--replicas") + 1]), app


def run_curl(command: str, s: Session) -> None:
    """The command as written, through bash, with the README's port swapped for the test server's."""
    port = s.url().rsplit(":", 1)[1]
    assert command.count(f":{PORT}/") == 1, command
    done = subprocess.run(["bash", "-c", command.replace(f":{PORT}/", f":{port}/")], capture_output=True, text=True,
                          timeout=60, cwd=s.cwd)  # fmt: skip
    assert done.returncode == 0, done.stderr
    args = words(command)
    body = json.loads(args[args.index("-d") + 1])
    answer = json.loads(done.stdout)
    assert "error" not in answer, answer  # curl -s exits 0 on a 404 too
    assert answer["model"] == body["model"] == "tformer-demo", answer
    assert answer["choices"][0]["text"] == s.greedy(body["prompt"], body["max_tokens"]), answer


def run_load_block(code: str, s: Session) -> None:
    s.capsys.readouterr()
    exec(compile(code, f"{README.name} block", "exec"), {"__name__": "__readme__"})
    printed = s.capsys.readouterr().out
    assert printed.startswith("[") and "\n" in printed, printed
    assert (s.cwd / "model.pt").exists() and (s.cwd / "tokenizer.json").exists()


def run_openai_block(code: str, s: Session) -> None:
    base = f"http://127.0.0.1:{PORT}/v1"
    assert code.count(base) == 1, "the openai example names the README's server by this URL"
    s.capsys.readouterr()
    exec(compile(code.replace(base, f"{s.url()}/v1"), f"{README.name} block", "exec"), {"__name__": "__readme__"})
    printed = s.capsys.readouterr().out
    want = s.greedy("def main(", 32)  # the block's first request, greedy
    assert printed.startswith(want + "\n") and len(printed) > len(want) + 1, (printed, want)


RUN: dict[str, Callable[[str, Session], None]] = {  # a shell command matching the pattern -> its check
    r"^tformer generate \S+ --nhead \d+ --ids ": run_generate_ids,
    r"^tformer generate tformer-demo\.safetensors ": run_generate,
    r"^tformer convert ": run_convert,
    r"^tformer info ": run_info,
    r"^tformer-bench throughput ": run_throughput,
    r"^tformer serve .*--ray.*--print-config > \S+": run_ray_config,
    r"^curl ": run_curl,
}
RUN_PYTHON: dict[str, Callable[[str, Session], None]] = {  # a substring of a python block -> its check
    f'tformer.load("{DEMO}")': run_load_block,
    "from openai import OpenAI": run_openai_block,
}


def classify(block: Block) -> list[tuple[int, str, str, Callable | str | None]]:
    """(line, what, table key, check or skip reason) for each command of a block; None: unlisted.
    Skips are looked up first, so a skipped command never runs by accident."""
    if block.lang == "python":
        key = next((k for k in [*SKIPPED_PYTHON, *RUN_PYTHON] if k in block.text), None)
        return [(block.line, block.text, key, SKIPPED_PYTHON.get(key) or RUN_PYTHON.get(key))]
    out = []
    for line, command in block.commands():
        key = next((k for k in [*SKIPPED, *RUN] if re.search(k, command)), None)
        out.append((line, command, key, SKIPPED.get(key) or RUN.get(key)))
    return out


def readme_blocks() -> list[Block]:
    return [b for b in blocks(README) if b.lang in ("bash", "python")]


def test_every_readme_block_is_run_or_skipped():
    """A new README command needs a check in RUN or a reason in SKIPPED; a table entry that no
    longer matches anything is stale and goes too."""
    assert all(b.lang in ("bash", "python") for b in blocks(README)), "README code blocks are ```bash or ```python"
    rows = [row for b in readme_blocks() for row in classify(b)]
    unlisted = [f"README.md:{line}: {what.splitlines()[0]}" for line, what, _, how in rows if how is None]
    assert not unlisted, "README commands neither run nor skipped here:\n" + "\n".join(unlisted)
    used = {key for *_, key, _ in rows}
    stale = [k for k in [*SKIPPED, *SKIPPED_PYTHON, *RUN, *RUN_PYTHON] if k not in used]
    assert not stale, f"entries that match no README command: {stale}"


def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys, trained):
    model, tokenizer = trained
    save_checkpoint(tmp_path / DEMO, model, tokenizer)  # in place of `tformer demo`'s 6 minutes
    monkeypatch.chdir(tmp_path)
    ran = []
    with contextlib.ExitStack() as stack:
        session = Session(tmp_path, stack, capsys)
        for block in readme_blocks():
            for line, what, _, how in classify(block):
                assert how is not None, f"README.md:{line} is neither run nor skipped: {what}"
                if callable(how):
                    how(what, session)
                    ran.append(line)
    assert len(ran) >= 8, ran


def test_readme_is_short_and_starts_with_the_demo():
    """At most 250 lines; the CPU-only torch note before any install; the first block installs and
    runs the demo, the second runs the tests; every docs page linked."""
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    first, second = ([c for _, c in b.commands()] for b in [b for b in readme_blocks() if b.lang == "bash"][:2])
    assert first[-2:] == ['pip install -e ".[dev]"', "tformer demo"] and second == ["python -m pytest -q"]
    assert first[0].startswith("pip install torch --index-url https://download.pytorch.org/whl/cpu"), first
    assert text.index("CPU-only build first") < text.index("```bash")
    for page in DOCS:
        assert f"]({page.relative_to(ROOT)})" in text, f"the README links {page.name}"


# --- the docs pages: options that parse, Python that compiles, links that lead somewhere -----------------


def cli_words(command: str) -> list[str] | None:
    """The words of a tformer command (`tformer ...`, `tformer-bench ...`, `python -m tformer.cli
    ...`, after VAR=value assignments), redirection dropped; None for other commands."""
    args = words(command)
    while args and re.fullmatch(r"\w+=\S*", args[0]):
        args = args[1:]
    if args[:2] == ["python", "-m"] and len(args) > 2 and args[2] in MODULES:
        args = [MODULES[args[2]], *args[3:]]
    if not args or args[0] not in ENTRY_POINTS:
        return None
    return args[: args.index(">")] if ">" in args else args


def parse(args: list[str]) -> None:
    """Parse a command line as the CLI would, without running it: unknown options, bad values and
    missing arguments raise click's UsageError."""
    ctx = ENTRY_POINTS[args[0]].make_context(args[0], args[1:])
    while isinstance(ctx.command, click.Group):
        name, command, rest = ctx.command.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        ctx = command.make_context(name, rest, parent=ctx)


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_docs_commands_take_the_options_they_show(page):
    for block in blocks(page):
        if block.lang == "python":
            compile(block.text, f"{page.name}:{block.line}", "exec")
        elif block.lang == "bash":
            for line, command in block.commands():
                if (args := cli_words(command)) is not None:
                    try:
                        parse(args)
                    except click.UsageError as exc:
                        pytest.fail(f"{page.name}:{line}: {command}\n{exc.format_message()}")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_lead_to_files_and_headings(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: no heading #{anchor} in {dest.name}"
