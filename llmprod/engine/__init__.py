"""The Engine, split by phase.

- :mod:`~llmprod.engine.engine`: the facade users call (sync and async API,
  handles and result sinks).
- :mod:`~llmprod.engine.core`: the step loop that owns scheduler, KV cache and model.
- :mod:`~llmprod.engine.admission`: validate -> guards -> limits -> answer-cache lookup.
- :mod:`~llmprod.engine.output`: stops, detokenizer, Completion/Delta, pricing, hooks.
- :mod:`~llmprod.engine.loading`: ``from_pretrained`` and the quantize-once cache.
"""

from llmprod.engine.engine import Engine

__all__ = ["Engine"]
