"""The host projects' suites (langchain-tests) write their async tests without an
asyncio marker, for projects that run pytest-asyncio in auto mode; mark them as
they are collected here, so they run under the repository's strict mode."""

from __future__ import annotations

import inspect
from typing import Any

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: Any) -> None:
    if (
        name.startswith("test")
        and inspect.iscoroutinefunction(obj)
        and not any(m.name == "asyncio" for m in getattr(obj, "pytestmark", []))
    ):
        pytest.mark.asyncio(obj)
