"""Torch execution of a step: the model runner, the sampler and the compute thread.

- :mod:`~llmprod.exec.runner`: flattens a scheduled step into tensors, runs the model.
- :mod:`~llmprod.exec.sampler`: greedy, temperature, top-k/top-p, penalties, seeds.
- :mod:`~llmprod.exec.threads`: the process-wide compute thread (one OpenMP team).
"""
