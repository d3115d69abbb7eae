"""Prometheus exporter for ``engine.metrics()``.

Needs the optional extra ``metrics`` (``pip install 'llmprod[metrics]'``, i.e.
prometheus-client); it is imported on first use, not with this module.

On each scrape, :class:`SnapshotCollector` calls a function that returns the
snapshot (``engine.metrics``, ``lambda: engine.metrics().to_dict()``, or any
nested dict of plain values) and turns it into metric families by fixed rules, so
that sections the engine adds later are exported without changes here:

- The name is ``llmprod_`` + the keys on the path, joined by ``_``:
  ``kv_cache.usage`` -> ``llmprod_kv_cache_usage``. Characters outside
  ``[a-zA-Z0-9_]`` become ``_``.
- Label levels: the keys of a dict at a path matching ``label_levels`` become
  values of a label instead of name parts. Default: ``tenants`` -> ``tenant``
  (``tenants.acme.cost`` -> ``llmprod_tenants_cost{tenant="acme"}``), and
  ``tier`` for the per-tier dicts of the cache stats (``cache.hits.redis`` ->
  ``llmprod_cache_hits_total{tier="redis"}``).
- Tenant cap: only the ``max_tenants`` tenants with the most requests
  (``submitted``) keep their name; the rest are summed under ``other``
  (:func:`~llmprod.ops.metrics.fold_tenants`), so the label stays bounded.
- Quantiles: a dict whose keys are all ``p<number>`` (as under ``latency_s``)
  becomes one gauge with a ``quantile`` label: ``latency_s.ttft.p99`` ->
  ``llmprod_latency_s_ttft{quantile="0.99"}``.
- Counters: paths matching a pattern in ``counters`` (:mod:`fnmatch` patterns
  over the dotted path, label values shown as ``*``) are counters and get the
  ``_total`` suffix: ``requests.completed`` -> ``llmprod_requests_completed_total``,
  ``cost.total`` -> ``llmprod_cost_total``. Everything else is a gauge.
- Two paths that map to one name (``cache.hits_total`` beside ``cache.hits``):
  the first keeps it and the other is left out (logged once).
- Booleans are gauges of 0 or 1. Strings of one dict become the labels of one
  ``..._info`` gauge of value 1 (``engine.model``, ``engine.device`` ->
  ``llmprod_engine_info{model="...",device="..."} 1``). ``None`` values and
  lists are left out.

The HELP text of each family is the dotted path it comes from.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from llmprod.ops.metrics import fold_tenants

logger = logging.getLogger("llmprod.ops.prometheus")

PIP_HINT = "pip install 'llmprod[metrics]'"

DEFAULT_PREFIX = "llmprod"

DEFAULT_MAX_TENANTS = 100
"""Tenants exported under their own ``tenant`` label value; the rest are ``other``."""

DEFAULT_LABEL_LEVELS: Mapping[str, str] = {
    "tenants": "tenant",
    "adapters": "adapter",
    "cache.tiers": "tier",
    "cache.hits": "tier",
    "cache.backend": "tier",
    "cache.*.tiers": "tier",
    "cache.*.hits": "tier",
    "cache.*.backend": "tier",
}
"""Dotted path (fnmatch pattern) of a dict -> the label its keys become. The cache
entries fit :meth:`llmprod.answers.exact.ResponseCache.stats` and
:meth:`llmprod.cache.TieredCache.stats` placed at ``cache`` or one level below."""

DEFAULT_COUNTERS: tuple[str, ...] = (
    "*.submitted",
    "*.completed",
    "*.aborted",
    "*.errored",
    "tokens.*",
    "scheduler.steps",
    "scheduler.preemptions",
    "scheduler.speculative.steps",
    "scheduler.speculative.*_tokens",
    "kv_cache.evictions",
    "cost.total",
    "tenants.*.cost",
    "tenants.*.prompt_tokens",
    "tenants.*.completion_tokens",
    "tenants.*.admitted",
    "tenants.*.tokens_used",
    "tenants.*.spend",
    "tenants.*.rejected.*",
    "adapters.*.cost",
    "adapters.*.prompt_tokens",
    "adapters.*.completion_tokens",
    "adapters.*.e2e_s",
    "cache.*hits",
    "cache.*hits.*",
    "cache.*misses",
    "cache.*errors",
    "cache.*sets",
    "cache.*failed_writes",
    "cache.*dropped_writes",
    "cache.*skipped",
    "cache.writes",
    "cache.*.writes",
)
"""Paths exported as counters (monotonic totals); the rest are gauges."""

_QUANTILE_KEY = re.compile(r"^p(\d+(?:\.\d+)?)$")
_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(
            f"the Prometheus exporter needs prometheus-client: {PIP_HINT}"
        ) from exc
    return prometheus_client


@dataclass(slots=True)
class _Family:
    name: str
    kind: str
    """"counter", "gauge" or "info" (exported as a gauge)."""
    path: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


class SnapshotCollector:
    """A prometheus-client collector over a snapshot function.

    Register it in any registry (``registry.register(collector)``); each scrape
    calls ``snapshot_fn`` once. An exception from it fails that scrape.

    Args:
        snapshot_fn: returns the snapshot: a mapping, or an object with
            ``to_dict()`` (a :class:`~llmprod.ops.metrics.MetricsSnapshot`).
        prefix: metric name prefix.
        label_levels: dotted dict path -> label name (see the module docstring).
        counters: fnmatch patterns of counter paths.
        max_tenants: tenants (under ``tenants``) exported by name, the most
            requested first; the others are summed as ``other``. ``None``: all.

    Raises:
        ImportError: prometheus-client is not installed (the message gives the
            pip line).
        ValueError: a bad ``prefix`` or ``max_tenants``.
    """

    def __init__(
        self,
        snapshot_fn: Callable[[], Any],
        *,
        prefix: str = DEFAULT_PREFIX,
        label_levels: Mapping[str, str] = DEFAULT_LABEL_LEVELS,
        counters: Iterable[str] = DEFAULT_COUNTERS,
        max_tenants: int | None = DEFAULT_MAX_TENANTS,
    ) -> None:
        self._client = _client()
        ok = isinstance(max_tenants, int) and not isinstance(max_tenants, bool)
        if max_tenants is not None and not (ok and max_tenants >= 0):
            raise ValueError(f"max_tenants={max_tenants!r} must be None or an int >= 0")
        self.max_tenants = max_tenants
        self.snapshot_fn = snapshot_fn
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", prefix):
            raise ValueError(f"prefix={prefix!r} must be a valid metric name")
        self.prefix = prefix
        self.label_levels = {p: _label_name(n) for p, n in label_levels.items()}
        self.counters = tuple(counters)
        self._warned: set[str] = set()

    def describe(self) -> list[Any]:
        """Nothing up front, so registering never calls ``snapshot_fn``."""
        return []

    def collect(self) -> Iterator[Any]:
        """Read one snapshot and yield its metric families."""
        from prometheus_client.metrics_core import Metric

        for fam in self._families(_as_dict(self.snapshot_fn())):
            if fam.kind == "counter":
                metric = Metric(fam.name, fam.path, "counter")
                sample_name = fam.name + "_total"
            else:
                metric = Metric(fam.name, fam.path, "gauge")
                sample_name = fam.name
            for labels, value in fam.samples:
                metric.add_sample(sample_name, labels, value)
            yield metric

    def _families(self, snapshot: Mapping[str, Any]) -> list[_Family]:
        """The families one snapshot maps to (no prometheus-client objects)."""
        tenants = snapshot.get("tenants")
        if self.max_tenants is not None and isinstance(tenants, Mapping):
            snapshot = {**snapshot, "tenants": fold_tenants(tenants, self.max_tenants)}
        out: dict[str, _Family] = {}
        # metric and sample names -> the path that took them
        claims: dict[str, str] = {}
        self._walk(snapshot, [], {}, [], out, claims)
        return list(out.values())

    # -- the mapping -------------------------------------------------------------
    def _walk(
        self,
        node: Mapping[str, Any],
        name: list[str],
        labels: dict[str, str],
        path: list[str],
        out: dict[str, _Family],
        claims: dict[str, str],
    ) -> None:
        label = self._label_for(".".join(path)) if path else None
        info: dict[str, str] = {}
        for raw_key, value in node.items():
            key = str(raw_key)
            if label is not None:
                c_name, c_labels, c_path = name, {**labels, label: key}, [*path, "*"]
            else:
                c_name, c_labels, c_path = [*name, _sanitize(key)], labels, [*path, key]
            if isinstance(value, Mapping):
                if _is_quantiles(value):
                    for q, v in value.items():
                        if _is_sample(v):
                            q_labels = {**c_labels, "quantile": _quantile(str(q))}
                            self._add(out, claims, c_name, "gauge", c_path, q_labels, v)
                else:
                    self._walk(value, c_name, c_labels, c_path, out, claims)
            elif isinstance(value, bool):
                self._add(out, claims, c_name, "gauge", c_path, c_labels, float(value))
            elif _is_sample(value):
                kind = "counter" if self._is_counter(c_path) else "gauge"
                self._add(out, claims, c_name, kind, c_path, c_labels, float(value))
            elif isinstance(value, str) and label is None:
                info[_label_name(key)] = value
            # None, lists and other objects are left out.
        if info:
            info_labels = {**labels, **info}
            self._add(
                out, claims, [*name, "info"], "info", [*path, "info"], info_labels, 1.0
            )

    def _label_for(self, dotted: str) -> str | None:
        exact = self.label_levels.get(dotted)
        if exact is not None:
            return exact
        for pattern, label in self.label_levels.items():
            if fnmatch.fnmatchcase(dotted, pattern):
                return label
        return None

    def _is_counter(self, path: list[str]) -> bool:
        dotted = ".".join(path)
        return any(fnmatch.fnmatchcase(dotted, p) for p in self.counters)

    def _add(
        self,
        out: dict[str, _Family],
        claims: dict[str, str],
        name: list[str],
        kind: str,
        path: list[str],
        labels: dict[str, str],
        value: float,
    ) -> None:
        family = "_".join([self.prefix, *name])
        if kind == "counter":
            family = family.removesuffix("_total")
        sample = family + "_total" if kind == "counter" else family
        dotted = ".".join(path)
        # A name (of a family or of its samples) belongs to the first path that
        # reaches it; another path mapping to it (e.g. "hits_total" beside
        # "hits") is left out, so no series is counted twice.
        if claims.setdefault(family, dotted) != dotted or (
            claims.setdefault(sample, dotted) != dotted
        ):
            self._warn_clash(family, dotted, claims)
            return
        fam = out.get(family)
        if fam is None:
            fam = out[family] = _Family(family, kind, dotted)
        if any(lb == labels for lb, _ in fam.samples):
            self._warn_clash(family, dotted, claims)
            return
        fam.samples.append((labels, value))

    def _warn_clash(self, family: str, dotted: str, claims: dict[str, str]) -> None:
        if family not in self._warned:
            self._warned.add(family)
            logger.warning(
                "prometheus: %s from %s clashes with %s; left out",
                family,
                dotted,
                claims.get(family),
            )


def render(snapshot_fn: Callable[[], Any] | Mapping[str, Any], **kwargs: Any) -> str:
    """The text exposition of one snapshot.

    Args:
        snapshot_fn: as for :class:`SnapshotCollector` (a plain mapping works
            too).
        **kwargs: ``prefix``, ``label_levels``, ``counters``, ``max_tenants``.

    Returns:
        Prometheus text format (version 0.0.4).
    """
    client = _client()
    fn = snapshot_fn if callable(snapshot_fn) else (lambda: snapshot_fn)
    registry = _own_registry(client, fn, kwargs)
    return str(client.generate_latest(registry).decode("utf-8"))


def register(
    snapshot_fn: Callable[[], Any], registry: Any = None, **kwargs: Any
) -> SnapshotCollector:
    """Add the collector to a registry (default: prometheus-client's global one,
    which its own ``start_http_server`` and WSGI/ASGI apps serve).

    Returns:
        The collector (``registry.unregister(collector)`` removes it).
    """
    collector = SnapshotCollector(snapshot_fn, **kwargs)
    (registry if registry is not None else _client().REGISTRY).register(collector)
    return collector


def start_http_server(
    snapshot_fn: Callable[[], Any],
    port: int,
    addr: str = "127.0.0.1",
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Serve the snapshot at ``http://addr:port/metrics`` from a daemon thread.

    Only this collector is served (its own registry). Bound to localhost by
    default: pass ``addr="0.0.0.0"`` to expose it.

    Args:
        snapshot_fn: as for :class:`SnapshotCollector`.
        port: TCP port (0 picks a free one: read ``server.server_port``).
        addr: address to bind.
        **kwargs: ``prefix``, ``label_levels``, ``counters``, ``max_tenants``.

    Returns:
        ``(server, thread)``; ``server.shutdown()`` then ``server.server_close()``
        stops it.
    """
    client = _client()
    registry = _own_registry(client, snapshot_fn, kwargs)
    server, thread = client.start_http_server(port, addr=addr, registry=registry)
    return server, thread


def _own_registry(
    client: Any, snapshot_fn: Callable[[], Any], kwargs: dict[str, Any]
) -> Any:
    """A registry that holds this collector only."""
    registry = client.CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot_fn, **kwargs))
    return registry


def _as_dict(snapshot: Any) -> Mapping[str, Any]:
    if isinstance(snapshot, Mapping):
        return snapshot
    to_dict = getattr(snapshot, "to_dict", None)
    if callable(to_dict):
        result = to_dict()
        if isinstance(result, Mapping):
            return result
    raise TypeError(
        f"the snapshot function returned {type(snapshot).__name__}; "
        "expected a mapping or an object with to_dict()"
    )


def _is_quantiles(node: Mapping[str, Any]) -> bool:
    return bool(node) and all(_QUANTILE_KEY.match(str(k)) for k in node)


def _quantile(key: str) -> str:
    """``"p99"`` -> ``"0.99"``, ``"p99.9"`` -> ``"0.999"``, ``"p50"`` -> ``"0.5"``."""
    m = _QUANTILE_KEY.match(key)
    assert m is not None
    q = (Decimal(m.group(1)) / 100).normalize()
    return format(q, "f")


def _is_sample(x: object) -> bool:
    """A value to export: an int or a float (NaN and infinities too), not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _sanitize(key: str) -> str:
    """A name part: characters outside ``[a-zA-Z0-9_]`` become ``_``."""
    return _INVALID.sub("_", key) or "_"


def _label_name(key: str) -> str:
    """A valid label name: no leading digit, no reserved ``__`` start."""
    s = _sanitize(key)
    if s.startswith("__"):
        s = s.lstrip("_") or "label"
    return f"_{s}" if s[0].isdigit() else s
