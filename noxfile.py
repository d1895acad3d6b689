"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s tests_fast`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The full suite, slow real-training and multi-process tests included (what CI runs)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def tests_fast(session: nox.Session) -> None:
    """Everything but the tests marked slow."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-m", "not slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests and this file."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
