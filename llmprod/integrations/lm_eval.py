"""lm-evaluation-harness model on an llmprod :class:`~llmprod.Engine`: ``LLMProdLM``,
registered as ``"llmprod"``.

>>> import lm_eval  # doctest: +SKIP
>>> from llmprod.integrations.lm_eval import LLMProdLM  # doctest: +SKIP
>>> lm_eval.simple_evaluate(model=LLMProdLM(pretrained="smollm2-135m"),
...                         tasks=["lambada_openai"])  # doctest: +SKIP

From the command line (lm-eval 0.4.x reads no entry points for models, so this
module registers the class and hands the rest of the arguments to lm-eval's own
CLI; ``--model llmprod`` is implied)::

    python -m llmprod.integrations.lm_eval \\
        --model_args pretrained=smollm2-135m,dtype=float32 --tasks lambada_openai

Requests are tokenized exactly as lm-eval's ``hf`` backend tokenizes them (the
same ``TemplateLM`` pair encoding, BOS rules and prefix token), so the two
backends score the same tokens. One-token continuations of one input (the
choices of a multiple-choice question) share one request, whose input runs once
and whose first generated position reports each choice's log-probability
(``logprob_token_ids``). Other loglikelihoods come from the engine's
``prompt_logprobs`` from the continuation on (``prompt_logprobs_start``, so the
context may come from the prefix cache). Each batch of requests is submitted at
once, and the engine packs them into flat token batches without padding.
``generate_until`` runs the engine's generation with the request's stop strings and the ``hf`` backend's
post-processing (stop at the first stop string, EOS included).

Needs ``pip install 'llmprod[eval]'``.
"""

# ruff: noqa: E402
from __future__ import annotations

from llmprod.integrations import require

require("lm_eval", "eval")

import logging
import sys
from collections.abc import Sequence
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from llmprod.outputs import Completion
from llmprod.sampling_params import SamplingParams

logger = logging.getLogger("llmprod")

# A loglikelihood request: ((context, continuation) or None, context ids, cont ids).
TokenRequest = tuple[Any, list[int], list[int]]
# An engine request that scores: ((kind, prompt ids), its sampling parameters).
Job = tuple[tuple[str, tuple[int, ...]], SamplingParams]

SCORING_BLOCK_SIZE = 4
"""KV block size of an engine this backend builds (``block_size=`` overrides).
The prefix cache shares whole blocks only: with 4-token blocks a continuation
recomputes at most 3 tokens of its context, with the CPU default of 8 up to 7
(most of a short multiple-choice question's)."""
DEFAULT_MAX_GEN_TOKS = 256
"""What a generate_until request without ``max_gen_toks`` gets (as ``hf``)."""


@register_model("llmprod")
class LLMProdLM(TemplateLM):
    """lm-eval's model interface over an in-process llmprod Engine.

    Args:
        pretrained: model name, transformers folder or GGUF file for
            :meth:`Engine.from_pretrained` (ignored when ``engine`` is given).
        engine: an existing Engine to evaluate (shared, not closed here).
        batch_size: requests submitted to the engine at once (an int, or
            ``"auto"`` for 256); the engine schedules them in token batches.
        max_length: longest scored window in tokens (default: the engine's
            ``max_model_len`` less two: the window plus the one generated token).
        max_gen_toks: default ``max_gen_toks`` of generate_until requests.
        add_bos_token: as the ``hf`` backend (None: the tokenizer's default).
        prefix_token_id: the token an empty context is scored after (default:
            BOS, else EOS, as ``hf``).
        device: ``"cpu"``, ``"cuda"``... (default: the engine's choice). A CUDA
            device on a machine without CUDA (lm-eval's CLI passes ``cuda:0`` by
            default) falls back to the engine's choice, as ``hf`` falls back.
        **engine_kwargs: further :meth:`Engine.from_pretrained` options, e.g.
            ``dtype="float32"``, ``quantization="int8"``; ``block_size``
            defaults to :data:`SCORING_BLOCK_SIZE` here. lm-eval's own
            options that do not apply to this backend (``max_batch_size``) are
            accepted and ignored.
    """

    def __init__(
        self,
        pretrained: str = "smollm2-135m",
        engine: Any = None,
        batch_size: int | str | None = 256,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        device: str | None = None,
        **engine_kwargs: Any,
    ) -> None:
        super().__init__()
        engine_kwargs.pop("max_batch_size", None)
        self._owns_engine = engine is None
        if engine is None:
            from llmprod import Engine

            if device is not None and _device_available(device):
                engine_kwargs["device"] = device
            engine_kwargs.setdefault("block_size", SCORING_BLOCK_SIZE)
            engine = Engine.from_pretrained(pretrained, **engine_kwargs)
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._batch_size = _parse_batch_size(batch_size)
        self._max_length = max_length or int(engine.max_model_len) - 2
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id

    def close(self) -> None:
        """Close the engine if this model built it."""
        if self._owns_engine:
            self.engine.close()

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return int(self.tokenizer.bos_token_id)
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of ``string``, with the ``hf`` backend's BOS rules."""
        special: dict[str, bool] = {}
        if add_special_tokens is not None:
            special["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            special["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and string.startswith(
            self.tokenizer.decode(self.prefix_token_id)
        ):
            special["add_special_tokens"] = False
        ids = list(self.tokenizer.encode(string, **special))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _context_ids(self, context: str, max_len: int) -> list[int]:
        """A generation context's ids as ``hf``'s batch encoding makes them."""
        special: dict[str, bool] = {}
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and context.startswith(bos):
            special["add_special_tokens"] = False
        elif self.add_bos_token is not None:
            special["add_special_tokens"] = self.add_bos_token
        ids = list(self.tokenizer(context, **special)["input_ids"])
        return ids[-max_len:]

    # -------------------------------------------------------------- scoring
    def _loglikelihood_tokens(
        self,
        requests: list[TokenRequest],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """Sum of the continuation's log-probabilities and whether it is the
        greedy continuation, for each request, in order.

        The window is the last ``max_length + 1`` tokens of context and
        continuation (its first token is context only), as ``hf`` scores it.
        """
        windows = [
            tuple((ctx + cont)[-(self._max_length + 1) :]) for _, ctx, cont in requests
        ]
        # One-token continuations of one input (the choices of a multiple-choice
        # question) are scored by one request: the input runs once and the
        # engine reports each choice's log-probability at its last position
        # (``logprob_token_ids``). Longer continuations are scored from the
        # engine's ``prompt_logprobs``.
        one_token = [
            len(cont) == 1 and len(w) > 1 for w, (_, _, cont) in zip(windows, requests)
        ]
        by_input: dict[tuple[int, ...], set[int]] = {}
        # Equal windows are scored once, from the earliest continuation among
        # them: the tokens before it may come from the prefix cache.
        score_from: dict[tuple[int, ...], int] = {}
        for window, (_, _, cont), single in zip(windows, requests, one_token):
            if single:
                by_input.setdefault(window[:-1], set()).add(window[-1])
            else:
                start = len(window) - len(cont)
                score_from[window] = min(score_from.get(window, start), start)
        # (kind, tokens): "input" of a one-token group, or "window".
        jobs: list[Job] = [
            (
                ("input", inp),
                SamplingParams(
                    max_tokens=1,
                    temperature=0,
                    logprobs=1,
                    logprob_token_ids=tuple(sorted(last)),
                ),
            )
            for inp, last in by_input.items()
        ]
        jobs += [
            (
                ("window", w),
                SamplingParams(
                    max_tokens=1,
                    temperature=0,
                    prompt_logprobs=1,
                    prompt_logprobs_start=start,
                ),
            )
            for w, start in score_from.items()
        ]
        scored: dict[tuple[str, tuple[int, ...]], Completion] = {}
        bar = tqdm(total=len(jobs), desc="llmprod loglikelihood", disable=disable_tqdm)
        for phase in _context_phases(jobs):
            for start in range(0, len(phase), self._batch_size):
                batch = phase[start : start + self._batch_size]
                outs = self.engine.generate(
                    [list(w) for (_, w), _ in batch], [p for _, p in batch]
                )
                scored.update(zip((key for key, _ in batch), outs))
                bar.update(len(batch))
        bar.close()

        results: list[tuple[float, bool]] = []
        for (key, _, cont), window, single in zip(requests, windows, one_token):
            if single:
                gen = scored["input", window[:-1]].logprobs
                assert gen
                best = max(gen[0].top, key=gen[0].top.__getitem__)
                answer = (gen[0].scored[window[-1]], best == window[-1])
            else:
                answer = _score_tail(scored["window", window], len(cont))
            results.append(answer)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[float]:
        """Loglikelihood of each whole string, in disjoint windows of
        ``max_length`` tokens (the first one after the prefix token), as ``hf``."""
        windows: list[TokenRequest] = []
        counts: list[int] = []
        for (string,) in (req.args for req in requests):
            rolling = [
                lm_utils.make_disjoint_window(w)
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length,
                    context_len=1,
                )
            ]
            windows.extend((None, ctx, cont) for ctx, cont in rolling)
            counts.append(len(rolling))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        results: list[float] = []
        start = 0
        for req, n in zip(requests, counts):
            total = sum(s for s, _ in scores[start : start + n])
            start += n
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return results

    # ------------------------------------------------------------ generation
    def generate_until(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[str]:
        """Generate for each request until one of its stop strings (or EOS) or
        ``max_gen_toks``; the text before the first stop string, as ``hf``."""
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        prompts: list[list[int]] = []
        params: list[SamplingParams] = []
        stops: list[list[str]] = []
        for context, gen_kwargs in (req.args for req in requests):
            p, until = self._gen_params(dict(gen_kwargs), eos)
            prompts.append(self._context_ids(context, self._max_length - p.max_tokens))
            params.append(p)
            stops.append(until)
        results: list[str] = []
        bar = tqdm(total=len(requests), desc="llmprod generate", disable=disable_tqdm)
        for start in range(0, len(prompts), self._batch_size):
            end = start + self._batch_size
            outs = self.engine.generate(prompts[start:end], params[start:end])
            for req, out, until in zip(requests[start:end], outs, stops[start:end]):
                text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
                for term in until:
                    if term:
                        text = text.split(term)[0]
                results.append(text)
                self.cache_hook.add_partial("generate_until", req.args, text)
            bar.update(len(outs))
        bar.close()
        return results

    def _gen_params(
        self, kwargs: dict[str, Any], eos: str
    ) -> tuple[SamplingParams, list[str]]:
        """SamplingParams for one request's lm-eval generation kwargs, and its
        stop strings (EOS's text added, as ``hf`` adds it)."""
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if eos and eos not in until:
            until.append(eos)
        max_tokens = self._max_gen_toks
        for name in ("max_gen_toks", "max_new_tokens", "max_tokens"):
            if kwargs.get(name) is not None:
                max_tokens = int(kwargs[name])
                break
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        if not kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        fields: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        if temperature > 0:
            for name in ("top_p", "top_k", "seed"):
                if kwargs.get(name) is not None:
                    fields[name] = kwargs[name]
        # The engine ends on EOS itself; a special token's text never shows in
        # the decoded output, so only the other strings are stop strings there.
        fields["stop"] = tuple(s for s in until if s and s != eos)
        return SamplingParams(**fields), until


def _context_phases(jobs: list[Job]) -> tuple[list[Job], list[Job]]:
    """The jobs in two phases: the first job of each context (a one-token group's
    input, else the first continuation after it), then the other continuations
    of the same contexts. Requests in one step cannot share what none of them
    has computed yet; once the first phase has run, the contexts' KV blocks are
    in the prefix cache and a later continuation computes only its own tokens
    (and the context's last, partly filled block)."""
    first: list[Job] = []
    rest: list[Job] = []
    seen: set[tuple[int, ...]] = set()
    for job in jobs:
        (kind, tokens), params = job
        ctx = tokens if kind == "input" else tokens[: params.prompt_logprobs_start]
        (rest if ctx in seen else first).append(job)
        seen.add(ctx)
    return first, rest


def _score_tail(out: Completion, n: int) -> tuple[float, bool]:
    """The sum of the last ``n`` prompt tokens' log-probabilities and whether
    each was the model's argmax."""
    lps = out.prompt_logprobs
    assert lps is not None
    total = 0.0
    is_greedy = True
    for lp in lps[-n:]:
        assert lp is not None
        total += lp.logprob
        is_greedy = is_greedy and max(lp.top, key=lp.top.__getitem__) == lp.token_id
    return total, is_greedy


def _device_available(device: str) -> bool:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device=%r asked for but CUDA is not available", device)
        return False
    return True


def _parse_batch_size(value: int | str | None) -> int:
    if value is None or value == "auto" or str(value).startswith("auto"):
        return 256
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size={value!r} must be >= 1 or 'auto'")
    return size


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's CLI with ``llmprod`` registered (``--model llmprod`` implied)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--model" or a.startswith("--model=") for a in args):
        args = ["--model", "llmprod", *args]
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
