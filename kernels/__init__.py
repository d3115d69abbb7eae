"""Triton kernels for the paged KV cache.

``store_kv`` writes new keys and values into the cache; ``paged_attention`` runs
causal varlen attention over it. Both need the optional ``triton`` dependency
(``pip install llmprod[triton]``). Without it this package still imports, and
calling either function raises ``ImportError`` saying what to install.

Importing this package does not import Triton: the kernels load on the first use
of ``store_kv``, ``paged_attention`` or ``HAS_TRITON`` (Triton's import alone
costs about 70 MB of resident memory, which a CPU-only engine never needs).

On a machine without CUDA, set ``TRITON_INTERPRET=1`` before the kernels first
load to run them in Triton's interpreter on CPU tensors (slow; for tests). See
docs/kernels.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HAS_TRITON", "paged_attention", "store_kv"]

_LAZY = frozenset(__all__)


def _missing_triton(name: str, error: ImportError) -> Any:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise ImportError(
            f"llmprod.kernels.{name} needs Triton, which is not installed "
            f"({error}); install it with: pip install llmprod[triton]"
        )

    unavailable.__name__ = name
    unavailable.__doc__ = "Unavailable: Triton is not installed."
    return unavailable


def _load() -> None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        names = {
            "HAS_TRITON": False,
            "store_kv": _missing_triton("store_kv", exc),
            "paged_attention": _missing_triton("paged_attention", exc),
        }
    else:
        from llmprod.kernels.triton_paged_attention import paged_attention
        from llmprod.kernels.triton_store_kv import store_kv

        names = {
            "HAS_TRITON": True,
            "store_kv": store_kv,
            "paged_attention": paged_attention,
        }
    globals().update(names)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
