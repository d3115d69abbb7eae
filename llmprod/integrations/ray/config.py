"""Engine options as one plain dict, and the CPU share each Ray worker gets.

A Ray Data processor and a Ray Serve deployment each build their Engine in
another process from a config dict (it travels pickled). Plain values are
turned into llmprod's objects here, so a config can come from YAML or JSON:

- ``limits``: ``{tenant: {"requests_per_second": 2, ...}}`` ->
  :class:`~llmprod.ops.limits.TenantLimits` per tenant; ``default_limits``
  likewise for one.
- ``prices``: ``{"prompt_per_1k": 0.1, "completion_per_1k": 0.2}`` ->
  :class:`~llmprod.ops.pricing.PriceTable`.
- ``guards``: ``"pii"``, ``{"type": "pii", "action": "block"}`` or
  ``{"type": "block_list", "words": [...]}`` -> the built-in guards.
- ``cache`` and ``semantic_cache``: a list of cache URLs, hot to cold
  (``["memory://", "redis://cache:6379/0", "s3://bucket/answers"]``) ->
  a :class:`~llmprod.cache.TieredCache` opened in the worker (a backend
  object holds connections and does not travel; its URL does).

Objects of those types pass through unchanged; every other key is an
:meth:`Engine.from_pretrained` option and goes through as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from llmprod.errors import InvalidConfigError

__all__ = ["engine_kwargs", "threads_for"]


def threads_for(num_cpus: float | None) -> int:
    """The torch threads of an Engine on a worker holding ``num_cpus`` CPUs.

    A fractional share (0.5 CPU, so that several workers fit one core) still
    runs one thread; a whole number runs that many.

    >>> threads_for(0.5), threads_for(2), threads_for(None)
    (1, 2, 1)
    """
    if num_cpus is None:
        return 1
    return max(1, math.floor(num_cpus))


def _limits(value: Any, name: str) -> Any:
    from llmprod.ops.limits import TenantLimits

    if isinstance(value, Mapping):
        try:
            return TenantLimits(**value)
        except TypeError as e:
            raise InvalidConfigError(f"{name}: {e}", name.split("[")[0]) from e
    return value


def _guard(spec: Any, i: int) -> Any:
    from llmprod.ops.guards import BlockListGuard, PIIGuard

    kinds = {"pii": PIIGuard, "block_list": BlockListGuard}
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        return spec  # a Guard object
    options = dict(spec)
    kind = options.pop("type", None)
    if kind not in kinds:
        raise InvalidConfigError(
            f"guards[{i}]={spec!r}: 'type' must be one of {sorted(kinds)}", "guards"
        )
    return kinds[kind](**options)


def engine_kwargs(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments of :meth:`Engine.from_pretrained` from a config dict.

    Args:
        config: engine options; ``limits``, ``default_limits``, ``prices`` and
            ``guards`` may be plain values (see the module docstring).

    Returns:
        A new dict, ready for ``Engine.from_pretrained(model, **kwargs)``.

    Raises:
        InvalidConfigError: a plain value that does not make its object.
    """
    out = dict(config or {})
    if isinstance(out.get("limits"), Mapping):
        out["limits"] = {
            t: _limits(v, f"limits[{t!r}]") for t, v in out["limits"].items()
        }
    if "default_limits" in out:
        out["default_limits"] = _limits(out["default_limits"], "default_limits")
    if isinstance(out.get("prices"), Mapping):
        from llmprod.ops.pricing import PriceTable

        out["prices"] = PriceTable(**out["prices"])
    if isinstance(out.get("guards"), (list, tuple)):
        out["guards"] = [_guard(g, i) for i, g in enumerate(out["guards"])]
    for name in ("cache", "semantic_cache"):
        if isinstance(out.get(name), (list, tuple)):
            out[name] = _tiers(out[name], name)
    return out


def _tiers(urls: list[Any] | tuple[Any, ...], name: str) -> Any:
    from llmprod.cache import TieredCache, open_cache

    if not urls or not all(isinstance(u, str) for u in urls):
        raise InvalidConfigError(
            f"{name}={urls!r}: a list of cache URLs, hot to cold, is expected", name
        )
    return TieredCache([open_cache(u) for u in urls])
