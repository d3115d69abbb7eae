"""The Engine's view of the response caches: exact first, then semantic.

One object the Engine asks before submitting a request and tells after one
finishes, so the step loop never sees a backend. Answers are the asking tenant's
own unless the engine opts into a shared scope (``cache_scope="shared"``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from llmprod.answers.exact import ResponseCache
from llmprod.answers.keys import scope_key
from llmprod.cache.failsafe import backend_target
from llmprod.config import DEFAULT_SEMANTIC_THRESHOLD
from llmprod.models.fingerprint import model_fingerprint
from llmprod.outputs import Completion, Timings
from llmprod.sched.request import Request

logger = logging.getLogger("llmprod")


def conversation_text(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """Split a conversation into (last user message, everything else as context).

    The semantic cache embeds the question alone; the system prompt and earlier
    turns must match exactly, so they form the context.
    """
    last = max(
        (i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1
    )
    text = str(messages[last]["content"]) if last >= 0 else ""
    rest = [m for i, m in enumerate(messages) if i != last]
    return text, json.dumps(rest, sort_keys=True, separators=(",", ":"))


class AnswerCaches:
    """Exact and (optional) semantic response caches for one engine.

    Args:
        cache: a cache URL, a backend or a TieredCache for exact answers (None:
            no exact cache).
        semantic_cache: the same for the semantic cache (None: off).
        model_path, dtype, quantization: what the fingerprint covers.
        semantic_threshold: cosine similarity of a semantic hit.
        ttl: lifetime of stored answers in seconds.
        cache_scope: ``"tenant"`` (default): the tenant (``Request.tenant``) is
            part of every key and semantic group, so a tenant only ever gets its
            own answers back. ``"shared"``: every tenant's answers serve every
            tenant, under the keys used before scopes existed (more hits, but one
            tenant can learn what another asked and gets its answers).

    Raises:
        InvalidConfigError: ``cache_scope`` is neither of the two.
    """

    def __init__(
        self,
        cache: Any,
        semantic_cache: Any,
        model_path: Any,
        dtype: str,
        quantization: str | None,
        semantic_threshold: float | None = None,
        ttl: float | None = None,
        *,
        cache_scope: str = "tenant",
    ) -> None:
        scope_key(cache_scope, "")  # reject an unknown scope before opening anything
        self.cache_scope = cache_scope
        self.fingerprint = model_fingerprint(model_path, dtype, quantization)
        self.exact: ResponseCache | None = None
        self.semantic: Any = None
        if cache is not None:
            self.exact = ResponseCache(cache, self.fingerprint, ttl=ttl)
            _warn_if_down(self.exact.backend, "response cache")
        if semantic_cache is not None:
            from llmprod.answers.embeddings import Embedder
            from llmprod.answers.semantic import SemanticCache

            self.semantic = SemanticCache(
                semantic_cache,
                Embedder(),
                self.fingerprint,
                threshold=(
                    DEFAULT_SEMANTIC_THRESHOLD
                    if semantic_threshold is None
                    else semantic_threshold
                ),
                ttl=ttl,
            )

    def lookup(self, req: Request) -> Completion | None:
        """A stored answer to this request (request id, timings and usage set for
        it), or None. Runs in the caller's thread; a failing backend is a miss."""
        t0 = time.monotonic()
        found: Completion | None = None
        tier = None
        scope = self.scope_of(req)
        if self.exact is not None and self.exact.is_cacheable(req.params):
            hit = self.exact.lookup(req.prompt_token_ids, req.params, scope=scope)
            if hit is not None:
                found, tier = hit
        semantic = self.semantic
        if (
            found is None
            and semantic is not None
            and req.text
            and semantic.is_cacheable(req.params)
        ):
            near = semantic.lookup(
                req.text, req.params, context=req.context, scope=scope
            )
            if near is not None:
                found, tier = near[0], "semantic"
        if found is None:
            return None
        elapsed = time.monotonic() - t0
        found.request_id = req.request_id
        found.cache_hit = tier
        found.prompt_token_ids = list(req.prompt_token_ids)
        u = found.usage
        u.prompt_tokens = req.num_prompt_tokens
        u.completion_tokens = len(found.token_ids)
        u.cached_prompt_tokens = req.num_prompt_tokens
        u.cost = 0.0
        found.timings = Timings(queued_s=0.0, ttft_s=elapsed, e2e_s=elapsed)
        found.flags["cache"] = {
            "tier": tier,
            "saved_prompt_tokens": u.prompt_tokens,
            "saved_completion_tokens": u.completion_tokens,
        }
        return found

    def store(self, req: Request, completion: Completion) -> None:
        """Queue a finished answer for the caches (never blocks)."""
        scope = self.scope_of(req)
        if self.exact is not None:
            self.exact.store(req.prompt_token_ids, req.params, completion, scope=scope)
        if self.semantic is not None and req.text:
            self.semantic.add(
                req.text, req.params, completion, context=req.context, scope=scope
            )

    def scope_of(self, req: Request) -> str | None:
        """The scope ``req``'s answers are looked up and stored under:
        ``"tenant:<tenant>"``, or ``None`` when the caches are shared; a LoRA
        request's adds its adapter's content hash (``"|adapter:<sha256>"``)."""
        scope = scope_key(self.cache_scope, req.tenant)
        if req.adapter_hash is None:
            return scope
        adapter = f"adapter:{req.adapter_hash}"
        return adapter if scope is None else f"{scope}|{adapter}"

    def stats(self) -> dict[str, Any]:
        """Each cache's counters: ``response`` and ``semantic``, for those that are on."""
        out: dict[str, Any] = {}
        if self.exact is not None:
            out["response"] = self.exact.stats()
        if self.semantic is not None:
            out["semantic"] = self.semantic.stats()
        return out

    def close(self) -> None:
        """Flush queued writes and close both caches."""
        if self.exact is not None:
            self.exact.close()
        if self.semantic is not None:
            self.semantic.close()


def _warn_if_down(backend: Any, what: str) -> None:
    ping = getattr(backend, "ping", None)
    if ping is None:
        return
    state = ping()
    down = [k for k, up in state.items() if not up] if isinstance(state, dict) else []
    if state is False or down:
        logger.warning(
            "%s backend %s is down at start; serving without it until it answers",
            what,
            ", ".join(down) or backend_target(backend),
        )
