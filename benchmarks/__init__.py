"""Benchmarks: the shared workload generator, end-to-end runs and kernel timings."""
