"""One row of the benchmark in a process of its own, for the figures one process cannot give.

`python -m tformer.bench.isolated SPEC` (SPEC: JSON from `harness.run_alone`) loads the
checkpoint, sets up that one row as the benchmark does (build, then the correctness check's
generation, where compiling backends compile), then generates once at each batch size, smallest
first. It prints one JSON line: the setup seconds (with the caches the benchmark just filled: the
warm setup of a compiling backend) and the peak memory of each generation. In the benchmark's own
process every row would inherit the peak of the rows before it, and memory freed by one row
stays mapped for the next; here nothing but this row was ever loaded.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from tformer.bench.harness import (CHECK_NEW_TOKENS, CHECK_PROMPT_LEN, CT2_ROW, FLOOR_ROW, HF_ROW, Entrant, check_generation,
                                   ct2_entrant, floor_entrant, hf_entrant, make_prompts)  # fmt: skip
from tformer.bench.memory import PeakMemory
from tformer.checkpoint import load_model
from tformer.runtime import Runtime, resolve_dtype


def measure(spec: dict) -> dict:
    """{"setup_s", "base_mib": held before the setup, "peak_mib": {batch (str): MiB}, "source": what
    the peaks are}."""
    device, dtype = torch.device(spec["device"]), resolve_dtype(spec["dtype"])
    memory = PeakMemory(device)
    # In dtype before any backend sees it, as in the benchmark's process (where eager, set up first,
    # converts the shared model): export backends then find the export that process stored.
    model = load_model(spec["checkpoint"])[0].to(dtype)
    base = memory.current_mib()  # the interpreter, torch and the model: every row's process holds them
    began = time.perf_counter()
    sizes = dict(max_batch_size=max(spec["batch_sizes"]),
                 max_len=max(spec["prompt_len"] + spec["new_tokens"], CHECK_PROMPT_LEN + CHECK_NEW_TOKENS))
    if spec["backend"] == HF_ROW:
        entrant = hf_entrant(model.config, spec["prompt_len"] + spec["new_tokens"], device, dtype)
    elif spec["backend"] in (FLOOR_ROW, CT2_ROW):
        outside = floor_entrant if spec["backend"] == FLOOR_ROW else ct2_entrant
        entrant = outside(model, Runtime.from_model(model, device=device, dtype=dtype, **sizes), spec["seed"])
    else:
        runtime = Runtime.from_model(model, backend=spec["backend"], device=device, dtype=dtype, **sizes)
        check_generation(runtime, spec["seed"])
        entrant = Entrant.of(runtime)
    setup_s = time.perf_counter() - began
    peaks = {}
    for batch in spec["batch_sizes"]:
        run = entrant.make_run(make_prompts(model.config.vocab_size, batch, spec["prompt_len"], spec["seed"]), spec["new_tokens"])
        memory.reset()
        run(lambda n=1, at=None: None)
        peaks[str(batch)] = memory.peak_mib()
    source = f"{memory.source} of a process that set up this row alone (its first generation at each batch size, smallest first)"
    return dict(setup_s=setup_s, base_mib=base, peak_mib=peaks, source=source)


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
