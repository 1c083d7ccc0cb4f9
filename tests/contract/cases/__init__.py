"""One module per adapter, each with ``CASES``: the :class:`~tests.contract.harness.AdapterCase` list it adds.

Found by name: a new module here is a new adapter under the shared suite, with no other line to add.
"""

from __future__ import annotations

import importlib
import pkgutil

from tests.contract.harness import AdapterCase

__all__ = ["all_cases"]


def all_cases() -> list[AdapterCase]:
    """Every case of every module in this package, in module order."""
    cases: list[AdapterCase] = []
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        cases.extend(module.CASES)
    return cases
