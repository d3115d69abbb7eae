"""ChatLLMProd against LangChain's own contract: langchain-tests' standard
``ChatModelUnitTests`` and ``ChatModelIntegrationTests``, on the real SmolLM2-135M
(the session ``engine``), plus the behaviour those suites leave open.

Skipped from the standard suites, each because the model cannot have it: tool
calling (SmolLM2-135M has no tool-call format; ``has_tool_calling`` is False, so
every tool test skips itself), image/audio/PDF inputs (a text-only model; the
``supports_*_inputs`` flags stay False) and a per-call ``model=`` override (one
engine holds one model's weights; ``supports_model_override`` is False and such a
call raises).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import BaseModel, Field

from llmprod import Engine
from llmprod.integrations.langchain import ChatLLMProd

# The standard suites' answers: room for a structured answer to close its JSON
# document (the model's chat answers end on EOS well before), and a repetition
# penalty, without which greedy SmolLM2-135M repeats one phrase inside a JSON
# string until max_tokens.
SUITE_PARAMS = {"max_tokens": 96, "repetition_penalty": 1.3}
# Our own checks keep answers short: the suite stays fast on two CPU cores.
MAX_TOKENS = 12


class _SharedEngine:
    """Hands the session engine to the suites' ``chat_model_params``."""

    shared_engine: Engine | None = None

    @pytest.fixture(autouse=True)
    def _use_session_engine(self, engine: Engine) -> Iterator[None]:
        type(self).shared_engine = engine
        yield


class TestChatLLMProdUnit(_SharedEngine, ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatLLMProd]:
        return ChatLLMProd

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # No max_tokens/stop here: test_standard_params passes its own.
        return {"engine": self.shared_engine}

    @property
    def has_tool_calling(self) -> bool:
        return False  # the model has no tool-call format

    @property
    def has_structured_output(self) -> bool:
        return True


class TestChatLLMProdIntegration(_SharedEngine, ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatLLMProd]:
        return ChatLLMProd

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": self.shared_engine, **SUITE_PARAMS}

    @property
    def has_tool_calling(self) -> bool:
        return False  # the model has no tool-call format

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one engine holds one model's weights


# ---------------------------------------------------------------- our own checks
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS}


@pytest.fixture
def chat(engine: Engine) -> ChatLLMProd:
    return ChatLLMProd(engine=engine, **GREEDY)


def test_answer_is_the_engines_greedy_answer_with_its_usage(
    chat: ChatLLMProd, engine: Engine
) -> None:
    from llmprod import SamplingParams

    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    want = engine.chat(msgs, SamplingParams(**GREEDY))
    got = chat.invoke([SystemMessage("Be brief."), HumanMessage("Hi")])
    assert got.content == want.text
    assert got.usage_metadata is not None
    assert got.usage_metadata["input_tokens"] == want.usage.prompt_tokens
    assert got.usage_metadata["output_tokens"] == want.usage.completion_tokens
    assert got.response_metadata["model_name"] == "smollm2-135m"
    assert got.response_metadata["finish_reason"] == want.finish_reason


def test_stream_pieces_join_to_the_invoke_answer(chat: ChatLLMProd) -> None:
    whole = chat.invoke("Name three colours.")
    chunks = list(chat.stream("Name three colours."))
    assert "".join(str(c.content) for c in chunks) == whole.content
    # The usage is counted once, on the closing chunk.
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1
    last, want = chunks[-1].usage_metadata, whole.usage_metadata
    assert last is not None and want is not None
    # (input_token_details may differ: the second request finds the first's
    # prompt in the prefix cache.)
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        assert last[key] == want[key]


async def test_async_answers_equal_the_sync_ones(chat: ChatLLMProd) -> None:
    whole = chat.invoke("Say hello.")
    got = await chat.ainvoke("Say hello.")
    pieces = [c async for c in chat.astream("Say hello.")]
    assert got.content == whole.content
    assert "".join(str(c.content) for c in pieces) == whole.content


def test_stop_sequence_ends_the_answer_before_it(chat: ChatLLMProd) -> None:
    free = chat.invoke("Count from 1 to 9, separated by commas.", max_tokens=24)
    text = str(free.content)
    assert "," in text, text  # the stop string would occur
    cut = chat.invoke(
        "Count from 1 to 9, separated by commas.", stop=[","], max_tokens=24
    )
    assert cut.content == text.split(",")[0]
    assert cut.response_metadata["finish_reason"] == "stop"


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


def test_structured_output_is_a_validated_instance(chat: ChatLLMProd) -> None:
    person = chat.with_structured_output(Person, max_tokens=64).invoke(
        "Describe a person."
    )
    assert isinstance(person, Person)
    raw = chat.with_structured_output(
        Person.model_json_schema(), include_raw=True, max_tokens=64
    ).invoke("Describe a person.")
    assert raw["parsing_error"] is None
    assert isinstance(raw["raw"], AIMessage)
    # The same request: the dict holds the same person.
    assert Person.model_validate(raw["parsed"]) == person


def test_builds_and_closes_its_own_engine_when_given_a_name() -> None:
    chat = ChatLLMProd(model="smollm2-135m", engine_kwargs={"kv_cache_memory": "64MiB"})
    try:
        assert chat.invoke("Hi", max_tokens=2, temperature=0).content
    finally:
        chat.close()
    assert chat.engine.is_closed
