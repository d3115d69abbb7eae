"""LLMProdLLM (LlamaIndex) on the real SmolLM2-135M: each method once, sync and
async, against the engine's own answer for the same request."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.llms import ChatMessage, MessageRole

from llmprod import Engine, SamplingParams
from llmprod.integrations.llamaindex import LLMProdLLM

MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
PROMPT = "The capital of France is"
MESSAGES = [
    ChatMessage(role=MessageRole.SYSTEM, content="Answer in one word."),
    ChatMessage(role=MessageRole.USER, content="What colour is the sky?"),
]
ENGINE_MESSAGES = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What colour is the sky?"},
]


@pytest.fixture
def llm(engine: Engine) -> LLMProdLLM:
    return LLMProdLLM(engine=engine, max_tokens=MAX_TOKENS, temperature=0)


def test_metadata_describes_the_engine(llm: LLMProdLLM, engine: Engine) -> None:
    meta = llm.metadata
    assert meta.context_window == engine.max_model_len == 8192
    assert meta.num_output == MAX_TOKENS
    assert meta.model_name == "smollm2-135m"
    assert meta.is_chat_model is True


def test_complete_continues_the_raw_prompt(llm: LLMProdLLM, engine: Engine) -> None:
    want = engine.generate(PROMPT, GREEDY)[0]
    got = llm.complete(PROMPT)
    assert got.text == want.text
    assert got.additional_kwargs["prompt_tokens"] == want.usage.prompt_tokens
    assert got.additional_kwargs["completion_tokens"] == want.usage.completion_tokens


def test_stream_complete_grows_to_the_complete_text(llm: LLMProdLLM) -> None:
    whole = llm.complete(PROMPT).text
    pieces = list(llm.stream_complete(PROMPT))
    assert "".join(p.delta or "" for p in pieces) == whole
    assert pieces[-1].text == whole
    assert pieces[-1].additional_kwargs["completion_tokens"] > 0


def test_chat_uses_the_chat_template(llm: LLMProdLLM, engine: Engine) -> None:
    want = engine.chat(ENGINE_MESSAGES, GREEDY)
    got = llm.chat(MESSAGES)
    assert got.message.role == MessageRole.ASSISTANT
    assert got.message.content == want.text
    assert got.additional_kwargs["prompt_tokens"] == want.usage.prompt_tokens


def test_stream_chat_grows_to_the_chat_answer(llm: LLMProdLLM) -> None:
    whole = llm.chat(MESSAGES).message.content
    pieces = list(llm.stream_chat(MESSAGES))
    assert "".join(p.delta or "" for p in pieces) == whole
    assert pieces[-1].message.content == whole


async def test_async_methods_give_the_sync_answers(llm: LLMProdLLM) -> None:
    text = llm.complete(PROMPT).text
    answer = llm.chat(MESSAGES).message.content
    assert (await llm.acomplete(PROMPT)).text == text
    assert (await llm.achat(MESSAGES)).message.content == answer
    pieces = [p async for p in await llm.astream_complete(PROMPT)]
    assert pieces[-1].text == text
    chats = [p async for p in await llm.astream_chat(MESSAGES)]
    assert chats[-1].message.content == answer


def test_per_call_options_and_stop(llm: LLMProdLLM) -> None:
    assert (
        llm.complete(PROMPT, max_tokens=1).additional_kwargs["completion_tokens"] == 1
    )
    text = llm.complete("1, 2, 3, 4,", max_tokens=MAX_TOKENS).text
    assert "," in text
    assert llm.complete("1, 2, 3, 4,", stop=[","]).text == text.split(",")[0]
