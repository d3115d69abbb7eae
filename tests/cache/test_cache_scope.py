"""Cache scope: with ``cache_scope="tenant"`` (the default) no cached answer crosses
tenants, exact or semantic; ``"shared"`` is today's behaviour, with today's keys.

On the real model, a real redis-server (exact answers) and diskcache (the
semantic index, MiniLM embeddings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmprod import SamplingParams
from llmprod.answers import AnswerCaches
from llmprod.answers.keys import (
    response_key,
    scope_key,
    semantic_entry_id,
    semantic_group,
)
from llmprod.errors import InvalidConfigError

GREEDY = SamplingParams(max_tokens=12, temperature=0)
QUESTION = [{"role": "user", "content": "What is the capital city of France?"}]
PARAPHRASE = [{"role": "user", "content": "What's the capital of France?"}]

# Keys made before scopes existed, printed at commit 0f1812c (llmprod/answers/keys.py
# unchanged since 3400529) with:
#   p = SamplingParams(temperature=0, max_tokens=16, seed=7)
#   response_key("fingerprint-0", [1, 2, 3, 50256], p)
#   response_key("fingerprint-0", [1, 2, 3], p, [{"role": "user", "content": "Hi"}])
#   g = semantic_group(p, "ctx"); semantic_entry_id(g, "What is the capital of France?")
#   semantic_group(p)
# The shared scope must keep producing them, so that existing shared caches still hit.
PARAMS = SamplingParams(temperature=0, max_tokens=16, seed=7)
KEY = "resp:v1:255f831967bc6102625a947fa0d0375e34a6134edef6ae3e423419c31494fecb"
CHAT_KEY = "resp:v1:28851f5f182150b4c43a5132519eb4c16bb8d35494e18d359ff4286a53719971"
GROUP_CTX = "4b717c7f09113c00c73149d48cf5161b"
ENTRY_CTX = "05e9a0509060c2f764202a4ecb46a39c"
GROUP = "8f5508b530535dbc523af2a520962067"


def test_shared_scope_keys_are_the_keys_of_before() -> None:
    shared = scope_key("shared", "acme")
    assert shared is None
    assert response_key("fingerprint-0", [1, 2, 3, 50256], PARAMS, scope=shared) == KEY
    chat = [{"role": "user", "content": "Hi"}]
    assert response_key("fingerprint-0", [1, 2, 3], PARAMS, chat, shared) == CHAT_KEY
    group = semantic_group(PARAMS, "ctx", shared)
    assert group == GROUP_CTX
    assert semantic_entry_id(group, "What is the capital of France?") == ENTRY_CTX
    assert semantic_group(PARAMS, scope=shared) == GROUP
    # The tenant scope keys every tenant apart, and apart from the shared keys.
    keys = {
        response_key(
            "fingerprint-0", [1, 2, 3, 50256], PARAMS, scope=scope_key("tenant", t)
        )
        for t in ("a", "b", "default")
    }
    groups = {semantic_group(PARAMS, scope=scope_key("tenant", t)) for t in "ab"}
    assert len(keys) == 3 and KEY not in keys
    assert len(groups) == 2 and GROUP not in groups


def test_unknown_scope_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="cache_scope") as err:
        AnswerCaches("memory://", None, tmp_path, "float32", None, cache_scope="global")
    assert err.value.field == "cache_scope"


def _steps(eng: Any) -> int:
    return int(eng.metrics().scheduler["steps"])


def _flush(eng: Any) -> None:
    for cache in (eng.answers.exact, eng.answers.semantic):
        if cache is not None:
            cache.flush(10.0)


def test_tenant_scope_keeps_answers_within_the_tenant(
    make_engine: Any, redis_factory: Any, tmp_path: Path
) -> None:
    redis = redis_factory()
    eng = make_engine(
        kv_cache_memory="64MiB",
        cache=redis.url,
        semantic_cache=f"diskcache://{tmp_path / 'sem'}",
    )  # cache_scope defaults to "tenant"
    assert eng.answers.cache_scope == "tenant"
    a = eng.chat(QUESTION, GREEDY, tenant="a")
    assert a.cache_hit is None
    _flush(eng)

    # Tenant b asks a paraphrase (a semantic hit within a): no hit.
    b = eng.chat(PARAPHRASE, GREEDY, tenant="b")
    assert b.cache_hit is None
    # Tenant c asks exactly what a asked: no hit, the model answers.
    steps = _steps(eng)
    c = eng.chat(QUESTION, GREEDY, tenant="c")
    assert c.cache_hit is None and c.token_ids == a.token_ids
    assert _steps(eng) > steps

    # The same tenant still hits, exact and semantic.
    steps = _steps(eng)
    again = eng.chat(QUESTION, GREEDY, tenant="a")
    assert again.cache_hit == "redis" and again.text == a.text
    para = eng.chat(PARAPHRASE, GREEDY, tenant="a")
    assert para.cache_hit == "semantic" and para.text == a.text
    assert _steps(eng) == steps  # both came from the caches
    # b's and c's own answers were stored under them and now serve them.
    _flush(eng)
    assert eng.chat(PARAPHRASE, GREEDY, tenant="b").cache_hit == "redis"
    assert eng.chat(QUESTION, GREEDY, tenant="c").cache_hit == "redis"


def test_shared_scope_serves_every_tenant(
    make_engine: Any, redis_factory: Any, tmp_path: Path
) -> None:
    redis = redis_factory()
    sem = f"diskcache://{tmp_path / 'sem'}"
    eng = make_engine(
        kv_cache_memory="64MiB",
        cache=redis.url,
        semantic_cache=sem,
        cache_scope="shared",
    )
    a = eng.chat(QUESTION, GREEDY, tenant="a")
    _flush(eng)
    steps = _steps(eng)
    b = eng.chat(QUESTION, GREEDY, tenant="b")
    assert b.cache_hit == "redis" and b.text == a.text
    c = eng.chat(PARAPHRASE, GREEDY, tenant="c")
    assert c.cache_hit == "semantic" and c.text == a.text
    assert _steps(eng) == steps
    eng.close()

    # Shared entries are not visible to a tenant-scoped engine on the same stores:
    # switching scope starts with a cold cache, it never leaks the shared answers.
    scoped = make_engine(kv_cache_memory="64MiB", cache=redis.url, semantic_cache=sem)
    assert scoped.chat(QUESTION, GREEDY, tenant="a").cache_hit is None
    assert scoped.chat(PARAPHRASE, GREEDY, tenant="b").cache_hit is None
