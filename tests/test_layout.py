"""The package layout users build on: what imports without torch, the public
names and signatures, and the old import paths that still work (with a warning)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import textwrap

import llmprod
from llmprod import Engine, SamplingParams
from llmprod._compat import MOVED


def run_python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_scheduler_and_kv_import_without_torch() -> None:
    # With sys.modules["torch"] = None any `import torch` raises ImportError.
    out = run_python(
        """
        import sys
        sys.modules["torch"] = None
        import llmprod
        import llmprod.kv
        import llmprod.sched
        from llmprod.kv import BlockPool, KVCacheManager
        from llmprod.sched import FairQueue, Request, Scheduler
        from llmprod.config import SchedulerConfig
        from llmprod.sampling_params import SamplingParams

        kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
        s = Scheduler(SchedulerConfig(), kv)
        s.add(Request("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=2)))
        step = s.schedule()
        print(step.num_batched_tokens, kv.stats().num_free_blocks)
        """
    )
    assert out.split() == ["5", "2"]


def test_public_names_are_pinned() -> None:
    assert sorted(llmprod.__all__) == sorted(
        [
            "CacheConfig",
            "CascadePolicy",
            "Completion",
            "ComplexityPolicy",
            "Delta",
            "Engine",
            "EngineClosedError",
            "EngineConfig",
            "InvalidConfigError",
            "InvalidRequestError",
            "LLMProdError",
            "MetricsSnapshot",
            "RateLimited",
            "RequestFailedError",
            "Router",
            "SamplingParams",
            "SchedulerConfig",
            "Timings",
            "TokenLogprob",
            "Usage",
            "__version__",
        ]
    )
    for name in llmprod.__all__:
        assert getattr(llmprod, name) is not None


ENGINE_SIGNATURES = {
    "from_pretrained": "(model: 'str | Path' = 'smollm2-135m', **kwargs: 'Any') -> 'Engine'",
    "generate": "(self, prompts: 'Prompt | Sequence[Prompt]', params: "
    "'SamplingParams | Sequence[SamplingParams] | None' = None, *, progress: "
    "'bool' = False, tenant: 'str' = 'default', return_exceptions: 'bool' = False, "
    "wait_timeout: 'float | None' = None, grounding_context: 'str | None' = None, "
    "adapter: 'str | Sequence[str | None] | None' = None) -> 'list[Completion]'",
    "chat": "(self, messages: 'Sequence[Message] | Sequence[Sequence[Message]]', "
    "params: 'SamplingParams | Sequence[SamplingParams] | None' = None, **kwargs: "
    "'Any') -> 'Completion | list[Completion]'",
    "stream": "(self, prompt: 'Prompt | Sequence[Message]', params: "
    "'SamplingParams | None' = None, *, tenant: 'str' = 'default', wait_timeout: "
    "'float | None' = None, adapter: 'str | None' = None) -> 'Iterator[Delta]'",
    "agenerate": "(self, prompts: 'Prompt | Sequence[Prompt]', params: "
    "'SamplingParams | Sequence[SamplingParams] | None' = None, *, tenant: 'str' = "
    "'default', return_exceptions: 'bool' = False, wait_timeout: 'float | None' = "
    "None, adapter: 'str | Sequence[str | None] | None' = None) -> 'list[Completion]'",
    "astream": "(self, prompt: 'Prompt | Sequence[Message]', params: "
    "'SamplingParams | None' = None, *, tenant: 'str' = 'default', wait_timeout: "
    "'float | None' = None, adapter: 'str | None' = None) -> 'AsyncIterator[Delta]'",
    "abort": "(self, request_id: 'str') -> 'None'",
    "metrics": "(self) -> 'MetricsSnapshot'",
    "close": "(self) -> 'None'",
    "render_chat": "(self, messages: 'Sequence[Message]') -> 'list[int]'",
}


def test_engine_signatures_are_pinned() -> None:
    got = {
        name: str(inspect.signature(getattr(Engine, name)))
        for name in ENGINE_SIGNATURES
    }
    assert got == ENGINE_SIGNATURES


def test_sampling_params_fields_are_pinned() -> None:
    fields = [f.name for f in dataclasses.fields(SamplingParams)]
    for name in [
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "logprobs",
        "prompt_logprobs",
        "repetition_penalty",
        "min_tokens",
    ]:
        assert name in fields, name


def test_old_import_paths_warn_and_give_the_new_modules() -> None:
    # A fresh interpreter, so no old path was imported (and warned about) before.
    out = run_python(
        f"""
        import importlib, json, warnings
        moved = {json.dumps(MOVED)}
        report = {{}}
        for old, new in sorted(moved.items()):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mod = importlib.import_module(old)
            report[old] = [
                mod is importlib.import_module(new),
                mod.__name__,
                any(issubclass(w.category, DeprecationWarning) and new in str(w.message)
                    for w in caught),
            ]
        from llmprod.throttle import Throttle
        from llmprod.ops.limits import Throttle as T2
        report["same class"] = [Throttle is T2]
        print(json.dumps(report))
        """
    )
    report = json.loads(out)
    assert report.pop("same class") == [True]
    for old, new in MOVED.items():
        assert report[old] == [True, new, True], old
