"""The KV prefix cache follows cache_scope: by default no tenant reuses another
tenant's prompt blocks (no timing oracle of what others asked); "shared" opts in."""

from __future__ import annotations

from typing import Any

from llmprod import Engine, SamplingParams

PROMPT = (
    "You are a careful assistant for the accounts team. Summarise the quarterly "
    "report in three short bullet points for the board, then list open risks."
)
P = SamplingParams(max_tokens=2, temperature=0)


def test_tenants_share_no_prefix_blocks_by_default(engine: Engine) -> None:
    first = engine.generate(PROMPT, P, tenant="scope-a")[0]
    again = engine.generate(PROMPT, P, tenant="scope-a")[0]
    other = engine.generate(PROMPT, P, tenant="scope-b")[0]
    assert first.usage.cached_prompt_tokens == 0
    assert again.usage.cached_prompt_tokens > 0  # same tenant: the prefix is reused
    assert other.usage.cached_prompt_tokens == 0  # another tenant: computed afresh
    assert other.token_ids == first.token_ids


def test_shared_scope_reuses_prefix_blocks_across_tenants(make_engine: Any) -> None:
    eng = make_engine(cache_scope="shared", kv_cache_memory="64MiB")
    eng.generate(PROMPT, P, tenant="scope-a")
    other = eng.generate(PROMPT, P, tenant="scope-b")[0]
    assert other.usage.cached_prompt_tokens > 0
