"""One nox session per check."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.default_venv_backend = "venv"


def _install(session: nox.Session, extras: str = "") -> None:
    session.install("torch==2.13.0")
    session.install("-e", f".[{extras}]" if extras else ".")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    _install(session, "dev")
    session.run("mypy")


@nox.session
def tests(session: nox.Session) -> None:
    session.run("bash", "scripts/install-test-deps.sh", external=True)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def kernels(session: nox.Session) -> None:
    """Kernel tests under Triton's CPU interpreter."""
    session.run("bash", "scripts/install-test-deps.sh", external=True)
    session.env["TRITON_INTERPRET"] = "1"
    session.run("python", "-m", "pytest", "tests/kernels", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """pytest-benchmark suites (not part of the unit-test run)."""
    session.run("bash", "scripts/install-test-deps.sh", external=True)
    session.run(
        "python", "-m", "pytest", "benchmarks", "--benchmark-enable", *session.posargs
    )


@nox.session
def demo(session: nox.Session) -> None:
    _install(session)
    session.run("python", "examples/quickstart.py")
