"""LoRA adapters: PEFT adapters built here on the real SmolLM2 (random LoRA
weights with non-zero B, so each adapter changes the output), served per request
in mixed batches and checked against PEFT's own generate."""

from __future__ import annotations

import gc
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llmprod import Engine, SamplingParams
from llmprod.errors import (
    InvalidConfigError,
    InvalidRequestError,
    UnsupportedModelError,
)
from llmprod.lora.layers import LoRABatch
from tests.helpers import drain, first_divergence, hf_greedy, wait_idle
from tests.prompts import PARAGRAPH, TEXT_PROMPTS

pytest.importorskip("peft")

MODEL = "smollm2-135m"
MAX_NEW = 12
TIE_GAP = 1e-3  # as in the greedy-equality tests
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (LoraConfig fields, seed); every kind the loader reads: plain scaling,
# rsLoRA, a rank pattern and an alpha pattern, a subset of the projections.
SPECS: dict[str, tuple[dict[str, Any], int]] = {
    "a8": ({"r": 8, "lora_alpha": 16, "target_modules": ALL}, 1),
    "b16": (
        {
            "r": 16,
            "lora_alpha": 32,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "use_rslora": True,
        },
        2,
    ),
    "c8": (
        {
            "r": 8,
            "lora_alpha": 8,
            "target_modules": ["gate_proj", "up_proj", "o_proj"],
            "rank_pattern": {"o_proj": 4},
            "alpha_pattern": {"gate_proj": 24},
        },
        3,
    ),
}
PROMPTS = [*TEXT_PROMPTS[:6], PARAGRAPH * 3 + "Summary:"]


def peft_model(base_path: Path, fields: dict[str, Any], seed: int) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **fields))
    model.eval()
    return model


@pytest.fixture(scope="module")
def lora_engine() -> Iterator[Engine]:
    eng = Engine.from_pretrained(MODEL, dtype="float32", seed=0, max_loras=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def adapters(
    lora_engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, list[tuple[list[int], list[torch.Tensor]]]]]:
    """Each adapter's folder and PEFT's greedy tokens (and scores) per prompt."""
    root = tmp_path_factory.mktemp("adapters")
    ids = [lora_engine.tokenizer.encode(p) for p in PROMPTS]
    out = {}
    for name, (fields, seed) in SPECS.items():
        model = peft_model(lora_engine.model_path, fields, seed)
        model.save_pretrained(root / name)
        out[name] = (root / name, [hf_greedy(model, p, MAX_NEW) for p in ids])
        del model
        gc.collect()
    for name, (path, _) in out.items():
        lora_engine.load_adapter(name, path)
    return out


def assert_peft_equal(tokens: list[int], ref: tuple[list[int], Any], what: str) -> None:
    d = first_divergence(tokens, ref[0], ref[1])
    if d is not None:
        pos, gap = d
        assert gap < TIE_GAP, f"{what}: token {pos} differs from PEFT at gap {gap:.2e}"


GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0)


def test_mixed_batch_rows_equal_peft_and_their_solo_runs(
    lora_engine: Engine, adapters: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    names: list[str | None] = [*adapters, None]
    # Every prompt under every adapter and the base, interleaved in one batch.
    prompts = [p for p in PROMPTS for _ in names]
    chosen = [n for _ in PROMPTS for n in names]
    lora = lora_engine.admission.lora
    assert lora is not None
    modes: set[str | None] = set()
    set_batch = LoRABatch.set

    def spy(self: LoRABatch, slots: list[int], device: torch.device) -> None:
        set_batch(self, slots, device)
        modes.add(self.mode)

    monkeypatch.setattr(LoRABatch, "set", spy)
    mixed = lora_engine.generate(prompts, GREEDY, adapter=chosen)
    monkeypatch.undo()
    # Three adapters in one step: decode steps through every slot at once
    # ("dense"; two groups or fewer gather per group: the next test; every path
    # against the others: test_every_grouping_gives_the_same_deltas).
    assert "dense" in modes, modes
    base = lora_engine.generate(PROMPTS, GREEDY)
    for name in adapters:
        solo = lora_engine.generate(PROMPTS, GREEDY, adapter=name)
        for i in range(len(PROMPTS)):
            row = mixed[i * len(names) + names.index(name)]
            what = f"{name} prompt {i}"
            assert_peft_equal(row.token_ids, adapters[name][1][i], what)
            assert row.token_ids == solo[i].token_ids, what
        differs = sum(s.token_ids != b.token_ids for s, b in zip(solo, base))
        assert differs >= len(PROMPTS) // 2, f"{name} barely changes the output"
    for i in range(len(PROMPTS)):
        assert mixed[i * len(names) + len(adapters)].token_ids == base[i].token_ids


def test_every_grouping_gives_the_same_deltas(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ways of applying a step's deltas (one adapter for all, runs of
    tokens with the tokens outside them gathered, gathered groups, padded
    batched products, dense with a one-hot mask) against a plain per-token sum,
    on random stacked slots of two shards."""
    from llmprod.lora import layers
    from llmprod.lora.layers import LoRALinear

    torch.manual_seed(0)
    slots_n, d_in, r, outs = 5, 12, 4, (6, 3)
    base = torch.nn.Linear(d_in, sum(outs), bias=False)
    a = torch.randn(slots_n, d_in, 2 * r)
    b = [torch.randn(slots_n, r, o) for o in outs]
    x = torch.randn(9, d_in)

    def want(slots: list[int]) -> torch.Tensor:
        y = base(x)
        for i, s in enumerate(slots):
            if s >= 0:
                xa = x[i] @ a[s]
                y[i] += torch.cat([xa[j * r : (j + 1) * r] @ b[j][s] for j in range(2)])
        return y

    cases = {
        "all": [2] * 9,
        "runs": [0, 0, 0, 1, -1, 1, 1, 1, 2],
        "groups": [1, -1, 1, 1, -1, 1, 1, 1, -1],
        "padded": [0, 1, 2, 3, 4, 0, 1, 2, -1],
        "dense": [0, 1, 2, 3, 4, 0, 1, 2, -1],
    }
    for mode, slots in cases.items():
        batch = LoRABatch()
        monkeypatch.setattr(
            layers, "DENSE_MAX_TOKEN_SLOTS", 10_000 if mode == "dense" else 0
        )
        monkeypatch.setattr(layers, "RUNS_MIN_LENGTH", 3 if mode == "runs" else 99)
        batch.set(slots, x.device)
        assert batch.mode == mode, (mode, batch.mode)
        if mode == "runs":  # two runs; tokens 3 and 8 gathered, one group each
            assert batch.runs == [(0, 0, 3), (1, 5, 8)]
            assert batch.rest is not None and batch.rest.mode == "groups"
        layer = LoRALinear(base, batch)
        layer.a, layer.b, layer.rank = a, b, r
        with torch.no_grad():
            torch.testing.assert_close(layer(x), want(slots), rtol=1e-5, atol=1e-5)


def test_one_adapter_beside_base_rows_and_alone(
    lora_engine: Engine, adapters: dict[str, Any]
) -> None:
    # Two groups (one adapter and the base) and a batch all on one adapter.
    two = lora_engine.generate(PROMPTS[:4], GREEDY, adapter=["b16", None, "b16", None])
    alone = lora_engine.generate(PROMPTS[:4], GREEDY, adapter="b16")
    for i in (0, 2):
        assert two[i].token_ids == alone[i].token_ids
        assert_peft_equal(two[i].token_ids, adapters["b16"][1][i], f"prompt {i}")


def test_streaming_seeds_and_metrics_per_adapter(
    lora_engine: Engine, adapters: dict[str, Any]
) -> None:
    deltas, err = drain(lora_engine.stream(PROMPTS[0], GREEDY, adapter="a8"))
    assert err is None
    assert [t for d in deltas for t in d.token_ids] == adapters["a8"][1][0][0]
    sampled = SamplingParams(max_tokens=MAX_NEW, temperature=0.9, seed=7)
    first = lora_engine.generate(PROMPTS[:3], sampled, adapter="c8")
    again = lora_engine.generate(PROMPTS[:3], sampled, adapter=["c8", "c8", "c8"])
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    row = lora_engine.metrics().adapters["c8"]
    assert row["completed"] >= 6 and row["completion_tokens"] > 0
    assert row["mean_e2e_s"] > 0


def test_router_passes_adapters_per_request(
    lora_engine: Engine, adapters: dict[str, Any]
) -> None:
    from llmprod.router import CascadePolicy, Router

    # Every answer escalates, so each request runs on both names with its own
    # adapter, the per-prompt list cut down to each engine call's requests.
    router = Router(
        {"small": lora_engine, "large": lora_engine}, CascadePolicy(min_confidence=1.0)
    )
    chosen: list[str | None] = ["a8", None, "c8"]
    outs = router.generate(PROMPTS[:3], GREEDY, adapter=chosen)
    assert all(o.flags["route"]["tried"] == ["small", "large"] for o in outs)
    for i, name in enumerate(chosen):
        ref = lora_engine.generate(PROMPTS[i], GREEDY, adapter=name)[0]
        assert outs[i].token_ids == ref.token_ids, name
    deltas, err = drain(router.stream(PROMPTS[0], GREEDY, adapter="a8"))
    assert err is None
    assert deltas[-1].completion is not None
    assert deltas[-1].completion.token_ids == outs[0].token_ids
    with pytest.raises(InvalidRequestError, match="2 entries for 3 prompts"):
        router.generate(PROMPTS[:3], GREEDY, adapter=["a8", None])


def test_prometheus_labels_adapters(lora_engine: Engine, adapters: Any) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from llmprod.ops.prometheus import SnapshotCollector

    lora_engine.generate(PROMPTS[0], GREEDY, adapter="a8")
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lora_engine.metrics))
    text = generate_latest(registry).decode()
    assert 'llmprod_adapters_completion_tokens_total{adapter="a8"}' in text


def test_adapter_errors_name_the_field(
    lora_engine: Engine, adapters: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(InvalidRequestError, match="'nope' is not loaded") as e:
        lora_engine.generate("hi", GREEDY, adapter="nope")
    assert e.value.field == "adapter"
    with pytest.raises(InvalidRequestError, match="2 entries for 3 prompts"):
        lora_engine.generate(PROMPTS[:3], GREEDY, adapter=["a8", None])
    with pytest.raises(InvalidConfigError, match=r"no adapter_config\.json") as c:
        lora_engine.load_adapter("x", tmp_path)
    assert c.value.field == "path"
    # A module this model does not adapt (the embedding), and a target name it
    # does not have.
    bad = tmp_path / "bad"
    shutil.copytree(adapters["a8"][0], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "embed_tokens"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidConfigError, match="embed_tokens") as c:
        lora_engine.load_adapter("x", bad)
    assert c.value.field == "target_modules"
    assert "x" not in lora_engine.adapters()


def test_rank_above_max_lora_rank_and_lm_head_target_refused(
    make_engine: Callable[..., Engine], adapters: dict[str, Any], tmp_path: Path
) -> None:
    eng = make_engine(MODEL, max_lora_rank=8)
    with pytest.raises(InvalidConfigError, match="max_lora_rank=8") as e:
        eng.load_adapter("b16", adapters["b16"][0])
    assert e.value.field == "max_lora_rank"
    model = peft_model(eng.model_path, {"r": 4, "target_modules": ["lm_head"]}, 0)
    model.save_pretrained(tmp_path / "head")
    with pytest.raises(InvalidConfigError, match="lm_head") as e:
        eng.load_adapter("head", tmp_path / "head")
    assert e.value.field == "target_modules"


def test_generic_model_path_refuses_adapters(
    make_engine: Callable[..., Engine], adapters: dict[str, Any]
) -> None:
    eng = make_engine(MODEL, model_impl="generic")
    with pytest.raises(UnsupportedModelError, match="native model path") as e:
        eng.load_adapter("a8", adapters["a8"][0])
    assert e.value.field == "model_impl"


def test_changed_adapter_under_same_name_serves_no_stale_kv_or_answers(
    make_engine: Callable[..., Engine], adapters: dict[str, Any]
) -> None:
    # Both the answer cache and the prefix cache are on: a reloaded adapter
    # with new weights must reach neither's old entries.
    eng = make_engine(MODEL, cache="memory://")
    eng.load_adapter("live", adapters["a8"][0])
    first = eng.generate(PROMPTS[6], GREEDY, adapter="live")[0]
    assert_peft_equal(first.token_ids, adapters["a8"][1][6], "a8")
    eng.load_adapter("live", adapters["b16"][0])
    second = eng.generate(PROMPTS[6], GREEDY, adapter="live")[0]
    assert second.cache_hit is None
    assert second.usage.cached_prompt_tokens == 0
    assert_peft_equal(second.token_ids, adapters["b16"][1][6], "b16 under a8's name")
    base = eng.generate(PROMPTS[6], GREEDY)[0]
    assert base.cache_hit is None and base.usage.cached_prompt_tokens == 0
    # The same content again is the same adapter: its cached answer serves.
    again = eng.generate(PROMPTS[6], GREEDY, adapter="live")[0]
    assert again.cache_hit is not None and again.token_ids == second.token_ids


def test_eviction_pins_and_unload_free_memory(
    make_engine: Callable[..., Engine], adapters: dict[str, Any]
) -> None:
    eng = make_engine(MODEL, max_loras=2, max_num_seqs=4)
    eng.load_adapter("a8", adapters["a8"][0])
    eng.load_adapter("b16", adapters["b16"][0])
    eng.generate(PROMPTS[0], GREEDY, adapter="a8")  # b16 is now the least recent
    eng.load_adapter("c8", adapters["c8"][0])
    assert set(eng.adapters()) == {"a8", "c8"}

    def check(name: str) -> None:  # still PEFT's tokens after its slot moved
        out = eng.generate(PROMPTS[0], GREEDY, adapter=name)[0]
        assert_peft_equal(out.token_ids, adapters[name][1][0], name)

    check("a8")  # its slots shrank from rank 16 to 8 when b16 left
    lora = eng.admission.lora
    assert lora is not None and lora.nbytes > 0
    # A request in flight pins its adapter: not replaced, unloaded or evicted.
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    stream = eng.stream(PROMPTS[1], long, adapter="a8")
    next(stream)
    assert eng.adapters()["a8"].in_flight == 1
    with pytest.raises(InvalidRequestError, match="in flight"):
        eng.unload_adapter("a8")
    with pytest.raises(InvalidRequestError, match="in flight"):
        eng.load_adapter("a8", adapters["b16"][0])
    eng.load_adapter("b16", adapters["b16"][0])  # evicts the idle c8, not a8
    assert set(eng.adapters()) == {"a8", "b16"}
    stream.close()
    wait_idle(eng)
    check("a8")  # and grew back to 16
    check("b16")
    assert eng.adapters()["a8"].in_flight == 0
    eng.unload_adapter("a8")
    eng.unload_adapter("b16")
    assert eng.adapters() == {} and lora.nbytes == 0
    with pytest.raises(InvalidRequestError, match="not loaded"):
        eng.generate(PROMPTS[0], GREEDY, adapter="a8")


def test_int8_base_and_speculative_decoding_keep_adapters(
    make_engine: Callable[..., Engine], adapters: dict[str, Any]
) -> None:
    # int8 base weights with a float adapter: mixed batch rows equal solo runs
    # and differ from the base.
    q = make_engine(MODEL, quantization="int8")
    q.load_adapter("a8", adapters["a8"][0])
    mixed = q.generate(PROMPTS[:4], GREEDY, adapter=["a8", None, "a8", None])
    solo = q.generate(PROMPTS[:4], GREEDY, adapter="a8")
    base = q.generate(PROMPTS[:4], GREEDY)
    assert [mixed[i].token_ids for i in (0, 2)] == [solo[i].token_ids for i in (0, 2)]
    assert [mixed[i].token_ids for i in (1, 3)] == [base[i].token_ids for i in (1, 3)]
    assert sum(s.token_ids != b.token_ids for s, b in zip(solo, base)) >= 2
    # Speculative decoding verifies with the adapter on: PEFT's tokens again.
    s = make_engine(MODEL, speculative={"method": "ngram"})
    s.load_adapter("c8", adapters["c8"][0])
    for i, c in enumerate(s.generate(PROMPTS, GREEDY, adapter="c8")):
        assert_peft_equal(c.token_ids, adapters["c8"][1][i], f"prompt {i}")
