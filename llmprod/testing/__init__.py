"""Test helpers shipped with llmprod, for llmprod's own tests and for third parties.

:mod:`llmprod.testing.backend_contract` holds the contract suite a cache backend
must pass; see :class:`BackendContract`. It needs pytest.
"""

from __future__ import annotations

from llmprod.testing.backend_contract import BackendContract, BackendSpec, value_for

__all__ = ["BackendContract", "BackendSpec", "value_for"]
