"""Validation of what callers pass in: prompts, messages, per-prompt params.

Every check raises :class:`~llmprod.errors.InvalidRequestError` (a ValueError)
naming the field and the limit, in the caller's thread, before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmprod.errors import InvalidRequestError
from llmprod.sampling_params import SamplingParams

Prompt = str | Sequence[int]
Message = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool", "developer")


def as_prompt_list(prompts: Any) -> list[Prompt]:
    """One prompt (a string or a list of token ids) or a list of them, as a list."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise InvalidRequestError("prompts is empty", "prompt")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]
        return list(prompts)
    raise InvalidRequestError(
        "prompt must be a str, a list of token ids, or a list of those; got "
        f"{type(prompts).__name__}",
        "prompt",
    )


def params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    """One SamplingParams per prompt (the default, one shared, or one each)."""
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    plist = list(params)
    if len(plist) != n:
        raise InvalidRequestError(
            f"params has {len(plist)} entries for {n} prompts; pass one or one per "
            "prompt",
            "params",
        )
    for i, p in enumerate(plist):
        if not isinstance(p, SamplingParams):
            raise InvalidRequestError(
                f"params[{i}] must be SamplingParams, got {type(p).__name__}", "params"
            )
    return plist


def prompt_token_ids(prompt: Prompt, tokenizer: Any, vocab_size: int) -> list[int]:
    """Tokenize a string, or check a list of token ids against the vocabulary."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt is empty", "prompt")
        ids = list(tokenizer.encode(prompt))
        if not ids:
            raise InvalidRequestError("prompt is empty after tokenization", "prompt")
        return ids
    ids = list(prompt)
    if not ids:
        raise InvalidRequestError("prompt is empty (no token ids)", "prompt")
    for j, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool):
            raise InvalidRequestError(
                f"prompt token {j} is {t!r}, not an int", "prompt"
            )
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(
                f"prompt token {j} = {t} is out of vocabulary (valid ids are "
                f"0..{vocab_size - 1})",
                "prompt",
            )
    return ids


def check_lengths(
    num_tokens: int,
    params: SamplingParams,
    max_model_len: int,
    num_blocks: int,
    block_size: int,
) -> None:
    """The prompt fits the model's context (with max_tokens) and the KV pool."""
    if num_tokens > max_model_len:
        raise InvalidRequestError(
            f"prompt has {num_tokens} tokens, more than max_model_len={max_model_len}",
            "prompt",
        )
    total = num_tokens + params.max_tokens
    if total > max_model_len:
        raise InvalidRequestError(
            f"prompt ({num_tokens} tokens) + max_tokens ({params.max_tokens}) = "
            f"{total} exceeds max_model_len={max_model_len}",
            "max_tokens",
        )
    if -(-num_tokens // block_size) > num_blocks:
        raise InvalidRequestError(
            f"prompt has {num_tokens} tokens and can never fit the KV cache of "
            f"{num_blocks} blocks x {block_size} = {num_blocks * block_size} tokens",
            "prompt",
        )


def is_conversation(messages: Any) -> bool:
    """True for one conversation (a list of dicts), False for a list of them."""
    if not isinstance(messages, (list, tuple)):
        raise InvalidRequestError(
            f"messages must be a list of dicts, got {type(messages).__name__}",
            "messages",
        )
    return not messages or isinstance(messages[0], dict)


def check_messages(messages: Sequence[Message]) -> None:
    """Each message is a dict with a known role and string content."""
    if not messages:
        raise InvalidRequestError("messages is empty", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] is not a dict", "messages")
        if "role" not in m:
            raise InvalidRequestError(f"messages[{i}] has no 'role'", "messages")
        if m["role"] not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}]['role']={m['role']!r} is not one of {ROLES}",
                "messages",
            )
        if "content" not in m:
            raise InvalidRequestError(f"messages[{i}] has no 'content'", "messages")
        if not isinstance(m["content"], str):
            raise InvalidRequestError(
                f"messages[{i}]['content'] must be a str, got "
                f"{type(m['content']).__name__}",
                "messages",
            )
