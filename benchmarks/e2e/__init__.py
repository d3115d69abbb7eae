"""End-to-end benchmarks: llmprod against transformers baselines on one workload."""
