"""Building blocks the models are made of.

- :mod:`~llmprod.layers.attention`: the attention seam (backend protocol, torch and
  Triton backends, references of the kernels, per-step metadata).
- :mod:`~llmprod.layers.linear`: float32 linear layers on oneDNN (CPU).
- :mod:`~llmprod.layers.screened_head`: greedy screening of the lm_head product.
"""
