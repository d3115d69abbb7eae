"""The examples run as written: the quickstart script, and every notebook under
examples/, executed top to bottom on the real model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
# Files a notebook writes into its working directory, and their smallest size.
WRITES = {"observability.ipynb": {"observability.png": 10_000}}


@pytest.mark.slow
def test_quickstart_runs(
    engine: object,
) -> None:  # engine: the model is fetched already
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Paris" in res.stdout
    assert "requests: 4" in res.stdout


def test_the_notebooks_are_found() -> None:
    names = {p.name for p in NOTEBOOKS}
    assert {
        "quickstart.ipynb",
        "caching.ipynb",
        "quantization.ipynb",
        "production_controls.ipynb",
        "benchmarks.ipynb",
        "observability.ipynb",
    } <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {i} has outputs"
            assert cell["execution_count"] is None, f"cell {i} has an execution count"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(engine: object, path: Path, tmp_path: Path) -> None:
    """Each notebook in a fresh kernel, in its own empty working directory; a
    cell that raises fails the test (nbclient's CellExecutionError)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    for name, min_bytes in WRITES.get(path.name, {}).items():
        assert (tmp_path / name).stat().st_size > min_bytes
