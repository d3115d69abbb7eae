"""``import llmprod`` (and its public names) never imports the integrations' host
packages: they are optional extras, heavy to import, and may be absent."""

from __future__ import annotations

import subprocess
import sys

HOSTS = ("langchain_core", "llama_index", "lm_eval", "ray", "fastapi", "openai")


def test_importing_llmprod_imports_no_integration_host() -> None:
    code = (
        "import sys, llmprod\n"
        "from llmprod import Engine, SamplingParams, Router\n"
        "import llmprod.integrations\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HOSTS!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def _import_without(host: str, module: str) -> str:
    """What importing ``module`` prints in a fresh interpreter where ``host``
    cannot be imported: a meta-path finder that refuses it stands in for an
    environment without the extra."""
    code = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] == {host!r}:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import llmprod, llmprod.integrations\n"
        "try:\n"
        f"    import {module}\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return out.stdout


def test_a_missing_host_package_names_the_extra_to_install() -> None:
    out = _import_without("langchain_core", "llmprod.integrations.langchain")
    assert "pip install 'llmprod[langchain]'" in out


def test_the_ray_integration_without_ray_names_the_extra() -> None:
    out = _import_without("ray", "llmprod.integrations.ray")
    assert "pip install 'llmprod[ray]'" in out
