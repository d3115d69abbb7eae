"""The examples in llmprod's docstrings run and give what they show.

Every module of llmprod/ whose source holds a ``>>>`` is a case of its own. A
module whose examples doctest cannot find (a nested function, a typo in the
prompt) fails rather than passing with nothing run; one whose examples are all
marked ``+SKIP`` (they need a model download) is reported as skipped.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import llmprod

PACKAGE = Path(llmprod.__file__).parent


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ">>>" not in path.read_text(encoding="utf-8"):
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


MODULES = _modules_with_examples()


def test_the_scan_finds_the_known_examples() -> None:
    # A guard on the scan itself: these modules have had examples for long.
    assert {"llmprod.config", "llmprod.sched.scheduler", "llmprod.cache"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(module)
    assert sum(len(t.examples) for t in tests) > 0, (
        f"{name} holds '>>>' but doctest finds no example in it"
    )
    report: list[str] = []
    runner = doctest.DocTestRunner(verbose=False)
    for test in tests:
        runner.run(test, out=report.append)
    failed, attempted = runner.summarize(verbose=False)
    if attempted == 0:
        pytest.skip(f"every example of {name} is marked +SKIP")
    assert failed == 0, "".join(report)
