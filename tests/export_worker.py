"""Loads export directories and generates from them, one trial after another, for
`test_export_integrity.py`: in a subprocess, so that a crash of a native runtime (a signal, an
abort) fails the trial it happened in instead of killing pytest.

    python export_worker.py SPEC.json

SPEC: {"prompts": [[ids], ...], "text": str, "trials": [{"name": str, "directory": str}, ...]}.
For each trial, one line on stdout: `TRIAL {"name": ..., "outcome": ...}` with outcome "tokens"
(and "tokens": [greedy ids of the prompts, greedy text after `text`]), "error" (a TformerError,
and its "message") or "traceback" (any other exception: its "type" and "message").
"""

from __future__ import annotations

import json
import sys

import tformer
from tformer.errors import TformerError


def trial(directory: str, prompts: list[list[int]], text: str) -> dict:
    try:
        runtime = tformer.load(directory, device="cpu")
        ids = [out.token_ids for out in runtime.generate(prompts, max_new_tokens=12, temperature=0)]
        return {"outcome": "tokens", "tokens": [ids, runtime.generate(text, max_new_tokens=8, temperature=0)[0].text]}
    except TformerError as exc:
        return {"outcome": "error", "message": str(exc)}
    except Exception as exc:  # what the test counts as a traceback
        return {"outcome": "traceback", "type": type(exc).__name__, "message": str(exc)}


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    for t in spec["trials"]:
        result = {"name": t["name"], **trial(t["directory"], spec["prompts"], spec["text"])}
        print("TRIAL", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
