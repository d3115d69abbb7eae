"""LLMProdLM (lm-evaluation-harness) against lm-eval's own ``hf`` backend on the
same SmolLM2-135M weights, through lm-eval's ``simple_evaluate`` on the local
tasks of tests/data/lm_eval (SOURCE.md there): every loglikelihood equal within
1e-4, identical generate_until outputs, identical accuracy. The default run
takes the first documents of each task; the ``slow`` test runs them whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lm_eval")

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from llmprod import Engine
from llmprod.integrations.lm_eval import LLMProdLM

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["llmprod_mc", "llmprod_gen"]
LL_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hf_lm(hf_model: Any, engine: Engine) -> HFLM:
    return HFLM(pretrained=hf_model, tokenizer=engine.tokenizer, batch_size=8)


@pytest.fixture(scope="module")
def llmprod_lm(engine: Engine) -> LLMProdLM:
    return LLMProdLM(engine=engine)


@pytest.fixture(scope="module")
def tasks() -> TaskManager:
    # Built once: it indexes every task lm-eval ships, which takes seconds.
    return TaskManager(include_path=str(ROOT / "tests/data/lm_eval"))


def evaluate(lm: Any, tasks: TaskManager, limit: int | None) -> dict[str, Any]:
    """lm-eval's simple_evaluate on the local tasks (their data paths are
    relative to the repository root)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=TASKS,
            task_manager=tasks,
            limit=limit,
            log_samples=True,
            bootstrap_iters=0,
        )
    assert out is not None
    return out


def assert_same_results(hf: dict[str, Any], ours: dict[str, Any]) -> None:
    for task in TASKS:
        hf_docs = sorted(hf["samples"][task], key=lambda s: s["doc_id"])
        our_docs = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        assert len(hf_docs) == len(our_docs) > 0
        for h, o in zip(hf_docs, our_docs):
            if task == "llmprod_mc":
                # One (loglikelihood, is_greedy) per choice.
                for (h_ll, h_greedy), (o_ll, o_greedy) in zip(
                    (r[0] for r in h["resps"]), (r[0] for r in o["resps"])
                ):
                    assert abs(h_ll - o_ll) <= LL_TOLERANCE, (h["doc"], h_ll, o_ll)
                    assert h_greedy == o_greedy, h["doc"]
            else:
                assert h["resps"] == o["resps"], h["doc"]
    for task, metric in (
        ("llmprod_mc", "acc,none"),
        ("llmprod_gen", "exact_match,strip"),
    ):
        assert hf["results"][task][metric] == ours["results"][task][metric], task


def test_first_documents_score_as_the_hf_backend(
    hf_lm: HFLM, llmprod_lm: LLMProdLM, tasks: TaskManager
) -> None:
    # 12 questions (48 loglikelihoods) and 12 generations.
    assert_same_results(evaluate(hf_lm, tasks, 12), evaluate(llmprod_lm, tasks, 12))


@pytest.mark.slow
def test_whole_tasks_score_as_the_hf_backend(
    hf_lm: HFLM, llmprod_lm: LLMProdLM, tasks: TaskManager
) -> None:
    hf, ours = evaluate(hf_lm, tasks, None), evaluate(llmprod_lm, tasks, None)
    assert_same_results(hf, ours)
    # The model knows some of it: the comparison is not between two zeros.
    assert ours["results"]["llmprod_mc"]["acc,none"] > 0.3
    assert ours["results"]["llmprod_gen"]["exact_match,strip"] > 0.1


def test_continuations_of_one_context_reuse_its_kv_blocks(
    hf_lm: HFLM, llmprod_lm: LLMProdLM, engine: Engine
) -> None:
    # Multi-token continuations of one context: the first runs it, the others
    # take its whole blocks from the prefix cache and score the same.
    ctx = (
        "Question: Which harbour town on the northern coast keeps the oldest "
        "working lighthouse, lit every night since the storm of the long "
        "winter?\nAnswer:"
    )
    conts = [" the town of Wick", " a village by the cliffs", " nobody knows it"]
    reqs = [Instance("loglikelihood", {}, (ctx, c), i) for i, c in enumerate(conts)]
    before = engine.kv.num_prefix_hit_tokens
    ours = llmprod_lm.loglikelihood(reqs)
    hits = engine.kv.num_prefix_hit_tokens - before
    ctx_len = len(llmprod_lm.tok_encode(ctx))
    assert ctx_len >= 2 * engine.block_size
    whole = ctx_len // engine.block_size * engine.block_size
    assert hits >= (len(conts) - 1) * (whole - engine.block_size)
    for (h_ll, h_greedy), (o_ll, o_greedy) in zip(hf_lm.loglikelihood(reqs), ours):
        assert o_ll == pytest.approx(h_ll, abs=LL_TOLERANCE)
        assert o_greedy == h_greedy


def test_rolling_loglikelihood_over_several_windows(
    hf_model: Any, engine: Engine
) -> None:
    # A 32-token window makes the ~70-token text span three windows.
    hf = HFLM(pretrained=hf_model, tokenizer=engine.tokenizer, max_length=32)
    ours = LLMProdLM(engine=engine, max_length=32)
    text = (
        "It was the best of times, it was the worst of times, it was the age of "
        "wisdom, it was the age of foolishness, it was the epoch of belief, it "
        "was the epoch of incredulity, it was the season of Light."
    )
    reqs = [
        Instance("loglikelihood_rolling", {}, (s,), i)
        for i, s in enumerate([text, "Hello world."])
    ]
    for h, o in zip(hf.loglikelihood_rolling(reqs), ours.loglikelihood_rolling(reqs)):
        assert o == pytest.approx(h, abs=LL_TOLERANCE)


def test_command_line_registers_llmprod_and_runs_lm_eval() -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "llmprod.integrations.lm_eval",
            "--model_args", "pretrained=smollm2-135m,dtype=float32",
            "--tasks", "llmprod_gen", "--include_path", "tests/data/lm_eval",
            "--limit", "2",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llmprod_gen" in proc.stdout
    assert "llmprod" in proc.stdout  # the results header names the model
