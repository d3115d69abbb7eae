"""Triton kernels for the paged KV cache.

``store_kv`` writes new keys and values into the cache; ``paged_attention`` runs
causal varlen attention over it. Both need the optional ``triton`` dependency
(``pip install llmprod[triton]``). Without it this package still imports, and
calling either function raises ``ImportError`` saying what to install.

On a machine without CUDA, set ``TRITON_INTERPRET=1`` before the first import of
this package to run the kernels in Triton's interpreter on CPU tensors (slow;
for tests). See docs/kernels.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HAS_TRITON", "paged_attention", "store_kv"]

try:
    import triton  # noqa: F401
except ImportError as exc:
    HAS_TRITON = False
    _TRITON_IMPORT_ERROR: ImportError | None = exc

    def _missing_triton(name: str) -> ImportError:
        return ImportError(
            f"llmprod.kernels.{name} needs Triton, which is not installed "
            f"({_TRITON_IMPORT_ERROR}); install it with: pip install llmprod[triton]"
        )

    def store_kv(*args: Any, **kwargs: Any) -> None:
        """Unavailable: Triton is not installed (``pip install llmprod[triton]``)."""
        raise _missing_triton("store_kv")

    def paged_attention(*args: Any, **kwargs: Any) -> Any:
        """Unavailable: Triton is not installed (``pip install llmprod[triton]``)."""
        raise _missing_triton("paged_attention")

else:
    HAS_TRITON = True
    _TRITON_IMPORT_ERROR = None
    # `from .x import x` leaves the package attribute bound to the function, not
    # to the submodule of the same name.
    from llmprod.kernels.paged_attention import paged_attention
    from llmprod.kernels.store_kv import store_kv
