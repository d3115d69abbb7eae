"""Validation of what callers pass in: prompts, messages, per-prompt params.

Every check raises :class:`~llmprod.errors.InvalidRequestError` (a ValueError)
naming the field and the limit, in the caller's thread, before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmprod.errors import InvalidRequestError
from llmprod.sampling_params import SamplingParams, is_valid_text

Prompt = str | Sequence[int]
Message = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool", "developer")


_PROMPT_KINDS = (
    "a str, a list of int token ids, a list of chat messages (dicts), or a list of "
    "those"
)


def as_prompt_list(prompts: Any) -> list[Any]:
    """One prompt (a string or a list of token ids) or a list of them, as a list.

    Only the shape is checked here: each element is checked by
    :func:`check_prompt` (so ``return_exceptions`` can keep its error in place).
    """
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise InvalidRequestError("prompts is empty", "prompt")
        if all(_is_token(t) for t in prompts):
            return [list(prompts)]
        if any(_is_token(t) for t in prompts):
            raise InvalidRequestError(
                "prompt mixes token ids with other values; pass one list of int "
                "token ids, or a list of prompts",
                "prompt",
            )
        return list(prompts)
    raise InvalidRequestError(
        f"prompt must be {_PROMPT_KINDS}; got {type(prompts).__name__}", "prompt"
    )


def check_prompt(prompt: Any) -> None:
    """One element of a batch is a str, a list (token ids or a conversation,
    whose items are checked when they are read) or nothing else."""
    if isinstance(prompt, str):
        if not is_valid_text(prompt):
            raise InvalidRequestError(
                "prompt holds a lone surrogate and is not valid Unicode text", "prompt"
            )
        return
    if isinstance(prompt, (list, tuple)):
        return  # token ids: prompt_token_ids checks each; messages: check_messages
    raise InvalidRequestError(
        f"prompt must be {_PROMPT_KINDS}; got {type(prompt).__name__}", "prompt"
    )


def check_tenant(tenant: Any) -> None:
    if not isinstance(tenant, str) or not tenant:
        raise InvalidRequestError(
            f"tenant must be a non-empty str, got {tenant!r}", "tenant"
        )


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def adapter_list(
    adapter: str | Sequence[str | None] | None, n: int
) -> list[str | None]:
    """One adapter name (or None) per prompt: one for all, or one each."""
    if adapter is None or isinstance(adapter, str):
        return [adapter] * n
    if not isinstance(adapter, (list, tuple)):
        raise InvalidRequestError(
            "adapter must be a name, a list of names (None: the base model) or "
            f"None; got {type(adapter).__name__}",
            "adapter",
        )
    names = list(adapter)
    if len(names) != n:
        raise InvalidRequestError(
            f"adapter has {len(names)} entries for {n} prompts; pass one or one "
            "per prompt",
            "adapter",
        )
    for i, a in enumerate(names):
        if a is not None and not isinstance(a, str):
            raise InvalidRequestError(
                f"adapter[{i}] must be a name or None, got {type(a).__name__}",
                "adapter",
            )
    return names


def params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    """One SamplingParams per prompt (the default, one shared, or one each)."""
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, (list, tuple)):
        raise InvalidRequestError(
            "params must be SamplingParams, a list of SamplingParams or None; got "
            f"{type(params).__name__}",
            "params",
        )
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
        if not _is_token(t):
            raise InvalidRequestError(
                f"prompt token {j} is {t!r} ({type(t).__name__}), not an int",
                "prompt",
            )
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(
                f"prompt token {j} = {t} is out of vocabulary (valid ids are "
                f"0..{vocab_size - 1})",
                "prompt",
            )
    return ids


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """The token ids a request names (``stop_token_ids``, ``logprob_token_ids``)
    are in the model's vocabulary (checked at submit: the vocabulary is the
    model's)."""
    for name in ("stop_token_ids", "logprob_token_ids"):
        for t in getattr(params, name):
            if t >= vocab_size:
                raise InvalidRequestError(
                    f"{name} holds {t}, out of vocabulary (valid ids are "
                    f"0..{vocab_size - 1})",
                    name,
                )


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
        if not is_valid_text(m["content"]):
            raise InvalidRequestError(
                f"messages[{i}]['content'] holds a lone surrogate and is not valid "
                "Unicode text",
                "messages",
            )
