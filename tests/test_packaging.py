"""Every subpackage is listed for the wheel (the editable install would hide a gap)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_packaged() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "packages"
        ]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "llmprod").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found - listed == set(), (
        f"add to pyproject packages: {sorted(found - listed)}"
    )
    assert "llmprod.kernels" in listed


def test_the_all_extra_installs_every_optional_feature() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    features = [name for name in extras if name not in ("all", "test", "dev")]

    def bare(req: str) -> str:  # the requirement without its environment marker
        return req.split(";")[0].strip()

    everything = {bare(r) for r in extras["all"]}
    missing = {bare(r) for name in features for r in extras[name]} - everything
    assert missing == set(), f"add to the 'all' extra: {sorted(missing)}"
