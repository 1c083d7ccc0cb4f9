"""Project automation: tests, lint, typecheck and benchmarks (``nox -l`` lists them)."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "docs"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against the real PostgreSQL and Redis (see README for the URLs)."""
    session.install("-e", ".[all,dev]")
    # The servers must answer: a missing one fails the run instead of skipping its tests.
    session.run("pytest", "--poolkeeper-require-services", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff, lint and format check."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Mypy --strict over the library, the tests and the benchmarks."""
    session.install("-e", ".[all,dev]", "nox")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """The performance suite; rewrites docs/performance.md from this one run (about 1.5 minutes)."""
    session.install("-e", ".[all,dev]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with ``mkdocs build --strict``: a broken link or reference fails it."""
    session.install("-e", ".[all,docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", f"{session.create_tmp()}/site", *session.posargs)
