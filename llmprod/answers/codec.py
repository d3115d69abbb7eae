"""The stored form of a finished :class:`~llmprod.outputs.Completion`.

A completion is stored as versioned JSON (:func:`completion_to_bytes`) and read
back field by field (:func:`completion_from_bytes`): nothing is executed or
unpickled, and bytes of another format or version are refused, so a cache treats
them as a miss. Only completions that ended normally are stored
(:data:`STORED_FINISH_REASONS`), and a cache copies one (:func:`snapshot`) before
queueing its write, so the caller may go on changing the original.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from llmprod.answers.keys import FORMAT_VERSION
from llmprod.outputs import Completion, Timings, TokenLogprob, Usage

__all__ = [
    "COMPLETION_FORMAT",
    "STORED_FINISH_REASONS",
    "completion_from_bytes",
    "completion_to_bytes",
    "is_storable",
    "snapshot",
]

COMPLETION_FORMAT = "llmprod.completion"
"""The ``format`` name in every stored completion (its version is
:data:`~llmprod.answers.keys.FORMAT_VERSION`)."""

STORED_FINISH_REASONS = frozenset({"stop", "length"})
"""Finish reasons of the completions that are stored; an aborted or failed
request never is."""


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


def is_storable(c: Completion) -> bool:
    """Whether a cache stores ``c``: it ended normally and did not come from a cache.

    Args:
        c: the finished completion.

    Returns:
        True when ``finish_reason`` is in :data:`STORED_FINISH_REASONS` and
        ``cache_hit`` is unset.
    """
    return c.finish_reason in STORED_FINISH_REASONS and c.cache_hit is None


def snapshot(c: Completion) -> Completion:
    """Copy the mutable parts of a completion (cheap: list and dict copies).

    Args:
        c: the completion.

    Returns:
        A new Completion whose lists and dicts are copies of those of ``c``.
    """
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


def _logprob_to_json(lp: TokenLogprob) -> list[Any]:
    out = [
        int(lp.token_id),
        float(lp.logprob),
        [[int(k), float(v)] for k, v in lp.top.items()],
    ]
    if lp.scored:  # written only when asked for: entries of before stay 3 long
        out.append([[int(k), float(v)] for k, v in lp.scored.items()])
    return out


def _pairs_from_json(value: Any, where: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for pair in _expect(value, list, where):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"{where}: each entry must be [token_id, logprob]")
        out[_int(pair[0], where)] = _float(pair[1], where)
    return out


def _logprob_from_json(x: Any, where: str) -> TokenLogprob:
    if not isinstance(x, list) or len(x) not in (3, 4):
        raise ValueError(
            f"{where}: each entry must be [token_id, logprob, top(, scored)]"
        )
    token_id, logprob, top = x[:3]
    return TokenLogprob(
        token_id=_int(token_id, where),
        logprob=_float(logprob, where),
        top=_pairs_from_json(top, f"{where}.top"),
        scored=_pairs_from_json(x[3], f"{where}.scored") if len(x) == 4 else {},
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
