"""pytest plugin for the wrapped run of ``nox -s peer``: every pool and client is ``poolkeeper.wrap``-ped.

Loaded with ``-p poolkeeper_peer_wrap`` into a library's own test suite. It wraps where the library
builds its objects, right after the library's own ``__init__``, so every construction path is covered
(factories, ``from_url``, test helpers, subclasses):

- asyncpg: ``asyncpg.pool.Pool.__init__`` (before ``_async__init__``, as ``create_pool`` returns it);
- redis-py: ``redis.Redis.__init__`` and ``redis.asyncio.Redis.__init__`` (a second client on a pool
  that is already managed is left as it is: the pool is wrapped once);
- SQLAlchemy: ``create_engine`` (as ``sqlalchemy``, ``sqlalchemy.engine`` and ``sqlalchemy.engine.create``
  export it; the suite's ``testing_engine`` imports it when called). Not ``Engine.__init__``:
  ``create_engine`` reads the names of that method's parameters to sort its keyword arguments;
- aiohttp: ``aiohttp.ClientSession.__init__``.

Each object goes into one throwaway ``poolkeeper.Registry`` that is never closed: the libraries' tests close
their own objects (that call now goes through poolkeeper), and closing the registry at a test's end
would close class- or session-scoped objects under the next tests. Patches are installed in
``pytest_configure`` (last), after the suite's conftest has set ``sys.path``, and only for the
libraries that import.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools
from typing import Any

import pytest

_names = itertools.count(1)
_registry: Any = None


def _wrap(obj: Any, *, skip_if_managed: bool = False) -> None:
    import poolkeeper  # noqa: PLC0415 -- imported with the first object to wrap

    global _registry  # noqa: PLW0603 -- one throwaway registry per pytest session
    if _registry is None:
        _registry = poolkeeper.Registry()
    try:
        _registry.wrap(obj, name=f"peer-{next(_names)}")
    except poolkeeper.RegistrationError:
        if not skip_if_managed:
            raise


def _wrap_after_init(cls: type[Any], *, skip_if_managed: bool = False) -> None:
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807 -- it replaces __init__
        original(self, *args, **kwargs)
        # Wrapping an object twice is a no-op in poolkeeper, so a subclass calling up is wrapped once.
        _wrap(self, skip_if_managed=skip_if_managed)

    cls.__init__ = __init__  # the point of the plugin: patch the constructor


def _wrap_what_it_returns(module_name: str, name: str) -> None:
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    @functools.wraps(original)
    def factory(*args: Any, **kwargs: Any) -> Any:
        made = original(*args, **kwargs)
        _wrap(made)
        return made

    setattr(module, name, factory)


def _class(path: str) -> type[Any] | None:
    module_name, _, name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    cls: type[Any] = getattr(module, name)
    return cls


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:  # noqa: ARG001 -- the hook's signature
    """Patch each importable library's constructors to wrap what they build."""
    for path, skip_if_managed in (
        ("asyncpg.pool.Pool", False),
        ("redis.client.Redis", True),
        ("redis.asyncio.client.Redis", True),
        ("aiohttp.client.ClientSession", False),
    ):
        cls = _class(path)
        if cls is not None:
            _wrap_after_init(cls, skip_if_managed=skip_if_managed)
    if importlib.util.find_spec("sqlalchemy") is not None:
        for module_name in ("sqlalchemy", "sqlalchemy.engine", "sqlalchemy.engine.create"):
            _wrap_what_it_returns(module_name, "create_engine")
