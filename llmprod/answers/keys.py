"""Cache keys: what decides an answer, hashed.

:func:`response_key`, the exact cache's key, is the SHA-256 of a canonical JSON
document naming everything that decides the output:

* the key format version (:data:`FORMAT_VERSION`);
* the model fingerprint (:func:`~llmprod.models.fingerprint.model_fingerprint`:
  config, tokenizer files, weights, dtype, quantization);
* the prompt **token ids** (and the chat messages, when the caller passes them);
* every :class:`~llmprod.sampling_params.SamplingParams` field except ``extra``,
  which is caller data that never changes the output;
* the cache scope, when there is one (e.g. ``"tenant:acme"``): entries of one
  scope never answer another. Without a scope the document is exactly the one
  keyed before scopes existed, so shared caches keep their entries.

Why token ids and not the prompt text: the model sees token ids, so two texts
that tokenize the same are the same request, and a chat rendered through a
template is keyed by exactly what the model received. A tokenizer change (new
vocabulary, new chat template, new special tokens) changes the fingerprint,
because the tokenizer files are hashed into it, so a key never outlives the
tokenizer that produced its ids.

The semantic cache matches prompt texts only within a group
(:func:`semantic_group`: the same sampling fields, the same context and the same
scope) and files
each answer under :func:`semantic_entry_id` of its group and text, below the
:func:`index_prefix` of its model and embedder.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from llmprod.canonical import canonical_json
from llmprod.config import CACHE_SCOPES
from llmprod.errors import InvalidConfigError
from llmprod.sampling_params import SamplingParams

__all__ = [
    "CACHE_SCOPES",
    "FORMAT_VERSION",
    "INDEX_VERSION",
    "KEY_PREFIX",
    "index_prefix",
    "response_key",
    "sampling_key_fields",
    "scope_key",
    "semantic_entry_id",
    "semantic_group",
]

FORMAT_VERSION = 1
"""Version of both the key document and the stored completion format. Bump it
whenever either changes; old entries then simply stop matching."""

KEY_PREFIX = f"resp:v{FORMAT_VERSION}:"
"""What every exact-cache key starts with."""

INDEX_VERSION = 1
"""Version of the semantic cache's persisted index (its key layout, manifest and
chunk documents)."""

# The float fields of SamplingParams, so that temperature=0 and temperature=0.0
# give the same key.
_FLOAT_FIELDS = frozenset(
    f.name
    for f in dataclasses.fields(SamplingParams)
    if f.type in ("float", float, "float | None")
)


def sampling_key_fields(params: SamplingParams) -> dict[str, Any]:
    """Return the sampling fields that change the output, normalised for hashing.

    That is every field of ``params.to_dict()`` (everything but ``extra``), with
    float fields as floats so that ``temperature=0`` and ``0.0`` agree;
    ``structured`` and ``prompt_logprobs_start`` only when set, so that the keys
    of requests without them are the keys they had before the fields existed.

    Args:
        params: the request's sampling parameters.

    Returns:
        Field name to a JSON-able value.
    """
    out = params.to_dict()
    out.pop("extra", None)
    if out.get("structured") is None:  # keys of before, for unconstrained requests
        out.pop("structured", None)
    if not out.get("prompt_logprobs_start"):  # likewise: 0 is the old behaviour
        out.pop("prompt_logprobs_start", None)
    if not out.get("logprob_token_ids"):  # likewise
        out.pop("logprob_token_ids", None)
    for name in _FLOAT_FIELDS:
        value = out.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def scope_key(cache_scope: str, tenant: str) -> str | None:
    """Return the scope a request's answers are keyed under.

    >>> scope_key("tenant", "acme"), scope_key("shared", "acme")
    ('tenant:acme', None)

    Args:
        cache_scope: ``"tenant"`` (answers are the tenant's own) or ``"shared"``
            (every tenant's answers serve every tenant).
        tenant: who is asking.

    Returns:
        ``"tenant:<tenant>"``, or ``None`` for the shared scope (no scope in the
        key: the keys of before scopes existed).

    Raises:
        InvalidConfigError: ``cache_scope`` is neither of the two.
    """
    if cache_scope == "shared":
        return None
    if cache_scope == "tenant":
        return f"tenant:{tenant}"
    raise InvalidConfigError(
        f"cache_scope must be one of {CACHE_SCOPES}, got {cache_scope!r}", "cache_scope"
    )


def response_key(
    model_fingerprint: str,
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    messages: Sequence[Mapping[str, Any]] | None = None,
    scope: str | None = None,
) -> str:
    """Return the exact-cache key of a request.

    >>> key = response_key("fp", [1, 2, 3], SamplingParams(temperature=0))
    >>> key.startswith("resp:v1:") and len(key) == len("resp:v1:") + 64
    True

    Args:
        model_fingerprint: from
            :func:`~llmprod.models.fingerprint.model_fingerprint`; it covers the
            weights and the tokenizer, so token ids are only compared under one
            tokenizer.
        prompt_token_ids: the token ids the model sees (after any chat template).
        params: the sampling parameters; every field but ``extra`` is keyed.
        messages: the chat messages the ids were rendered from, when there are
            any; they are keyed as well.
        scope: who the entry belongs to (from :func:`scope_key`); ``None``:
            everyone, and the key is the one made before scopes existed.

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
    if scope is not None:
        doc["scope"] = str(scope)
    return KEY_PREFIX + hashlib.sha256(canonical_json(doc)).hexdigest()


def semantic_group(
    params: SamplingParams, context: str | None = None, scope: str | None = None
) -> str:
    """Return the group a semantic-cache request is matched within.

    Args:
        params: the sampling parameters (every field but ``extra``).
        context: text that must match exactly (system prompt, earlier turns).
        scope: who the entry belongs to (from :func:`scope_key`); ``None``:
            everyone, the group made before scopes existed.

    Returns:
        32 hex digits.
    """
    doc: dict[str, Any] = {"sampling": sampling_key_fields(params), "context": context}
    if scope is not None:
        doc["scope"] = str(scope)
    return hashlib.sha256(canonical_json(doc)).hexdigest()[:32]


def semantic_entry_id(group: str, text: str) -> str:
    """Return the id a semantic-cache answer to ``text`` in ``group`` is filed under.

    Args:
        group: from :func:`semantic_group`.
        text: the prompt text.

    Returns:
        32 hex digits.
    """
    return hashlib.sha256(canonical_json([group, text])).hexdigest()[:32]


def index_prefix(
    namespace: str, model_fingerprint: str, model_id: str, dim: int
) -> str:
    """Return the key prefix of the index of one model and one embedder.

    Args:
        namespace: keeps several indexes on one store apart.
        model_fingerprint: the answering model's fingerprint.
        model_id: the embedding model's name.
        dim: the embedding size.

    Returns:
        ``<namespace>:v1:<32 hex digits>:``.
    """
    ident = hashlib.sha256(
        canonical_json([model_fingerprint, model_id, dim])
    ).hexdigest()[:32]
    return f"{namespace}:v{INDEX_VERSION}:{ident}:"
