"""The exact response cache: the same request on the same weights, answered once.

A finished :class:`~llmprod.outputs.Completion` is stored as JSON under
:func:`response_key`, the SHA-256 of a canonical JSON document naming everything
that decides the output:

* the key format version (:data:`FORMAT_VERSION`);
* the model fingerprint (:func:`model_fingerprint`: config, tokenizer files,
  weights, dtype, quantization);
* the prompt **token ids** (and the chat messages, when the caller passes them);
* every :class:`~llmprod.sampling_params.SamplingParams` field except ``extra``,
  which is caller data that never changes the output.

Why token ids and not the prompt text: the model sees token ids, so two texts
that tokenize the same are the same request, and a chat rendered through a
template is keyed by exactly what the model received. A tokenizer change (new
vocabulary, new chat template, new special tokens) changes the fingerprint,
because the tokenizer files are hashed into it, so a key never outlives the
tokenizer that produced its ids.

Only deterministic requests are cached by default (greedy, or sampled with a
``seed``): for those the key fixes the answer. Unseeded sampling is meant to vary
and is skipped unless ``cache_sampled=True``. Requests that ask for ``logprobs``
or ``prompt_logprobs`` are cached too: log-probabilities are deterministic for a
deterministic request, they are part of the key, and they round-trip exactly.
Only completions that ended normally (``finish_reason`` ``"stop"`` or
``"length"``) are stored; an aborted or failed request never is.

Reads happen in the caller's thread (one ``get``, bounded by the backend's own
timeouts); writes never block: :meth:`ResponseCache.store` queues the write for
one background thread and returns. A backend that fails, times out or returns
garbage is a miss, counted in :meth:`ResponseCache.stats`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from llmprod.cache._background import BackgroundWriter
from llmprod.cache.failsafe import FailSafeCache
from llmprod.cache.protocol import CacheBackend, check_ttl
from llmprod.cache.registry import open_cache
from llmprod.cache.tiered import TieredCache
from llmprod.canonical import canonical_json
from llmprod.outputs import Completion, Timings, TokenLogprob, Usage
from llmprod.sampling_params import SamplingParams

__all__ = [
    "COMPLETION_FORMAT",
    "FORMAT_VERSION",
    "STORED_FINISH_REASONS",
    "ResponseCache",
    "as_failsafe",
    "canonical_json",
    "completion_from_bytes",
    "completion_to_bytes",
    "response_key",
    "sampling_key_fields",
]

logger = logging.getLogger("llmprod.cache")

FORMAT_VERSION = 1
"""Version of both the key document and the stored completion format. Bump it
whenever either changes; old entries then simply stop matching."""

COMPLETION_FORMAT = "llmprod.completion"
KEY_PREFIX = f"resp:v{FORMAT_VERSION}:"
STORED_FINISH_REASONS = frozenset({"stop", "length"})

# The float fields of SamplingParams, so that temperature=0 and temperature=0.0
# give the same key.
_FLOAT_FIELDS = frozenset(
    f.name
    for f in dataclasses.fields(SamplingParams)
    if f.type in ("float", float, "float | None")
)


# ---------------------------------------------------------------------- keys
def sampling_key_fields(params: SamplingParams) -> dict[str, Any]:
    """Return the sampling fields that change the output, normalised for hashing.

    That is every field of ``params.to_dict()`` (everything but ``extra``), with
    float fields as floats so that ``temperature=0`` and ``0.0`` agree.

    Args:
        params: the request's sampling parameters.

    Returns:
        Field name to a JSON-able value.
    """
    out = params.to_dict()
    out.pop("extra", None)
    for name in _FLOAT_FIELDS:
        value = out.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def response_key(
    model_fingerprint: str,
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    messages: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """Return the exact-cache key of a request.

    >>> key = response_key("fp", [1, 2, 3], SamplingParams(temperature=0))
    >>> key.startswith("resp:v1:") and len(key) == len("resp:v1:") + 64
    True

    Args:
        model_fingerprint: from :func:`model_fingerprint`; it covers the weights
            and the tokenizer, so token ids are only compared under one tokenizer.
        prompt_token_ids: the token ids the model sees (after any chat template).
        params: the sampling parameters; every field but ``extra`` is keyed.
        messages: the chat messages the ids were rendered from, when there are
            any; they are keyed as well.

    Returns:
        ``resp:v1:`` followed by the hex SHA-256 of the canonical JSON document.

    Raises:
        TypeError: a token id is not an integer, or ``messages`` is not JSON-able.
    """
    ids = []
    for t in prompt_token_ids:
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise TypeError(f"prompt token ids must be ints, got {t!r}")
        ids.append(int(t))
    doc: dict[str, Any] = {
        "format": "llmprod.response-key",
        "version": FORMAT_VERSION,
        "model": str(model_fingerprint),
        "prompt_token_ids": ids,
        "sampling": sampling_key_fields(params),
    }
    if messages is not None:
        doc["messages"] = [dict(m) for m in messages]
    return KEY_PREFIX + hashlib.sha256(canonical_json(doc)).hexdigest()


# ---------------------------------------------------------------- serialising
def completion_to_bytes(c: Completion) -> bytes:
    """Serialise a completion as JSON with a format name and version.

    Token-id keys of :attr:`TokenLogprob.top` are written as ``[id, logprob]``
    pairs so they come back as ints. Log-probabilities of ``-inf`` are kept.

    Args:
        c: the completion.

    Returns:
        UTF-8 JSON bytes.

    Raises:
        TypeError: ``c`` is not a Completion, or its ``flags`` are not JSON-able.
    """
    if not isinstance(c, Completion):
        raise TypeError(f"expected a Completion, got {type(c).__name__}")
    body: dict[str, Any] = {
        "request_id": c.request_id,
        "text": c.text,
        "token_ids": [int(t) for t in c.token_ids],
        "finish_reason": c.finish_reason,
        "prompt_token_ids": [int(t) for t in c.prompt_token_ids],
        "stop_reason": c.stop_reason,
        "usage": {
            "prompt_tokens": c.usage.prompt_tokens,
            "completion_tokens": c.usage.completion_tokens,
            "cached_prompt_tokens": c.usage.cached_prompt_tokens,
            "cost": c.usage.cost,
        },
        "timings": dataclasses.asdict(c.timings),
        "cache_hit": c.cache_hit,
        "logprobs": None
        if c.logprobs is None
        else [_logprob_to_json(lp) for lp in c.logprobs],
        "prompt_logprobs": None
        if c.prompt_logprobs is None
        else [None if lp is None else _logprob_to_json(lp) for lp in c.prompt_logprobs],
        "flags": c.flags,
    }
    doc = {"format": COMPLETION_FORMAT, "version": FORMAT_VERSION, "completion": body}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def completion_from_bytes(b: bytes) -> Completion:
    """Rebuild a completion written by :func:`completion_to_bytes`.

    The document is checked field by field; nothing is executed or unpickled.

    Args:
        b: the stored bytes.

    Returns:
        A new Completion.

    Raises:
        ValueError: the bytes are not JSON, not a completion, of another format
            version, or a field has the wrong type. Callers treat it as a miss.
    """
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise ValueError(f"expected bytes, got {type(b).__name__}")
    try:
        doc = json.loads(bytes(b).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"stored completion is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != COMPLETION_FORMAT:
        raise ValueError("stored value is not an llmprod completion")
    if doc.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"stored completion has format version {doc.get('version')!r}, "
            f"this llmprod reads version {FORMAT_VERSION}"
        )
    body = _expect(doc.get("completion"), dict, "completion")
    usage = _expect(body.get("usage"), dict, "usage")
    timings = _expect(body.get("timings"), dict, "timings")
    logprobs = body.get("logprobs")
    prompt_logprobs = body.get("prompt_logprobs")
    stop_reason = body.get("stop_reason")
    if stop_reason is not None and not _is_int(stop_reason):
        _expect(stop_reason, str, "stop_reason")
    return Completion(
        request_id=_expect(body.get("request_id"), str, "request_id"),
        text=_expect(body.get("text"), str, "text"),
        token_ids=_int_list(body.get("token_ids"), "token_ids"),
        finish_reason=_opt_str(body.get("finish_reason"), "finish_reason"),
        prompt_token_ids=_int_list(body.get("prompt_token_ids"), "prompt_token_ids"),
        stop_reason=stop_reason,
        usage=Usage(
            prompt_tokens=_int(usage.get("prompt_tokens"), "usage.prompt_tokens"),
            completion_tokens=_int(
                usage.get("completion_tokens"), "usage.completion_tokens"
            ),
            cached_prompt_tokens=_int(
                usage.get("cached_prompt_tokens"), "usage.cached_prompt_tokens"
            ),
            cost=_float(usage.get("cost"), "usage.cost"),
        ),
        timings=Timings(
            **{
                f.name: _opt_float(timings.get(f.name), f"timings.{f.name}")
                for f in dataclasses.fields(Timings)
            }
        ),
        cache_hit=_opt_str(body.get("cache_hit"), "cache_hit"),
        logprobs=None
        if logprobs is None
        else [
            _logprob_from_json(x, "logprobs")
            for x in _expect(logprobs, list, "logprobs")
        ],
        prompt_logprobs=None
        if prompt_logprobs is None
        else [
            None if x is None else _logprob_from_json(x, "prompt_logprobs")
            for x in _expect(prompt_logprobs, list, "prompt_logprobs")
        ],
        flags=_expect(body.get("flags"), dict, "flags"),
    )


def _logprob_to_json(lp: TokenLogprob) -> list[Any]:
    return [
        int(lp.token_id),
        float(lp.logprob),
        [[int(k), float(v)] for k, v in lp.top.items()],
    ]


def _logprob_from_json(x: Any, where: str) -> TokenLogprob:
    if not isinstance(x, list) or len(x) != 3:
        raise ValueError(f"{where}: each entry must be [token_id, logprob, top]")
    token_id, logprob, top = x
    pairs = _expect(top, list, f"{where}.top")
    out: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"{where}.top: each entry must be [token_id, logprob]")
        out[_int(pair[0], f"{where}.top")] = _float(pair[1], f"{where}.top")
    return TokenLogprob(
        token_id=_int(token_id, where), logprob=_float(logprob, where), top=out
    )


def _expect(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind):
        raise ValueError(f"stored completion: {where} must be {kind.__name__}")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(v: Any, where: str) -> int:
    if not _is_int(v):
        raise ValueError(f"stored completion: {where} must be an int, got {v!r}")
    return int(v)


def _int_list(v: Any, where: str) -> list[int]:
    if not isinstance(v, list) or not all(_is_int(t) for t in v):
        raise ValueError(f"stored completion: {where} must be a list of ints")
    return list(v)


def _float(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"stored completion: {where} must be a number, got {v!r}")
    return float(v)


def _opt_float(v: Any, where: str) -> float | None:
    return None if v is None else _float(v, where)


def _opt_str(v: Any, where: str) -> str | None:
    if v is not None and not isinstance(v, str):
        raise ValueError(f"stored completion: {where} must be a str or null")
    return v


def _snapshot(c: Completion) -> Completion:
    """Copy the mutable parts of a completion (cheap: list and dict copies)."""
    return dataclasses.replace(
        c,
        token_ids=list(c.token_ids),
        prompt_token_ids=list(c.prompt_token_ids),
        usage=dataclasses.replace(c.usage),
        timings=dataclasses.replace(c.timings),
        logprobs=None if c.logprobs is None else list(c.logprobs),
        prompt_logprobs=None if c.prompt_logprobs is None else list(c.prompt_logprobs),
        flags=dict(c.flags),
    )


# ---------------------------------------------------------------- backends
def as_failsafe(backend: CacheBackend | str, **options: Any) -> CacheBackend:
    """Return ``backend`` ready for a cache: fail-safe, opened if it is a URL.

    Args:
        backend: a URL for :func:`~llmprod.cache.registry.open_cache`, a bare
            backend, a :class:`FailSafeCache` or a :class:`TieredCache`.
        **options: passed to ``open_cache`` when ``backend`` is a URL.

    Returns:
        A :class:`FailSafeCache` or :class:`TieredCache` (returned as given when
        it already is one).
    """
    if isinstance(backend, str):
        return FailSafeCache(open_cache(backend, **options))
    if options:
        raise TypeError("options are only accepted with a URL")
    if isinstance(backend, (FailSafeCache, TieredCache)):
        return backend
    if not isinstance(backend, CacheBackend):
        raise TypeError(
            f"backend must be a cache URL or a CacheBackend, got {type(backend).__name__}"
        )
    return FailSafeCache(backend)


def _set_errors(backend: CacheBackend) -> int:
    return sum(s.get("set_errors", 0) for s in backend_stats(backend).values())


def get_with_label(backend: CacheBackend, key: str) -> tuple[bytes | None, str | None]:
    """Read ``key`` and name the tier that answered.

    Args:
        backend: a :class:`TieredCache`, or any other backend.
        key: the key.

    Returns:
        ``(value, label)``; ``(None, None)`` on a miss.
    """
    if isinstance(backend, TieredCache):
        return backend.get_with_tier(key)
    value = backend.get(key)
    if value is None:
        return None, None
    label = getattr(backend, "label", None)
    return value, label if isinstance(label, str) and label else backend.name


def backend_stats(backend: CacheBackend) -> dict[str, dict[str, int]]:
    """Return per-tier counters of a fail-safe backend, keyed by tier label.

    Args:
        backend: a :class:`TieredCache`, a :class:`FailSafeCache` or another backend.

    Returns:
        Tier label to counters (empty when the backend keeps none).
    """
    if isinstance(backend, TieredCache):
        return backend.stats()
    if isinstance(backend, FailSafeCache):
        return {backend.label: backend.stats()}
    return {}


# ---------------------------------------------------------------- the cache
class ResponseCache:
    """The exact response cache over any backend.

    >>> from llmprod.outputs import Completion
    >>> cache = ResponseCache("memory://", "fp")
    >>> params = SamplingParams(temperature=0, max_tokens=4)
    >>> cache.store([1, 2], params, Completion("r1", "hi", [5], "stop", [1, 2]))
    True
    >>> cache.flush(5.0)
    True
    >>> completion, tier = cache.lookup([1, 2], params)
    >>> completion.text, tier, completion.cache_hit
    ('hi', 'memory', 'memory')
    >>> cache.close()

    Args:
        backend: a cache URL (opened with ``open_cache`` and wrapped in
            :class:`FailSafeCache`), a bare backend (wrapped), or a
            :class:`FailSafeCache` / :class:`TieredCache` (used as given).
        model_fingerprint: from :func:`model_fingerprint`.
        ttl: lifetime of stored answers in seconds (``None``: until evicted).
        cache_sampled: also cache unseeded sampled requests (the same prompt
            then always gets the first sampled answer).
        max_pending_writes: the most writes waiting for the writer thread; more
            are dropped and counted in ``dropped_writes``.
        close_backend: close the backend in :meth:`close` (default: yes).
        backend_options: options for ``open_cache`` when ``backend`` is a URL
            (e.g. ``{"namespace": "llmprod:"}`` for Redis).
    """

    def __init__(
        self,
        backend: CacheBackend | str,
        model_fingerprint: str,
        *,
        ttl: float | None = None,
        cache_sampled: bool = False,
        max_pending_writes: int = 256,
        close_backend: bool = True,
        backend_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model_fingerprint, str) or not model_fingerprint:
            raise ValueError("model_fingerprint must be a non-empty str")
        self.backend = as_failsafe(backend, **(backend_options or {}))
        self.model_fingerprint = model_fingerprint
        self.ttl = check_ttl(ttl)
        self.cache_sampled = cache_sampled
        self.close_backend = close_backend
        self._writer = BackgroundWriter("llmprod-response-cache", max_pending_writes)
        self._lock = threading.Lock()
        self._hits: dict[str, int] = {}
        self._misses = 0
        self._decode_errors = 0
        self._write_errors = 0
        self._writes = 0
        self._failed_writes = 0
        self._skipped = 0
        self._closed = False

    # -------------------------------------------------------------- policy
    def is_cacheable(self, params: SamplingParams) -> bool:
        """Whether requests with ``params`` are looked up and stored.

        Args:
            params: the sampling parameters.

        Returns:
            True for deterministic requests (greedy, or seeded), and for every
            request when ``cache_sampled`` is set.
        """
        return self.cache_sampled or params.is_deterministic

    def key(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Return this cache's key for a request (see :func:`response_key`)."""
        return response_key(self.model_fingerprint, prompt_ids, params, messages)

    # -------------------------------------------------------------- reads
    def lookup(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[Completion, str] | None:
        """Return the cached answer to a request, or ``None``.

        Runs in the caller's thread: one read per tier at most, bounded by the
        backends' timeouts. Never raises for a backend failure or a bad entry;
        both are a miss, and a bad entry is deleted.

        Args:
            prompt_ids: the token ids the model would see.
            params: the sampling parameters.
            messages: the chat messages, when the ids were rendered from them.

        Returns:
            ``(completion, tier)`` on a hit, where ``tier`` names the backend or
            tier that answered (``"memory"``, ``"redis"``, ``"diskcache"``...).
            The completion is a new object with ``cache_hit`` set to the tier,
            ``usage.cost`` 0 and empty ``timings``; its token counts are those of
            the original run (the tokens saved). The caller sets ``request_id``
            and the timings. ``None`` on a miss, for uncacheable params, and
            after :meth:`close`.
        """
        if self._closed or not self.is_cacheable(params):
            return None
        key = self.key(prompt_ids, params, messages)
        try:
            blob, tier = get_with_label(self.backend, key)
        except Exception as exc:  # a fail-safe backend should not raise; be sure
            logger.warning("response cache lookup failed: %r", exc)
            self._count_miss(error=True)
            return None
        if blob is None:
            self._count_miss()
            return None
        try:
            completion = completion_from_bytes(blob)
            stored_ids = completion.prompt_token_ids
            if stored_ids and stored_ids != [int(t) for t in prompt_ids]:
                raise ValueError("stored completion answers another prompt")
        except ValueError as exc:
            logger.warning("dropping a bad response-cache entry %s: %s", key, exc)
            self._delete(key)
            self._count_miss(error=True)
            return None
        label = tier or "cache"
        completion.cache_hit = label
        completion.usage.cost = 0.0
        completion.timings = Timings()
        with self._lock:
            self._hits[label] = self._hits.get(label, 0) + 1
        return completion, label

    # -------------------------------------------------------------- writes
    def store(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        completion: Completion,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> bool:
        """Queue a finished completion for storing; never blocks.

        The key is computed and the completion copied in the caller's thread;
        serialising and writing happen in the writer thread. Completions that
        did not finish with ``"stop"`` or ``"length"``, answers that came from a
        cache, and uncacheable params are skipped.

        Args:
            prompt_ids: the token ids the model saw.
            params: the sampling parameters.
            completion: the finished completion.
            messages: the chat messages, when the ids were rendered from them.

        Returns:
            Whether the write was queued (``False``: skipped, dropped because
            the queue is full, or the cache is closed).
        """
        if (
            self._closed
            or not self.is_cacheable(params)
            or completion.finish_reason not in STORED_FINISH_REASONS
            or completion.cache_hit is not None
        ):
            with self._lock:
                self._skipped += 1
            return False
        key = self.key(prompt_ids, params, messages)
        snap = _snapshot(completion)
        return self._writer.submit(lambda: self._write(key, snap))

    def _write(self, key: str, completion: Completion) -> None:
        try:
            blob = completion_to_bytes(completion)
        except (TypeError, ValueError) as exc:
            logger.warning("response cache: cannot serialise a completion: %s", exc)
            with self._lock:
                self._write_errors += 1
            return
        before = _set_errors(self.backend)
        try:
            self.backend.set(key, blob, self.ttl)
        except Exception as exc:  # fail-safe backends swallow; be sure
            logger.warning("response cache write failed: %r", exc)
            with self._lock:
                self._write_errors += 1
            return
        # The fail-safe backend swallowed any failure and counted it; a write
        # that failed on some tier is not counted as written.
        failed = _set_errors(self.backend) > before
        with self._lock:
            if failed:
                self._failed_writes += 1
            else:
                self._writes += 1

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes have been handed to the backend.

        Args:
            timeout: the most seconds to wait (``None``: no limit).

        Returns:
            Whether every queued write finished in time.
        """
        return self._writer.flush(timeout)

    def close(self, timeout: float | None = 5.0) -> None:
        """Flush pending writes (up to ``timeout`` s), stop the writer, close the backend.

        Writes still pending after ``timeout`` are dropped and counted. Calling
        it again does nothing.

        Args:
            timeout: the most seconds to wait for pending writes.
        """
        if self._closed:
            return
        self._closed = True
        self._writer.close(timeout)
        if self.close_backend:
            try:
                self.backend.close()
            except Exception as exc:
                logger.warning("response cache: closing the backend failed: %r", exc)

    # -------------------------------------------------------------- metrics
    def stats(self) -> dict[str, Any]:
        """Return the counters.

        Returns:
            ``hits`` (tier label to count), ``hits_total``, ``misses`` (lookups
            that found nothing usable, failures included), ``errors`` (bad
            entries, writes that could not be serialised, plus the backend's
            read and write failures, every tier), ``writes`` (answers stored on
            every tier), ``failed_writes`` (answers the backend failed to store
            on at least one tier; told apart from ``writes`` by the backend's
            ``set_errors`` counter, so approximate when other writers share the
            backend object), ``dropped_writes`` (queue full, or still queued at
            :meth:`close`), ``pending_writes``, ``skipped`` (store calls for
            uncacheable, unfinished or cached answers), and ``backend``: the
            backend's per-tier counters.
        """
        tiers = backend_stats(self.backend)
        backend_errors = sum(
            s.get("errors", 0) + s.get("set_errors", 0) for s in tiers.values()
        )
        with self._lock:
            hits = dict(self._hits)
            return {
                "hits": hits,
                "hits_total": sum(hits.values()),
                "misses": self._misses,
                "errors": self._decode_errors + self._write_errors + backend_errors,
                "writes": self._writes,
                "failed_writes": self._failed_writes,
                "dropped_writes": self._writer.dropped,
                "pending_writes": self._writer.pending,
                "skipped": self._skipped,
                "backend": tiers,
            }

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count_miss(self, *, error: bool = False) -> None:
        with self._lock:
            self._misses += 1
            if error:
                self._decode_errors += 1

    def _delete(self, key: str) -> None:
        try:
            self.backend.delete(key)
        except Exception as exc:
            logger.warning("response cache: deleting a bad entry failed: %r", exc)
