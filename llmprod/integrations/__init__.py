"""Adapters that put an :class:`~llmprod.Engine` where users already work.

Each module wraps one host project and needs its extra; none is imported by
``import llmprod``:

- :mod:`llmprod.integrations.langchain`: ``ChatLLMProd``, a LangChain chat model
  (``pip install 'llmprod[langchain]'``).
- :mod:`llmprod.integrations.llamaindex`: ``LLMProdLLM``, a LlamaIndex LLM
  (``pip install 'llmprod[llamaindex]'``).
- :mod:`llmprod.integrations.lm_eval`: ``LLMProdLM``, an lm-evaluation-harness
  model registered as ``"llmprod"`` (``pip install 'llmprod[eval]'``).
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``, or raise an ImportError that names the extra to install.

    Args:
        module: the host package's module, e.g. ``"langchain_core"``.
        extra: the llmprod extra that installs it, e.g. ``"langchain"``.

    Returns:
        The imported module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is not installed; install it with pip install 'llmprod[{extra}]'"
        ) from e
