"""Per-request timings and the serving figures vLLM reports from them, shared by the in-process
benchmark (`tformer-bench throughput`, `serve --offline`) and the HTTP load generator
(`tformer-bench serve`), so that both compute TTFT, TPOT, ITL and end-to-end latency the same way
and their rows can be compared side by side."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tformer.bench.stats import summary

ERRORS_KEPT = 5  # distinct error messages a run keeps for its record: enough to diagnose, not a log


@dataclass
class RequestTiming:
    """One request, times in seconds on one clock: `sent` when it was handed to the server (or
    the engine), `token_times` when each piece of output arrived (a streamed chunk carrying text,
    or an engine step's token), `end` when its response ended. `output_tokens` is the server's
    count when it reported one (usage), else the pieces are counted. `error`: why it failed."""

    prompt_len: int
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)
    end: float | None = None
    output_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tokens(self) -> int:
        return len(self.token_times) if self.output_tokens is None else self.output_tokens


def serving_metrics(timings: Sequence[RequestTiming], duration: float) -> dict:
    """vLLM's figures over a run of `duration` seconds. Failed requests count only in `failed`
    (with their first distinct errors); latencies are mean / p50 (the median) / p99 in ms over the
    completed requests: TTFT (sent to first output), TPOT ((e2el - ttft) / (tokens - 1), requests
    with more than one token), ITL (every gap between consecutive pieces of output: tokens that
    arrive together, as a multi-step decode delivers them, are one piece) and E2EL (sent to end). Throughputs are per second of the whole run."""
    done = [t for t in timings if t.ok]
    inputs = sum(t.prompt_len for t in done)
    outputs = sum(t.tokens for t in done)
    ttft = [t.token_times[0] - t.sent for t in done]
    e2el = [t.end - t.sent for t in done]
    tpot = [(e - f) / (t.tokens - 1) for t, f, e in zip(done, ttft, e2el) if t.tokens > 1]
    itl = [b - a for t in done for a, b in zip(t.token_times, t.token_times[1:]) if b > a]
    return dict(
        completed=len(done), failed=len(timings) - len(done),
        errors=list(dict.fromkeys(t.error for t in timings if not t.ok))[:ERRORS_KEPT], duration_s=duration,
        total_input_tokens=inputs, total_output_tokens=outputs, request_throughput=len(done) / duration,
        output_throughput=outputs / duration, total_token_throughput=(inputs + outputs) / duration,
        ttft_ms=_ms(ttft), tpot_ms=_ms(tpot), itl_ms=_ms(itl), e2el_ms=_ms(e2el),
    )  # fmt: skip


def _ms(seconds: Sequence[float]) -> dict[str, float] | None:
    return summary([1000 * s for s in seconds]) if seconds else None
