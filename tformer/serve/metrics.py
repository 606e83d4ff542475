"""The server's Prometheus metrics, in a registry of its own (one per app, so that tests can run
several servers in one process). Names follow vLLM's where there is one (`tformer:` prefix)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tformer.engine.engine import EngineStats

# Latency buckets in seconds: from a CPU decode step (~1 ms) to a long request.
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], rows: int):
        """`stats()`: the engine's own counts (read at scrape time, see `EngineCollector`)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tformer:requests", "Requests by outcome: stop, length, abort (client gone), "
                                "error (500), rejected (4xx/503).", ["outcome"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter("tformer:prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.ttft = Histogram("tformer:time_to_first_token_seconds", "Arrival to first token.", buckets=LATENCY,
                              registry=r)  # fmt: skip
        self.tpot = Histogram("tformer:time_per_output_token_seconds", "Per request, after its first token.",
                              buckets=LATENCY, registry=r)  # fmt: skip
        self.e2e = Histogram("tformer:e2e_request_latency_seconds", "Arrival to last token.", buckets=LATENCY,
                             registry=r)  # fmt: skip
        r.register(EngineCollector(stats))
        Gauge("tformer:cache_rows", "KV cache rows allocated.", registry=r).set(rows)


class EngineCollector(Collector):
    """The engine's gauges and counters (aborts, generated tokens), from one `stats()` per scrape:
    what the engine itself reports (for `tformer serve`, its process's latest step), never the
    HTTP side's own bookkeeping, so that a request the engine never let go of shows."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.stats()
        yield GaugeMetricFamily("tformer:num_requests_running", "Requests holding a cache row.", value=s.running)
        yield GaugeMetricFamily("tformer:num_requests_waiting", "Requests waiting for a cache row.", value=s.waiting)
        yield GaugeMetricFamily("tformer:cache_rows_in_use", "KV cache rows in use.", value=s.rows_in_use)
        yield CounterMetricFamily("tformer:engine_aborts", "Requests the engine aborted: clients gone, stop strings, "
                                  "shutdown.", value=s.aborts)  # fmt: skip
        yield CounterMetricFamily("tformer:generation_tokens", "Tokens the engine generated (EOS and stop tokens "
                                  "included).", value=s.tokens)  # fmt: skip
