"""Production controls around the engine.

- :mod:`~llmprod.ops.limits`: per-tenant rate, concurrency and budget limits.
- :mod:`~llmprod.ops.buckets`: one tenant's buckets and counters behind the limits.
- :mod:`~llmprod.ops.checks`: the number checks the limits and the fair queue share.
- :mod:`~llmprod.ops.pricing`: price tables and the cost of a request.
- :mod:`~llmprod.ops.guards`: prompt and output guards (PII, block lists).
- :mod:`~llmprod.ops.signals`: hallucination signals (log-probabilities, grounding).
- :mod:`~llmprod.ops.metrics`: counters, latency percentiles, the snapshot.
- :mod:`~llmprod.ops.prometheus`: the Prometheus exporter of the same names.
"""
