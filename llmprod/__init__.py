"""llmprod: an embeddable LLM inference engine.

>>> from llmprod import Engine, SamplingParams  # doctest: +SKIP
>>> engine = Engine.from_pretrained("smollm2-135m")  # doctest: +SKIP
>>> engine.generate("Hello", SamplingParams(max_tokens=8))[0].text  # doctest: +SKIP

The public names are imported on first use (PEP 562), so ``import llmprod.sched``
or ``import llmprod.kv`` needs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llmprod import _compat

if TYPE_CHECKING:
    from llmprod.config import CacheConfig, EngineConfig, SchedulerConfig
    from llmprod.engine import Engine
    from llmprod.errors import (
        EngineClosedError,
        InvalidConfigError,
        InvalidRequestError,
        LLMProdError,
        RateLimited,
        RequestFailedError,
    )
    from llmprod.ops.metrics import MetricsSnapshot
    from llmprod.outputs import Completion, Delta, Timings, TokenLogprob, Usage
    from llmprod.router import CascadePolicy, ComplexityPolicy, Router
    from llmprod.sampling_params import SamplingParams

__version__ = "0.1.0"

_PUBLIC = {
    "CacheConfig": "llmprod.config",
    "CascadePolicy": "llmprod.router",
    "Completion": "llmprod.outputs",
    "ComplexityPolicy": "llmprod.router",
    "Delta": "llmprod.outputs",
    "Engine": "llmprod.engine",
    "EngineClosedError": "llmprod.errors",
    "EngineConfig": "llmprod.config",
    "InvalidConfigError": "llmprod.errors",
    "InvalidRequestError": "llmprod.errors",
    "LLMProdError": "llmprod.errors",
    "MetricsSnapshot": "llmprod.ops.metrics",
    "RateLimited": "llmprod.errors",
    "RequestFailedError": "llmprod.errors",
    "Router": "llmprod.router",
    "SamplingParams": "llmprod.sampling_params",
    "SchedulerConfig": "llmprod.config",
    "Timings": "llmprod.outputs",
    "TokenLogprob": "llmprod.outputs",
    "Usage": "llmprod.outputs",
}

__all__ = [
    "CacheConfig",
    "CascadePolicy",
    "Completion",
    "ComplexityPolicy",
    "Delta",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "InvalidConfigError",
    "InvalidRequestError",
    "LLMProdError",
    "MetricsSnapshot",
    "RateLimited",
    "RequestFailedError",
    "Router",
    "SamplingParams",
    "SchedulerConfig",
    "Timings",
    "TokenLogprob",
    "Usage",
    "__version__",
]

_compat.install()


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'llmprod' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
