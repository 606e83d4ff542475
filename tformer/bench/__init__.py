"""Benchmarks: measured side by side in one run, never in timed unit tests."""
