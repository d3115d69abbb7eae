"""Scale out on Ray: batch inference on Ray Data, online serving on Ray Serve.

- :mod:`llmprod.integrations.ray.data`: :class:`LLMProcessor` (a callable class
  for ``Dataset.map_batches``, one Engine per actor), :func:`build_processor`,
  :func:`run_batch`.
- :mod:`llmprod.integrations.ray.serve`: :func:`build_app` (one model behind
  OpenAI-compatible routes), :func:`build_router_app` (model deployments of
  several sizes behind an llmprod Router), the deployments themselves.
- :mod:`llmprod.integrations.ray.openai_api`: the HTTP surface (no Ray import).

Needs ``pip install 'llmprod[ray]'``; ``import llmprod`` never imports Ray. The
submodules load on first use of their names (``import ray.serve`` costs about
a second). See docs/ray.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmprod.integrations import require

require("ray", "ray")

if TYPE_CHECKING:
    from llmprod.integrations.ray.data import LLMProcessor, build_processor, run_batch
    from llmprod.integrations.ray.serve import (
        LLMDeployment,
        LLMServer,
        RouterDeployment,
        RouterServer,
        build_app,
        build_router_app,
    )

__all__ = [
    "LLMDeployment",
    "LLMProcessor",
    "LLMServer",
    "RouterDeployment",
    "RouterServer",
    "build_app",
    "build_processor",
    "build_router_app",
    "run_batch",
]

_HOMES = {
    "LLMProcessor": "data",
    "build_processor": "data",
    "run_batch": "data",
    "LLMDeployment": "serve",
    "LLMServer": "serve",
    "RouterDeployment": "serve",
    "RouterServer": "serve",
    "build_app": "serve",
    "build_router_app": "serve",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f"{__name__}.{home}")
    return getattr(module, name)
