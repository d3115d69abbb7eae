"""The llmprod.testing contract suite over every registered backend (real servers).

The ``backend`` and ``backend_spec`` fixtures come from ``conftest.py``: one param
per registered scheme plus a tiered cache.
"""

from __future__ import annotations

from llmprod.testing import BackendContract


class TestBackendContract(BackendContract):
    """Runs every contract test for each backend param."""
