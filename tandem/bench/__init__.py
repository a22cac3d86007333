"""Benchmark inputs and helpers: workload traces, load generators."""
