"""Batch inference on Ray Data: one Engine per actor, a bad row is an error cell.

>>> import ray  # doctest: +SKIP
>>> from llmprod import SamplingParams
>>> from llmprod.integrations.ray import run_batch
>>> ds = ray.data.from_items([{"prompt": "Hello"}, {"prompt": "The sky is"}])  # doctest: +SKIP
>>> out = run_batch(ds, "smollm2-135m", SamplingParams(max_tokens=16),  # doctest: +SKIP
...                 num_actors=2, num_cpus=1).take_all()
>>> out[0]["text"], out[0]["completion_tokens"], out[0]["error"]  # doctest: +SKIP
(' world! ...', 16, None)

:class:`LLMProcessor` is the callable class handed to ``Dataset.map_batches``;
Ray builds one per actor of the pool, so each actor loads the model once and
answers every batch it is given with one ``Engine.generate`` call (continuous
batching inside the actor, actors side by side). :func:`build_processor` gives
the ``map_batches`` arguments with the CPU share and the engine's threads set
consistently; :func:`run_batch` applies them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from llmprod.engine import inputs
from llmprod.integrations.ray.config import engine_kwargs, threads_for
from llmprod.sampling_params import SamplingParams

if TYPE_CHECKING:
    import ray.data

__all__ = ["OUTPUT_COLUMNS", "LLMProcessor", "build_processor", "run_batch"]

OUTPUT_COLUMNS = (
    "text",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "cache_hit",
    "finish_reason",
    "error",
)
"""Columns the processor adds to each batch. A row whose request failed has its
error (``"InvalidRequestError: prompt is empty"``) in ``error`` and None in the
others; a row that completed has None in ``error``."""


def _plain(value: Any) -> Any:
    """A cell as Python values: numpy arrays become lists, numpy scalars items."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class LLMProcessor:
    """A callable class for ``Dataset.map_batches``: one Engine per Ray actor.

    Each batch's prompts (or conversations) go to ``Engine.generate`` with
    ``return_exceptions=True``, so a bad row (an empty prompt, one longer than
    the context) fills its ``error`` cell and the other rows complete.

    Args:
        model: a registered model name, a transformers folder or a GGUF file.
        params: the SamplingParams of every row (default ``SamplingParams()``).
        prompt_column: the column of prompts (strings or token-id lists).
        messages_column: read conversations (lists of ``{"role", "content"}``)
            from this column instead, rendered with the model's chat template.
        engine: Engine options as one dict (``llmprod.integrations.ray.config``:
            limits, prices and guards may be plain values).
        num_threads: the engine's torch threads (default: the ``num_threads`` in
            ``engine``, else 1).
        tenant: who is asking (limits, accounting and cache scope).
        keep_columns: also return the input columns.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        params: SamplingParams | None = None,
        *,
        prompt_column: str = "prompt",
        messages_column: str | None = None,
        engine: Mapping[str, Any] | None = None,
        num_threads: int | None = None,
        tenant: str = "default",
        keep_columns: bool = True,
    ) -> None:
        from llmprod import Engine

        kwargs = engine_kwargs(engine)
        if num_threads is not None:
            kwargs["num_threads"] = num_threads
        kwargs.setdefault("num_threads", 1)
        self.params = params or SamplingParams()
        self.column = messages_column or prompt_column
        self.is_chat = messages_column is not None
        self.tenant = tenant
        self.keep_columns = keep_columns
        self.engine = Engine.from_pretrained(model, **kwargs)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one batch (a dict of columns, Ray Data's "numpy" format).

        Returns:
            The input columns (with ``keep_columns``) plus :data:`OUTPUT_COLUMNS`.
        """
        cells = [_plain(v) for v in batch[self.column]]
        n = len(cells)
        results: list[Any] = [None] * n
        todo: list[int] = []
        for i, cell in enumerate(cells):
            try:
                if self.is_chat:
                    inputs.check_messages(cell)
                elif cell is None:
                    raise ValueError(f"{self.column} is missing")
                todo.append(i)
            except ValueError as e:
                results[i] = e
        if todo:
            outs = self.engine.generate(
                [cells[i] for i in todo],
                self.params,
                tenant=self.tenant,
                return_exceptions=True,
            )
            for i, res in zip(todo, outs):
                results[i] = res
        cols: dict[str, list[Any]] = {name: [] for name in OUTPUT_COLUMNS}
        for r in results:
            ok = not isinstance(r, BaseException)
            cols["text"].append(r.text if ok else None)
            cols["prompt_tokens"].append(r.usage.prompt_tokens if ok else None)
            cols["completion_tokens"].append(r.usage.completion_tokens if ok else None)
            cols["cost"].append(float(r.usage.cost) if ok else None)
            cols["cache_hit"].append(r.cache_hit if ok else None)
            cols["finish_reason"].append(r.finish_reason if ok else None)
            cols["error"].append(None if ok else _error_text(r))
        out: dict[str, Any] = dict(batch) if self.keep_columns else {}
        for name, values in cols.items():
            arr = np.empty(n, dtype=object)
            arr[:] = values
            out[name] = arr
        return out

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def build_processor(
    model: str = "smollm2-135m",
    params: SamplingParams | None = None,
    *,
    num_actors: int = 1,
    num_cpus: float = 1.0,
    num_threads: int | None = None,
    batch_size: int = 16,
    engine: Mapping[str, Any] | None = None,
    prompt_column: str = "prompt",
    messages_column: str | None = None,
    tenant: str = "default",
) -> dict[str, Any]:
    """Keyword arguments of ``Dataset.map_batches`` for :class:`LLMProcessor`.

    Args:
        model: as in :class:`LLMProcessor`.
        params: one SamplingParams for every row.
        num_actors: actors in the pool (``ActorPoolStrategy(size=num_actors)``),
            each holding one Engine (and one copy of the weights).
        num_cpus: CPUs Ray reserves for each actor; fractional values (0.5) let
            several actors share a core.
        num_threads: each engine's torch threads; default from ``num_cpus``
            (its whole part, at least 1), so reservations and threads agree.
        batch_size: rows per call; larger batches keep an engine's continuous
            batching full.
        engine: Engine options as one dict (``num_threads`` here wins over
            the default from ``num_cpus``).
        prompt_column: the column of prompts.
        messages_column: the column of conversations, instead of prompts.
        tenant: who is asking.

    Returns:
        ``dict(fn=LLMProcessor, fn_constructor_kwargs=..., compute=...,
        num_cpus=..., batch_size=..., batch_format="numpy")``.
    """
    import ray.data

    threads = num_threads
    if threads is None:
        threads = (engine or {}).get("num_threads") or threads_for(num_cpus)
    return {
        "fn": LLMProcessor,
        "fn_constructor_kwargs": {
            "model": model,
            "params": params,
            "prompt_column": prompt_column,
            "messages_column": messages_column,
            "engine": dict(engine or {}),
            "num_threads": threads,
            "tenant": tenant,
        },
        "compute": ray.data.ActorPoolStrategy(size=num_actors),
        "num_cpus": num_cpus,
        "batch_size": batch_size,
        "batch_format": "numpy",
    }


def run_batch(
    ds: ray.data.Dataset,
    model: str = "smollm2-135m",
    params: SamplingParams | None = None,
    **kwargs: Any,
) -> ray.data.Dataset:
    """``ds.map_batches(**build_processor(model, params, **kwargs))``: lazy, like
    every Ray Data transform; take, write or iterate it to run.

    Args:
        ds: a dataset with a prompt (or messages) column.
        model: as in :class:`LLMProcessor`.
        params: one SamplingParams for every row.
        **kwargs: the keyword arguments of :func:`build_processor`.

    Returns:
        The dataset with :data:`OUTPUT_COLUMNS` added.
    """
    return ds.map_batches(**build_processor(model, params, **kwargs))
