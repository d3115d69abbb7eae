"""Old import paths of modules that moved, kept for one release.

``import llmprod.throttle`` (and every other path in :data:`MOVED`) still works: it
gives the module at the new path and warns with a :class:`DeprecationWarning`
naming it. A meta-path finder serves these names, so no stub file per old module
is needed; it is installed by ``import llmprod``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "llmprod._threads": "llmprod.exec.threads",
    "llmprod.attention": "llmprod.layers.attention",
    "llmprod.attention.metadata": "llmprod.layers.attention.metadata",
    "llmprod.attention.reference": "llmprod.layers.attention.reference",
    "llmprod.attention.torch_backend": "llmprod.layers.attention.torch_backend",
    "llmprod.cache.answers": "llmprod.answers.caches",
    "llmprod.cache.response": "llmprod.answers.exact",
    "llmprod.cache.semantic": "llmprod.answers.semantic",
    "llmprod.detokenizer": "llmprod.engine.detokenizer",
    "llmprod.embeddings": "llmprod.answers.embeddings",
    "llmprod.guards": "llmprod.ops.guards",
    "llmprod.inputs": "llmprod.engine.inputs",
    "llmprod.metrics": "llmprod.ops.metrics",
    "llmprod.models.cpu_linear": "llmprod.layers.linear",
    "llmprod.models.screened_head": "llmprod.layers.screened_head",
    "llmprod.pricing": "llmprod.ops.pricing",
    "llmprod.prometheus": "llmprod.ops.prometheus",
    "llmprod.quality": "llmprod.eval.quality",
    "llmprod.quant.bnb_checkpoint": "llmprod.quant.bnb",
    "llmprod.request": "llmprod.sched.request",
    "llmprod.runner": "llmprod.exec.runner",
    "llmprod.sampler": "llmprod.exec.sampler",
    "llmprod.scheduler": "llmprod.sched.scheduler",
    "llmprod.signals": "llmprod.ops.signals",
    "llmprod.throttle": "llmprod.ops.limits",
}
"""Old module path -> where it lives now."""


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers the old paths with the new modules."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The module is the new one, already executed: give it back its own
        spec, which the import system replaced with the old path's."""
        old = module.__spec__.name if module.__spec__ is not None else ""
        module.__spec__ = self._specs.pop(old, module.__spec__)


_FINDER = _MovedModuleFinder()


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once): an old submodule path
    such as ``llmprod.attention.metadata`` would otherwise be found again by the
    path finder under the new package's ``__path__``, as a second copy."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
