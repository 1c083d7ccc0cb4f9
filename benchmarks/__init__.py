"""The performance suite: ``nox -s bench`` (or ``python -m benchmarks``)."""
