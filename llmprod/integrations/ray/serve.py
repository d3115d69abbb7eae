"""Online serving on Ray Serve: one Engine per replica, OpenAI-compatible HTTP.

>>> from ray import serve  # doctest: +SKIP
>>> from llmprod.integrations.ray import build_app
>>> app = build_app({"model": "smollm2-135m",  # doctest: +SKIP
...                  "engine": {"cache": "redis://127.0.0.1:6379/0"},
...                  "deployment": {"num_replicas": 2,
...                                 "ray_actor_options": {"num_cpus": 1}}})
>>> serve.run(app, route_prefix="/")  # doctest: +SKIP

- :data:`LLMDeployment` (the class :class:`LLMServer`): one Engine per
  replica; it serves the OpenAI routes of
  :func:`~llmprod.integrations.ray.app.build_fastapi_app` and answers
  other deployments through its handle methods (:meth:`LLMServer.generate_batch`,
  :meth:`LLMServer.stream_deltas`).
- :data:`RouterDeployment` (:class:`RouterServer`): the multi-model app's
  entry. It holds an :class:`llmprod.Router` whose "engines" are the model
  deployments' handles (:class:`RemoteEngine`), so llmprod's routing policies
  (:class:`~llmprod.router.ComplexityPolicy` by default, or
  :class:`~llmprod.router.CascadePolicy`) and ``Router.stats()`` work across
  deployments as they do across engines in one process.
- :func:`build_app` and :func:`build_router_app`: app builders from one config
  dict (usable with ``serve run module:build_app``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from ray import serve
from ray.serve.handle import DeploymentHandle

from llmprod.integrations.ray.app import build_fastapi_app
from llmprod.integrations.ray.config import engine_kwargs, threads_for
from llmprod.integrations.ray.openai_api import (
    Answer,
    OpenAIRequest,
    decode_error,
    encode_error,
)
from llmprod.outputs import Completion, Delta
from llmprod.sampling_params import SamplingParams

__all__ = [
    "DEFAULT_MODEL",
    "LLMDeployment",
    "LLMServer",
    "ModelDeployment",
    "RemoteEngine",
    "RouterDeployment",
    "RouterServer",
    "ServedDelta",
    "build_app",
    "build_router_app",
]

DEFAULT_MODEL = "smollm2-135m"

# Replicas batch requests continuously: let many in at once (Ray Serve's own
# default, 5, would queue requests that the engine could run in the same step).
DEFAULT_MAX_ONGOING_REQUESTS = 64

ROUTER_LABEL_LEVELS = {"router.routes": "route"}
"""Label of the router's per-deployment counters in ``/metrics``."""
ROUTER_COUNTERS = (
    "router.requests",
    "router.escalations",
    "router.cost",
    "router.routes.*.requests",
    "router.routes.*.calls",
    "router.routes.*.escalated",
    "router.routes.*.prompt_tokens",
    "router.routes.*.completion_tokens",
    "router.routes.*.cost",
)
"""Router paths exported as counters (the rest are gauges)."""


REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"
"""A replica's actor name is this prefix and its :func:`replica_name`."""


def replica_name() -> str:
    """The full id of the Serve replica running this code (``app#deployment#id``);
    its actor is named ``"SERVE_REPLICA::" + replica_name()`` in the ``serve``
    namespace."""
    ctx = serve.get_replica_context()
    rid = getattr(ctx, "replica_id", None)
    if rid is not None and hasattr(rid, "to_full_id_str"):
        name = str(rid.to_full_id_str())
    else:
        name = str(getattr(ctx, "replica_tag", rid))
    return name.removeprefix(REPLICA_ACTOR_PREFIX)


def _backend() -> Any:
    """The deployment object of the replica handling the current request."""
    return serve.get_replica_context().servable_object


def _prometheus(snapshot: Any, **collector: Any) -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
    from prometheus_client.exposition import generate_latest

    from llmprod.ops.prometheus import SnapshotCollector

    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snapshot, **collector))
    return generate_latest(registry), CONTENT_TYPE_LATEST


# ------------------------------------------------------------------ one model
class LLMServer:
    """A Serve deployment body holding one Engine (see :data:`LLMDeployment`).

    Args:
        config: ``model`` (name or path, default ``"smollm2-135m"``), ``name``
            (served model name, default the model), ``engine`` (Engine options
            as one dict, ``llmprod.integrations.ray.config``).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        from llmprod import Engine

        self.model = str(config.get("model") or DEFAULT_MODEL)
        self.name = str(config.get("name") or self.model)
        self.replica = replica_name()
        kwargs = engine_kwargs(config.get("engine"))
        kwargs.setdefault("num_threads", 1)
        self.engine = Engine.from_pretrained(self.model, **kwargs)

    # ------------------------------------------------------------- HTTP backend
    def model_names(self) -> list[str]:
        return [self.name]

    def identity(self) -> tuple[str, str]:
        return self.replica, self.name

    async def complete(self, req: OpenAIRequest) -> list[Answer]:
        batch: list[Any] = [req.messages] if req.kind == "chat" else list(req.prompts)
        outs = await self.engine.agenerate(batch, req.params, tenant=req.tenant)
        return [Answer(c, self.replica, self.name) for c in outs]

    async def stream(self, req: OpenAIRequest) -> AsyncIterator[tuple[Delta, str, str]]:
        prompt: Any = req.messages if req.kind == "chat" else req.prompts[0]
        async for d in self.engine.astream(prompt, req.params, tenant=req.tenant):
            yield d, self.replica, self.name

    def metrics_text(self) -> tuple[bytes, str]:
        def snapshot() -> dict[str, Any]:
            snap = self.engine.metrics().to_dict()
            snap["serve"] = {"replica": self.replica, "model": self.name}
            return snap

        return _prometheus(snapshot)

    # ------------------------------------------------------------- handle API
    def _stamp(self, c: Completion) -> Completion:
        c.flags["served_by"] = {"replica": self.replica, "model": self.name}
        return c

    async def generate_batch(
        self,
        prompts: Sequence[Any],
        params: SamplingParams | Sequence[SamplingParams] | None,
        tenant: str = "default",
        wait_timeout: float | None = None,
        adapter: Any = None,
    ) -> list[dict[str, Any]]:
        """``Engine.agenerate`` with ``return_exceptions=True`` for another
        deployment: ``{"completion": ...}`` or ``{"error": encode_error(...)}``
        per prompt (llmprod's errors do not survive pickling whole)."""
        try:
            outs: list[Any] = await self.engine.agenerate(
                list(prompts),
                params,
                tenant=tenant,
                return_exceptions=True,
                wait_timeout=wait_timeout,
                adapter=adapter,
            )
        except Exception as e:
            outs = [e] * len(prompts)
        return [
            {"error": encode_error(o)}
            if isinstance(o, BaseException)
            else {"completion": self._stamp(o)}
            for o in outs
        ]

    async def stream_deltas(
        self,
        prompt: Any,
        params: SamplingParams | None,
        tenant: str = "default",
        wait_timeout: float | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """``Engine.astream`` for another deployment (call it through
        ``handle.options(stream=True)``): ``{"delta", "replica", "model"}``
        items, or one ``{"error": ...}`` item last."""
        try:
            async for d in self.engine.astream(
                prompt,
                params,
                tenant=tenant,
                wait_timeout=wait_timeout,
                adapter=adapter,
            ):
                if d.completion is not None:
                    self._stamp(d.completion)
                yield {"delta": d, "replica": self.replica, "model": self.name}
        except Exception as e:
            yield {"error": encode_error(e)}

    def get_tokenizer(self) -> Any:
        """The engine's tokenizer (the router counts prompt tokens with it)."""
        return self.engine.tokenizer

    def check_health(self) -> None:
        """Serve's health check: a closed engine restarts the replica."""
        if self.engine.is_closed:
            raise RuntimeError(f"the engine of {self.replica} is closed")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


LLMDeployment: Any = serve.deployment(
    serve.ingress(build_fastapi_app(_backend, "llmprod"))(LLMServer)
)
"""The Serve deployment of :class:`LLMServer` with the OpenAI routes
(``.options(...)``, ``.bind(config)``)."""

ModelDeployment: Any = serve.deployment(LLMServer)
""":class:`LLMServer` without HTTP routes: a model behind the router, reached
through its handle (a Serve application has one HTTP ingress)."""


# ------------------------------------------------------------------ routing
@dataclass(slots=True)
class ServedDelta(Delta):
    """A stream piece from a model deployment, with who produced it."""

    replica: str = ""
    model: str = ""


class RemoteEngine:
    """A model deployment's handle with the Engine methods a Router calls.

    Only the async methods are offered (a Serve replica's event loop must not
    block); a conversation is sent as it is and rendered by the deployment's
    own engine.
    """

    def __init__(self, name: str, handle: DeploymentHandle) -> None:
        self.name = name
        self.handle = handle
        self.tokenizer: Any = None
        """Set from the deployment before the first request."""

    async def agenerate(
        self,
        prompts: Sequence[Any],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tenant: str = "default",
        return_exceptions: bool = False,
        wait_timeout: float | None = None,
        adapter: Any = None,
    ) -> list[Any]:
        items = await self.handle.generate_batch.remote(
            list(prompts), params, tenant, wait_timeout, adapter
        )
        outs: list[Any] = [
            decode_error(it["error"]) if "error" in it else it["completion"]
            for it in items
        ]
        if not return_exceptions:
            for o in outs:
                if isinstance(o, BaseException):
                    raise o
        return outs

    async def astream(
        self,
        prompt: Any,
        params: SamplingParams | None = None,
        *,
        tenant: str = "default",
        wait_timeout: float | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[Delta]:
        gen: Any = self.handle.options(stream=True).stream_deltas.remote(
            prompt, params, tenant, wait_timeout, adapter
        )
        async for it in gen:
            if "error" in it:
                raise decode_error(it["error"])
            d: Delta = it["delta"]
            yield ServedDelta(
                d.request_id,
                d.text,
                d.token_ids,
                d.finish_reason,
                d.completion,
                replica=it["replica"],
                model=it["model"],
            )

    def render_chat(self, messages: Sequence[Any]) -> list[Any]:
        """The conversation itself: the deployment's engine renders it."""
        return list(messages)


def _policy(spec: Any) -> Any:
    from llmprod.errors import InvalidConfigError
    from llmprod.router import CascadePolicy, ComplexityPolicy, RoutingPolicy

    if spec is None:
        return ComplexityPolicy()
    if isinstance(spec, RoutingPolicy):
        return spec
    if isinstance(spec, Mapping):
        options = dict(spec)
        kind = options.pop("type", "complexity")
        if kind == "complexity":
            return ComplexityPolicy(**options)
        if kind == "cascade":
            return CascadePolicy(**options)
    raise InvalidConfigError(
        f"policy={spec!r}: give a RoutingPolicy or {{'type': 'complexity' | "
        "'cascade', ...options}}",
        "policy",
    )


def _prices(prices: Mapping[str, Any] | None) -> dict[str, Any]:
    from llmprod.ops.pricing import PriceTable

    return {
        name: PriceTable(**p) if isinstance(p, Mapping) else p
        for name, p in (prices or {}).items()
    }


class RouterServer:
    """The multi-model app's entry (see :data:`RouterDeployment`).

    Args:
        models: deployment name -> handle, cheapest first.
        config: ``name`` (the served model name, default ``"router"``),
            ``policy`` (a RoutingPolicy or ``{"type": "complexity" |
            "cascade", ...}``), ``prices`` (name -> price, as
            :class:`llmprod.Router` takes them; plain dicts become PriceTables).
    """

    def __init__(
        self, models: Mapping[str, DeploymentHandle], config: Mapping[str, Any]
    ) -> None:
        from llmprod.router import Router

        self.name = str(config.get("name") or "router")
        self.replica = replica_name()
        self.proxies = {n: RemoteEngine(n, h) for n, h in models.items()}
        self.router = Router(
            cast(Mapping[str, Any], self.proxies),
            _policy(config.get("policy")),
            prices=_prices(config.get("prices")),
        )
        self._lock = asyncio.Lock()

    async def _ready(self) -> None:
        first = self.proxies[self.router.order[0]]
        if first.tokenizer is None:
            async with self._lock:
                if first.tokenizer is None:
                    first.tokenizer = await first.handle.get_tokenizer.remote()

    def model_names(self) -> list[str]:
        return [self.name]

    def identity(self) -> tuple[str, str]:
        return self.replica, self.name

    @staticmethod
    def _answer(c: Completion) -> Answer:
        served = c.flags.get("served_by") or {}
        route = (c.flags.get("route") or {}).get("engine", "")
        return Answer(
            c, str(served.get("replica", "")), str(served.get("model", route))
        )

    async def complete(self, req: OpenAIRequest) -> list[Answer]:
        await self._ready()
        if req.kind == "chat":
            final: Completion | None = None
            async for d in self.router.astream(
                req.messages, req.params, tenant=req.tenant
            ):
                final = d.completion if d.finish_reason is not None else final
            assert final is not None  # a stream ends with its completion
            return [self._answer(final)]
        outs = await self.router.agenerate(req.prompts, req.params, tenant=req.tenant)
        return [self._answer(c) for c in outs]

    async def stream(self, req: OpenAIRequest) -> AsyncIterator[tuple[Delta, str, str]]:
        await self._ready()
        prompt: Any = req.messages if req.kind == "chat" else req.prompts[0]
        async for d in self.router.astream(prompt, req.params, tenant=req.tenant):
            if isinstance(d, ServedDelta):
                yield d, d.replica, d.model
            else:  # a kept cascade answer, whole
                a = self._answer(cast(Completion, d.completion))
                yield d, a.replica, a.model

    def stats(self) -> dict[str, Any]:
        """``Router.stats()`` of this replica."""
        return self.router.stats()

    def metrics_text(self) -> tuple[bytes, str]:
        from llmprod.ops.prometheus import DEFAULT_COUNTERS, DEFAULT_LABEL_LEVELS

        def snapshot() -> dict[str, Any]:
            return {
                "router": self.router.stats(),
                "serve": {"replica": self.replica, "model": self.name},
            }

        return _prometheus(
            snapshot,
            label_levels={**DEFAULT_LABEL_LEVELS, **ROUTER_LABEL_LEVELS},
            counters=(*DEFAULT_COUNTERS, *ROUTER_COUNTERS),
        )


RouterDeployment: Any = serve.deployment(
    serve.ingress(build_fastapi_app(_backend, "llmprod router"))(RouterServer)
)
"""The Serve deployment of :class:`RouterServer`."""


# ------------------------------------------------------------------ builders
def _deployment_options(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    options = dict(config.get("deployment") or {})
    options.setdefault("name", name)
    options.setdefault("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)
    return options


def _model_config(config: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """The config an LLMServer gets: its engine's threads follow its CPU share."""
    out = {k: v for k, v in config.items() if k != "deployment"}
    if name is not None:
        out.setdefault("name", name)
    cpus = dict(dict(config.get("deployment") or {}).get("ray_actor_options") or {})
    engine = dict(config.get("engine") or {})
    engine.setdefault("num_threads", threads_for(cpus.get("num_cpus", 1)))
    out["engine"] = engine
    return out


def build_app(config: Mapping[str, Any] | None = None) -> Any:
    """One model behind the OpenAI routes: a Serve application.

    Args:
        config: one dict:

            - ``model``: name or path (default ``"smollm2-135m"``); ``name``:
              the served model name (default the model).
            - ``engine``: Engine options (limits, caches, guards, prices,
              ...), as in ``llmprod.integrations.ray.config``; ``num_threads``
              defaults to the replica's whole CPUs (at least 1).
            - ``deployment``: Serve deployment options, passed through
              (``num_replicas``, ``autoscaling_config``, ``ray_actor_options``
              such as ``{"num_cpus": 0.5}``, ``max_ongoing_requests``, ...).

    Returns:
        The bound application, for ``serve.run``.
    """
    cfg = dict(config or {})
    name = str(cfg.get("name") or cfg.get("model") or DEFAULT_MODEL)
    return LLMDeployment.options(**_deployment_options(cfg, "LLMServer")).bind(
        _model_config(cfg, name)
    )


def build_router_app(config: Mapping[str, Any]) -> Any:
    """Several model deployments and a router deployment in front of them.

    Args:
        config: one dict:

            - ``models``: deployment name -> the config of :func:`build_app`
              for that model, cheapest first (e.g. ``{"small": {...},
              "large": {...}}``).
            - ``policy``: a RoutingPolicy, or ``{"type": "complexity" |
              "cascade", ...options}`` (default ``ComplexityPolicy()``).
            - ``prices``: name -> price for the Router (default: each model's
              ``engine.prices``); ``name``: the served name (``"router"``);
              ``deployment``: the router deployment's Serve options.

    Returns:
        The bound application (the router is its ingress).
    """
    models = dict(config.get("models") or {})
    if not models:
        from llmprod.errors import InvalidConfigError

        raise InvalidConfigError("models must name at least one model", "models")
    handles = {
        name: ModelDeployment.options(**_deployment_options(m, name)).bind(
            _model_config(m, name)
        )
        for name, m in models.items()
    }
    prices = dict(config.get("prices") or {})
    for name, m in models.items():
        p = dict(m.get("engine") or {}).get("prices")
        if name not in prices and p is not None:
            prices[name] = p
    router_cfg = {
        "name": config.get("name") or "router",
        "policy": config.get("policy"),
        "prices": prices,
    }
    options = dict(config.get("deployment") or {})
    options.setdefault("name", "Router")
    options.setdefault("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)
    return RouterDeployment.options(**options).bind(handles, router_cfg)
