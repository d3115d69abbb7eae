"""Engine options are checked when the config is built, before any model loads:
each bad value raises InvalidConfigError naming the field, the value and what
is allowed; good values pass."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmprod import Engine
from llmprod.cache.memory import MemoryCache
from llmprod.cache.tiered import TieredCache
from llmprod.config import CacheConfig, EngineConfig, SchedulerConfig
from llmprod.errors import InvalidConfigError
from llmprod.ops.guards import BlockListGuard, GuardResult, PIIGuard
from llmprod.ops.limits import TenantLimits, Throttle
from llmprod.ops.pricing import PriceTable


class NotABackend:
    """Has get and set but neither delete nor close."""

    def get(self, key: str) -> bytes | None:
        return None

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        pass


class NamelessGuard:
    def check(self, text: str, where: str) -> GuardResult:
        return GuardResult(text)


class OwnGuard:
    """A guard of the caller's own, not a subclass of anything in llmprod."""

    name = "own"

    def check(self, text: str, where: str) -> GuardResult:
        return GuardResult(text)


# (option, bad value, the field the error names, a piece of what is allowed)
BAD: list[tuple[str, Any, str, str]] = [
    ("prices", {"prompt_per_1k": 1.0}, "prices", "PriceTable"),
    ("prices", 0.5, "prices", "PriceTable"),
    ("cache", 42, "cache", "cache URL"),
    ("cache", "redis:6379", "cache", "scheme://"),
    ("cache", "", "cache", "scheme://"),
    ("cache", NotABackend(), "cache", "missing: delete, close"),
    ("semantic_cache", object(), "semantic_cache", "get/set/delete/close"),
    ("semantic_cache", "no-scheme", "semantic_cache", "scheme://"),
    ("guards", PIIGuard(), "guards", "list of guards"),
    ("guards", "pii", "guards", "list of guards"),
    ("guards", [NamelessGuard()], "guards", "str 'name'"),
    ("guards", [PIIGuard(), "pii"], "guards", "guards[1]"),
    ("limits", TenantLimits(max_concurrent=1), "limits", "Throttle"),
    ("limits", [TenantLimits()], "limits", "Throttle"),
    ("limits", {"free": {"max_concurrent": 1}}, "limits", "TenantLimits"),
    ("limits", {"": TenantLimits()}, "limits", "non-empty str"),
    ("limits", {3: TenantLimits()}, "limits", "non-empty str"),
    ("default_limits", {"max_concurrent": 1}, "default_limits", "TenantLimits"),
    ("max_model_len", 0, "max_model_len", ">= 2"),
    ("max_model_len", 1.5, "max_model_len", "int"),
    ("max_model_len", "512", "max_model_len", "int"),
    ("max_model_len", True, "max_model_len", "int"),
    ("num_threads", 0, "num_threads", ">= 1"),
    ("num_threads", 2.0, "num_threads", "int"),
    ("num_threads", True, "num_threads", "int"),
    ("seed", True, "seed", "[-2**63, 2**64)"),
    ("seed", 1.5, "seed", "int"),
    ("seed", None, "seed", "int"),
    ("seed", 2**64, "seed", "[-2**63, 2**64)"),
    ("seed", -(2**63) - 1, "seed", "[-2**63, 2**64)"),
    ("cache_ttl", 0, "cache_ttl", "> 0"),
    ("cache_ttl", -5.0, "cache_ttl", "> 0"),
    ("cache_ttl", math.inf, "cache_ttl", "finite"),
    ("cache_ttl", math.nan, "cache_ttl", "finite"),
    ("cache_ttl", "3600", "cache_ttl", "number"),
    ("cache_ttl", True, "cache_ttl", "number"),
    ("semantic_threshold", 0, "semantic_threshold", "(0, 1]"),
    ("semantic_threshold", 0.0, "semantic_threshold", "(0, 1]"),
    ("semantic_threshold", 1.01, "semantic_threshold", "(0, 1]"),
    ("semantic_threshold", -0.5, "semantic_threshold", "(0, 1]"),
    ("semantic_threshold", math.nan, "semantic_threshold", "(0, 1]"),
    ("semantic_threshold", True, "semantic_threshold", "(0, 1]"),
    ("max_wait_s", -1.0, "max_wait_s", ">= 0"),
    ("max_wait_s", math.inf, "max_wait_s", "finite"),
    ("max_wait_s", math.nan, "max_wait_s", "finite"),
    ("max_wait_s", "10", "max_wait_s", "number"),
    ("tenant_weights", {"a": -1.0}, "tenant_weights", "> 0"),
    ("tenant_weights", {"a": 0}, "tenant_weights", "> 0"),
    ("tenant_weights", {"a": math.nan}, "tenant_weights", "finite"),
    ("tenant_weights", {"a": math.inf}, "tenant_weights", "finite"),
    ("tenant_weights", {"a": True}, "tenant_weights", "finite number"),
    ("tenant_weights", {"a": "2"}, "tenant_weights", "finite number"),
    ("tenant_weights", {5: 1.0}, "tenant_weights", "non-empty str"),
    ("tenant_weights", [("a", 1.0)], "tenant_weights", "{tenant: weight}"),
    ("cache_scope", "global", "cache_scope", "'tenant', 'shared'"),
    ("cache_scope", None, "cache_scope", "'tenant', 'shared'"),
    ("cache_scope", "Tenant", "cache_scope", "'tenant', 'shared'"),
    ("allow_special_tokens_in_content", 1, "allow_special_tokens_in_content", "True"),
    (
        "allow_special_tokens_in_content",
        "no",
        "allow_special_tokens_in_content",
        "True",
    ),
    (
        "allow_special_tokens_in_content",
        None,
        "allow_special_tokens_in_content",
        "True",
    ),
    ("dtype", "fp8", "dtype", "float32"),
    ("dtype", ["float32"], "dtype", "float32"),
    ("device", "gpu", "device", "cuda[:N]"),
    ("device", "cudax", "device", "cuda[:N]"),
    ("device", 0, "device", "cuda[:N]"),
    ("attention_backend", "flash", "attention_backend", "triton"),
    ("linear_backend", "mkl", "linear_backend", "onednn"),
    ("greedy_screening", True, "greedy_screening", "'on'"),
    ("model_impl", "fast", "model_impl", "generic"),
    ("quantization", "int3", "quantization", "int4"),
    ("quantization_group_size", 48, "quantization_group_size", "32, 64 or 128"),
    ("quantization_skip", "lm_head", "quantization_skip", "module names"),
    ("quantization_skip", 3, "quantization_skip", "module names"),
    ("quantization_skip", ["lm_head", 3], "quantization_skip", "module names"),
    ("block_size", 12, "block_size", "power of two"),
    ("block_size", 0, "block_size", "power of two"),
    ("block_size", "16", "block_size", "power of two"),
    ("block_size", 16.0, "block_size", "power of two"),
    ("num_kv_blocks", 1, "num_kv_blocks", ">= 2"),
    ("num_kv_blocks", "64", "num_kv_blocks", "int"),
    ("kv_cache_memory", "lots", "kv_cache_memory", "512MiB"),
    ("kv_cache_memory", -1, "kv_cache_memory", "> 0"),
    ("kv_cache_memory", True, "kv_cache_memory", "size"),
    ("enable_prefix_caching", "yes", "enable_prefix_caching", "True"),
    ("max_num_seqs", 0, "max_num_seqs", ">= 1"),
    ("max_num_seqs", 4.0, "max_num_seqs", "int"),
    ("max_num_seqs", 2048, "max_num_seqs", "max_num_batched_tokens"),
    ("max_num_batched_tokens", "1024", "max_num_batched_tokens", "int"),
    ("cache_config", {"block_size": 16}, "cache_config", "CacheConfig"),
    ("scheduler_config", SchedulerConfig, "scheduler_config", "SchedulerConfig"),
]


def _show(value: object) -> str:
    """A test id: the value's repr, or its type where the repr has an address."""
    text = repr(value)
    return type(value).__name__ if " at 0x" in text else text[:40]


@pytest.mark.parametrize(
    ("option", "value", "field", "allowed"),
    BAD,
    ids=[f"{b[0]}={_show(b[1])}" for b in BAD],
)
def test_bad_option_names_field_value_and_what_is_allowed(
    option: str, value: Any, field: str, allowed: str
) -> None:
    with pytest.raises(InvalidConfigError) as info:
        EngineConfig.from_kwargs(**{option: value})
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    msg = str(info.value)
    assert field in msg and allowed in msg, msg


# A few bad options through the public entry point, with a model that does not
# exist: had the model been looked up first, its error would have come instead.
EARLY = [
    ("prices", {"prompt_per_1k": 1.0}),
    ("cache", 42),
    ("guards", [NamelessGuard()]),
    ("limits", {"free": 5}),
    ("seed", 2**64),
    ("semantic_threshold", 0.0),
    ("tenant_weights", {"a": -1.0}),
    ("cache_scope", "global"),
    ("allow_special_tokens_in_content", "yes"),
]


@pytest.mark.parametrize(("option", "value"), EARLY, ids=[e[0] for e in EARLY])
def test_from_pretrained_checks_options_before_the_model(
    tmp_path: Path, option: str, value: Any
) -> None:
    for model in ("no-such-model", str(tmp_path / "missing-folder")):
        with pytest.raises(InvalidConfigError) as info:
            Engine.from_pretrained(model, **{option: value})
        assert info.value.field == option, str(info.value)


def test_the_missing_model_alone_is_reported_by_its_own_error() -> None:
    # The check above would be void if a missing model raised nothing.
    with pytest.raises(InvalidConfigError, match="smollm2-135m") as info:
        Engine.from_pretrained("no-such-model")
    assert info.value.field not in {option for option, _ in EARLY}


GOOD: list[dict[str, Any]] = [
    {},
    {"prices": None},
    {"prices": PriceTable(prompt_per_1k=0.5, completion_per_1k=1.5)},
    {"cache": "memory://"},
    {"cache": "redis://127.0.0.1:6379/0", "semantic_cache": "diskcache:///tmp/x"},
    {"cache": "fsspec+memory://bucket/prefix"},
    {"cache": MemoryCache()},
    {"semantic_cache": TieredCache([MemoryCache(), MemoryCache()])},
    {"guards": None},
    {"guards": []},
    {"guards": [PIIGuard(action="redact"), BlockListGuard(["forbidden"])]},
    {"guards": (OwnGuard(),)},
    {"limits": None, "default_limits": None},
    {"limits": {"free": TenantLimits(requests_per_second=2.0)}},
    {"limits": Throttle({"a": TenantLimits(max_concurrent=1)})},
    {"default_limits": TenantLimits(max_concurrent=8)},
    {"max_model_len": None},
    {"max_model_len": 2},
    {"max_model_len": 8192},
    {"num_threads": None},
    {"num_threads": 1},
    {"seed": 0},
    {"seed": -(2**63)},
    {"seed": 2**64 - 1},
    {"cache_ttl": None},
    {"cache_ttl": 3600},
    {"cache_ttl": 0.5},
    {"semantic_threshold": None},
    {"semantic_threshold": 1},
    {"semantic_threshold": 0.9},
    {"semantic_threshold": 1e-6},
    {"max_wait_s": None},
    {"max_wait_s": 0},
    {"max_wait_s": 2.5},
    {"tenant_weights": None},
    {"tenant_weights": {}},
    {"tenant_weights": {"a": 2, "b": 0.5}},
    {"cache_scope": "tenant"},
    {"cache_scope": "shared"},
    {"allow_special_tokens_in_content": True},
    {"allow_special_tokens_in_content": False},
    {"device": "cpu"},
    {"device": "cuda:1"},
    {"quantization": "int8", "quantization_skip": ["embed_tokens"]},
    {"quantization_skip": ()},
    {"block_size": 16, "num_kv_blocks": 2, "kv_cache_memory": "64MiB"},
    {"kv_cache_memory": 1 << 20, "enable_prefix_caching": False},
    {"max_num_seqs": 8, "max_num_batched_tokens": 16},
    {"cache_config": CacheConfig(block_size=8)},
    {"scheduler_config": SchedulerConfig(max_num_seqs=4), "max_wait_s": 1.0},
]


@pytest.mark.parametrize("kwargs", GOOD, ids=[_show(sorted(g)) for g in GOOD])
def test_valid_options_are_accepted_as_given(kwargs: dict[str, Any]) -> None:
    config = EngineConfig.from_kwargs(**kwargs)
    subs = (config, config.cache_config, config.scheduler_config)
    for name, value in kwargs.items():
        if name in ("cache_config", "scheduler_config", "quantization_skip"):
            continue
        assert any(
            getattr(c, name, object()) is value or getattr(c, name, None) == value
            for c in subs
        ), name


def test_new_options_default_to_isolation() -> None:
    config = EngineConfig()
    assert config.cache_scope == "tenant"
    assert config.allow_special_tokens_in_content is False


def test_sub_config_and_flat_options_merge() -> None:
    config = EngineConfig.from_kwargs(
        cache_config=CacheConfig(block_size=8), num_kv_blocks=64
    )
    assert (config.cache_config.block_size, config.cache_config.num_kv_blocks) == (
        8,
        64,
    )
    with pytest.raises(InvalidConfigError) as info:
        EngineConfig.from_kwargs(cache_config=CacheConfig(block_size=8), block_size=3)
    assert info.value.field == "block_size"


def test_quantization_skip_reads_any_iterable_once() -> None:
    names = (n for n in ["embed_tokens"])
    config = EngineConfig.from_kwargs(quantization_skip=names)
    assert config.quantization_skip == ("embed_tokens",)


def test_tenant_weights_are_copied_after_the_check() -> None:
    weights = {"a": 2.0}
    config = EngineConfig.from_kwargs(tenant_weights=weights)
    weights["a"] = -1.0
    assert config.scheduler_config.tenant_weights == {"a": 2.0}


def test_sub_configs_check_on_their_own() -> None:
    with pytest.raises(InvalidConfigError) as info:
        CacheConfig(block_size=3)
    assert info.value.field == "block_size"
    with pytest.raises(InvalidConfigError) as info:
        SchedulerConfig(tenant_weights={"a": -1.0})
    assert info.value.field == "tenant_weights"
    with pytest.raises(InvalidConfigError) as info:
        EngineConfig(cache_scope="all")
    assert info.value.field == "cache_scope"


def test_zero_semantic_threshold_is_refused_not_replaced_by_the_default() -> None:
    """0 used to become 0.90 silently (``threshold or default``)."""
    with pytest.raises(InvalidConfigError, match=r"semantic_threshold=0\b"):
        EngineConfig.from_kwargs(semantic_cache="memory://", semantic_threshold=0)


def test_config_imports_without_torch_or_numpy() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
        "import llmprod.config as c\n"
        "from llmprod.ops.limits import TenantLimits\n"
        "from llmprod.ops.pricing import PriceTable\n"
        "c.EngineConfig.from_kwargs(prices=PriceTable(), guards=[],\n"
        "    limits={'a': TenantLimits(max_concurrent=1)}, cache='memory://')\n"
        "try:\n"
        "    c.EngineConfig.from_kwargs(prices=1)\n"
        "except c.InvalidConfigError as e:\n"
        "    assert e.field == 'prices'\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
