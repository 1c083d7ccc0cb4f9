"""Which adapter wraps which type: the built-in table, adapters registered by call, and entry points.

A type is matched by the qualified names of the classes in its MRO (``"module.QualName"``), so
that choosing an adapter imports nothing: a built-in adapter's module is imported only when an
object of its library is wrapped, and entry points (group :data:`ENTRY_POINT_GROUP`) are read,
with :mod:`importlib.metadata`, only when ``wrap()`` meets a type nothing else handles.

Along the MRO, the most derived class that has an adapter wins; for one class, an adapter
registered by :meth:`AdapterTable.register` comes before the built-in table (it may replace a
built-in only when asked to). Entry points are looked at last, and an adapter loaded from one is
then registered like one registered by call, so the metadata is read once per type.
"""

from __future__ import annotations

import importlib
import inspect
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from poolkeeper._grammar import with_article
from poolkeeper.adapters._base import Driver
from poolkeeper.errors import RegistrationError, UnsupportedResourceError

if TYPE_CHECKING:
    from collections.abc import Iterable
    from importlib.metadata import EntryPoint

__all__ = ["ENTRY_POINT_GROUP", "AdapterTable", "DriverFactory"]

#: The entry point group a distribution declares its adapters in. Each entry point is named
#: after the qualified name of the class it handles (``"mypool.pool.SocketPool"``) and points at
#: its driver factory: ``"mypool.pool.SocketPool" = "mypool_poolkeeper:SocketPoolDriver"``.
ENTRY_POINT_GROUP = "poolkeeper.adapters"

#: What makes a driver: called with the object passed to ``wrap()``, returns a new, unattached
#: :class:`~poolkeeper.adapters.Driver`. A ``Driver`` subclass is one (its ``__init__`` takes the resource).
DriverFactory: TypeAlias = Callable[[Any], Driver]

# "module.QualName": dotted identifiers, at least one dot; "<locals>" parts allowed (a class
# made inside a function), nothing else.
_QUALIFIED_NAME = re.compile(r"^(?:[A-Za-z_]\w*|<locals>)(?:\.(?:[A-Za-z_]\w*|<locals>))+$")


def qualified_name(cls: type[Any]) -> str:
    """``"module.QualName"`` of ``cls``: what adapters are looked up by."""
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class _Registered:
    """An adapter registered by call or loaded from an entry point."""

    factory: DriverFactory
    label: str
    origin: str  # where it came from, for error messages


def _check_target(target: object) -> str:
    if isinstance(target, type):
        return qualified_name(target)
    if isinstance(target, str) and _QUALIFIED_NAME.match(target):
        return target
    raise TypeError(f"target must be a class or its qualified name as a string ('module.QualName'), got {target!r}")


def _check_factory(factory: object, what: str) -> Callable[[Any], Driver]:
    """``factory`` if it can make drivers; a Driver subclass is checked completely here."""
    if isinstance(factory, type):
        if not issubclass(factory, Driver):
            raise TypeError(
                f"{what} must be a poolkeeper.adapters.Driver subclass or a callable returning a Driver, "
                f"got the class {qualified_name(factory)}, which is not a Driver"
            )
        if inspect.isabstract(factory):
            missing = ", ".join(sorted(factory.__abstractmethods__))
            raise TypeError(f"{what} {qualified_name(factory)} does not implement {missing}")
        _check_kind(factory, what)
        return factory
    if not callable(factory):
        raise TypeError(f"{what} must be a callable taking the resource and returning a Driver, got {factory!r}")
    return factory  # callable; what it returns is checked at wrap time


def _check_kind(driver: type[Driver] | Driver, what: str) -> None:
    kind = getattr(driver, "kind", None)
    if not isinstance(kind, str) or not kind:
        name = qualified_name(driver if isinstance(driver, type) else type(driver))
        raise TypeError(f"{what} {name} must set 'kind' to a non-empty string (the keeper's kind), got {kind!r}")


class AdapterTable:
    """Finds and makes the driver for an object; holds the adapters registered at run time.

    Args:
        builtins: ``"module.QualName"`` -> (adapter module, label): poolkeeper's own adapters.
            Read at each lookup, so that changes to it (a test's ``mock.patch.dict``) apply.
    """

    def __init__(self, builtins: dict[str, tuple[str, str]]) -> None:
        self._builtins = builtins
        self._registered: dict[str, _Registered] = {}
        self._lock = threading.Lock()

    # -- registration --------------------------------------------------------------------------

    def register(
        self,
        target: type[Any] | str,
        factory: Callable[[Any], Driver],
        *,
        label: str | None = None,
        replace: bool = False,
    ) -> None:
        """See :func:`poolkeeper.register_adapter`."""
        name = _check_target(target)
        checked = _check_factory(factory, "factory")
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise TypeError(f"label must be a non-empty string or None, got {label!r}")
        if not isinstance(replace, bool):
            raise TypeError(f"replace must be True or False, got {replace!r}")
        adapter = _Registered(checked, label or name, "poolkeeper.register_adapter()")
        with self._lock:
            existing = self._registered.get(name)
            if not replace:
                if existing is not None:
                    if existing.factory == checked and existing.label == adapter.label:
                        return  # the same registration again (a module imported twice): nothing to do
                    raise RegistrationError(
                        f"an adapter for {name} is already registered (by {existing.origin}, factory "
                        f"{_describe(existing.factory)}); pass replace=True to use {_describe(checked)} instead"
                    )
                if name in self._builtins:
                    raise RegistrationError(
                        f"poolkeeper has its own adapter for {name} ({self._builtins[name][1]}); "
                        "pass replace=True to use yours instead"
                    )
            self._registered[name] = adapter

    def unregister(self, target: type[Any] | str) -> bool:
        """Forget the adapter registered for ``target``; False if none was (built-ins stay)."""
        name = _check_target(target)
        with self._lock:
            return self._registered.pop(name, None) is not None

    # -- lookup --------------------------------------------------------------------------------

    def driver_for(self, resource: Any) -> Driver:
        """A new, unattached driver for ``resource``.

        Raises:
            UnsupportedResourceError: no adapter handles the object's type, or one declared by
                an entry point cannot be loaded.
            RegistrationError: two installed distributions declare different adapters for it.
            TypeError: a registered factory returned something that is not a usable Driver.
        """
        names = [qualified_name(cls) for cls in type(resource).__mro__]
        for name in names:
            registered = self._registered.get(name)
            if registered is not None:
                return _made(registered, name, resource)
            builtin = self._builtins.get(name)
            if builtin is not None:
                module = importlib.import_module(builtin[0])
                return module.make_driver(resource)  # type: ignore[no-any-return]  # each adapter returns a Driver
        entries = _entry_points()  # read once: it scans every directory of sys.path
        loaded = self._from_entry_points(names, entries)
        if loaded is not None:
            return _made(loaded[1], loaded[0], resource)
        raise UnsupportedResourceError(
            f"poolkeeper cannot wrap {with_article(names[0])}; it can wrap: {', '.join(self.supported(entries))}"
        )

    def prepare(self, resource: Any) -> None:
        """Load the entry point adapter ``resource`` needs, if any, so that :meth:`driver_for` finds it registered.

        Called by ``Registry.wrap()`` before it takes its locks: loading an entry point imports
        a module, and an import must not run while a registry is locked.
        """
        names = [qualified_name(cls) for cls in type(resource).__mro__]
        if any(name in self._registered or name in self._builtins for name in names):
            return
        try:
            self._from_entry_points(names, _entry_points())
        except (UnsupportedResourceError, RegistrationError):
            return  # driver_for() raises it again, where wrap() reports it

    def supported(self, entries: Iterable[EntryPoint]) -> tuple[str, ...]:
        """Labels of everything ``wrap()`` accepts now: built-ins, registered, and declared by ``entries``."""
        labels = [label for _, label in self._builtins.values()]
        labels += [adapter.label for adapter in self._registered.values()]
        labels += [f"{entry.name} (entry point)" for entry in entries if entry.name not in self._registered]
        return tuple(dict.fromkeys(labels))

    def _from_entry_points(self, names: Iterable[str], entries: Iterable[EntryPoint]) -> tuple[str, _Registered] | None:
        """The first of ``names`` one of ``entries`` declares an adapter for, loaded and registered."""
        declared: dict[str, list[EntryPoint]] = {}
        for entry in entries:
            found = declared.setdefault(entry.name, [])
            if all(other.value != entry.value for other in found):  # one distribution seen twice on sys.path
                found.append(entry)
        for name in names:
            claims = declared.get(name)
            if not claims:
                continue
            if len(claims) > 1:
                raise RegistrationError(
                    f"several installed distributions declare a poolkeeper adapter for {name}: "
                    f"{'; '.join(_origin(entry) for entry in claims)}; choose one with "
                    "poolkeeper.register_adapter(..., replace=True)"
                )
            entry = claims[0]
            try:
                factory = _check_factory(entry.load(), f"the adapter of {_origin(entry)}")
            except Exception as error:
                raise UnsupportedResourceError(
                    f"poolkeeper cannot wrap {with_article(name)}: its adapter, {_origin(entry)}, "
                    f"failed to load: {type(error).__name__}: {error}"
                ) from error
            with self._lock:
                # Registered by call meanwhile (another thread): that one wins, as it would have.
                adapter = self._registered.setdefault(name, _Registered(factory, name, _origin(entry)))
            return name, adapter
        return None


def _entry_points() -> list[EntryPoint]:
    # Imported here: importlib.metadata costs milliseconds, and only an unknown type needs it.
    from importlib import metadata  # noqa: PLC0415 -- see above

    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def _origin(entry: EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    source = f" of distribution {dist.name!r}" if dist is not None else ""
    return f"entry point {entry.name!r} = {entry.value!r}{source}"


def _describe(factory: object) -> str:
    return getattr(factory, "__qualname__", None) or repr(factory)


def _made(adapter: _Registered, name: str, resource: Any) -> Driver:
    """Call ``adapter``'s factory and check that what it made is a usable driver for ``resource``."""
    driver = adapter.factory(resource)
    if not isinstance(driver, Driver):
        raise TypeError(
            f"the adapter for {name} ({adapter.origin}) returned {driver!r}, not a poolkeeper.adapters.Driver"
        )
    _check_kind(driver, f"the adapter for {name} made a driver, but")
    return driver
