"""Bad input to the registry and wrap(): a clear error naming the argument, and nothing half registered."""

from __future__ import annotations

import math

import pytest
import sqlalchemy as sa

import poolkeeper
from poolkeeper import RegistrationError, Registry, UnsupportedResourceError


def is_guarded(engine: sa.Engine) -> bool:
    return hasattr(engine.pool, "_pk_driver")


def test_unsupported_object_is_a_type_error_listing_what_is_supported():
    """Wrapping an unknown object raises UnsupportedResourceError (a TypeError) naming every supported kind."""
    registry = Registry()
    with pytest.raises(UnsupportedResourceError) as caught:
        registry.wrap(object())
    assert isinstance(caught.value, TypeError)
    message = str(caught.value)
    for kind in poolkeeper.adapters.SUPPORTED:
        assert kind in message
    assert "builtins.object" in message
    assert len(registry) == 0


@pytest.mark.parametrize("bad", [-1, -0.001, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("argument", ["drain_timeout", "close_timeout"])
def test_bad_timeouts_on_wrap_name_the_argument(make_engine, argument, bad):
    """A negative, NaN or infinite timeout raises ValueError naming it, and the engine is left untouched."""
    engine = make_engine()
    registry = Registry()
    with pytest.raises(ValueError, match=argument):
        registry.wrap(engine, **{argument: bad})
    assert len(registry) == 0
    assert not is_guarded(engine)
    # and the engine can still be wrapped properly afterwards
    registry.wrap(engine, name="db")
    assert is_guarded(engine)
    registry.close()


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf])
@pytest.mark.parametrize("argument", ["drain_timeout", "close_timeout"])
def test_bad_timeouts_on_the_registry_name_the_argument(argument, bad):
    """Registry() refuses bad default timeouts with ValueError naming the argument."""
    with pytest.raises(ValueError, match=argument):
        Registry(**{argument: bad})


@pytest.mark.parametrize("bad", ["5", None, True])
def test_non_numeric_registry_timeouts_are_type_errors(bad):
    """A timeout that is not a number is a TypeError naming the argument."""
    with pytest.raises(TypeError, match="drain_timeout"):
        Registry(drain_timeout=bad)


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", [-1, math.nan, math.inf])
async def test_bad_deadline_is_refused_before_anything_closes(make_engine, bad):
    """aclose()/close() with a bad deadline raise ValueError and start no shutdown."""
    registry = Registry()
    registry.wrap(make_engine(), name="db")
    with pytest.raises(ValueError, match="deadline"):
        await registry.aclose(deadline=bad)
    with pytest.raises(ValueError, match="deadline"):
        registry.close(deadline=bad)
    assert not registry.draining
    assert registry["db"].lending
    registry.close()


def test_leak_threshold_must_be_positive(make_engine):
    """leak_threshold=0 or negative is refused naming the argument."""
    registry = Registry()
    engine = make_engine()
    for bad in (0, -1, math.nan):
        with pytest.raises(ValueError, match="leak_threshold"):
            registry.wrap(engine, leak_threshold=bad)
    assert not is_guarded(engine)


def test_duplicate_name_is_refused_and_the_second_engine_untouched(make_engine):
    """A second resource under a taken name raises RegistrationError; it is not guarded."""
    registry = Registry()
    registry.wrap(make_engine(), name="db")
    second = make_engine()
    with pytest.raises(RegistrationError, match="'db' is already registered"):
        registry.wrap(second, name="db")
    assert not is_guarded(second)
    assert len(registry) == 1
    registry.close()


def test_default_names_are_unique(make_engine):
    """Without a name, keepers are named after their library, numbered when taken."""
    registry = Registry()
    registry.wrap(make_engine())
    registry.wrap(make_engine())
    assert [keeper.name for keeper in registry.keepers] == ["sqlalchemy", "sqlalchemy-2"]
    registry.close()


@pytest.mark.parametrize("bad", ["", "   ", 5])
def test_bad_names_are_refused(make_engine, bad):
    """An empty, blank or non-string name is refused naming the argument."""
    engine = make_engine()
    with pytest.raises((TypeError, ValueError), match="name"):
        Registry().wrap(engine, name=bad)
    assert not is_guarded(engine)


def test_depends_on_must_be_a_list_of_names(make_engine):
    """depends_on="db" (a bare string) is refused: it would silently mean d, b."""
    with pytest.raises(TypeError, match="depends_on"):
        Registry().wrap(make_engine(), depends_on="db")


def test_wrap_after_close_is_refused(make_engine):
    """Wrapping into a closed registry raises RegistrationError and leaves the engine untouched."""
    registry = Registry()
    registry.close()
    engine = make_engine()
    with pytest.raises(RegistrationError, match="closing or closed"):
        registry.wrap(engine)
    assert not is_guarded(engine)
    with pytest.raises(RegistrationError):
        registry.on_shutdown(lambda: None, name="late")


def test_one_engine_cannot_join_two_registries(make_engine):
    """An engine managed by one registry is refused by another."""
    engine = make_engine()
    first, second = Registry(), Registry()
    first.wrap(engine, name="db")
    with pytest.raises(RegistrationError, match="another registry"):
        second.wrap(engine, name="db")
    assert len(second) == 0
    first.close()


def test_dependency_cycle_is_refused_naming_its_members():
    """The registration that would close a cycle is refused, and the message names the cycle."""
    registry = Registry()
    registry.on_shutdown(lambda: None, name="a", depends_on=["b"])
    registry.on_shutdown(lambda: None, name="b", depends_on=["c"])
    with pytest.raises(RegistrationError, match="c -> a -> b -> c"):
        registry.on_shutdown(lambda: None, name="c", depends_on=["a"])
    assert "c" not in registry
    with pytest.raises(RegistrationError, match="itself"):
        registry.on_shutdown(lambda: None, name="d", depends_on=["d"])


def test_check_reports_unknown_dependencies():
    """check() names every depends_on that matches nothing registered."""
    registry = Registry()
    registry.on_shutdown(lambda: None, name="flush", depends_on=["db", "cache"])
    registry.on_shutdown(lambda: None, name="cache")
    with pytest.raises(RegistrationError, match="'flush' depends on unknown 'db'") as caught:
        registry.check()
    assert "cache" not in str(caught.value)


def test_on_shutdown_needs_a_callable():
    """on_shutdown(5) is a TypeError and registers nothing."""
    registry = Registry()
    with pytest.raises(TypeError, match="callable"):
        registry.on_shutdown(5)  # type: ignore[call-overload]
    assert len(registry) == 0


def test_wrap_refuses_a_registry_of_the_wrong_type(make_engine):
    """poolkeeper.wrap(registry=...) must be a Registry."""
    with pytest.raises(TypeError, match="registry"):
        poolkeeper.wrap(make_engine(), registry="default")  # type: ignore[arg-type]


def test_wrap_into_an_empty_registry_registers_there_not_in_the_default_one(make_engine):
    """An empty Registry is falsy (it has a length): wrap(registry=...) must still use it."""
    registry = Registry()
    engine = poolkeeper.wrap(make_engine(), name="tenant-db", registry=registry)
    try:
        assert [keeper.name for keeper in registry.keepers] == ["tenant-db"]
        assert "tenant-db" not in [keeper.name for keeper in poolkeeper.get_registry().keepers]
    finally:
        registry.close()
        engine.dispose()
