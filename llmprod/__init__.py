"""llmprod: an embeddable LLM inference engine.

>>> from llmprod import Engine, SamplingParams  # doctest: +SKIP
>>> engine = Engine.from_pretrained("smollm2-135m")  # doctest: +SKIP
>>> engine.generate("Hello", SamplingParams(max_tokens=8))[0].text  # doctest: +SKIP
"""

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
from llmprod.metrics import MetricsSnapshot
from llmprod.outputs import Completion, Delta, Timings, TokenLogprob, Usage
from llmprod.router import CascadePolicy, ComplexityPolicy, Router
from llmprod.sampling_params import SamplingParams

__version__ = "0.1.0"

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
