"""Benchmark scripts; each prints markdown tables: `python -m benchmarks.NAME`."""
