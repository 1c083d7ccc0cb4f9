"""Third-party adapters: ``register_adapter()``, the ``poolkeeper.adapters`` entry point group, bad input.

The adapter used is the in-house socket pool's (``integrations/socketpool``), written against the
public adapter API only; its behaviour under shutdown is proven by the shared suite
(``tests/contract``).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import poolkeeper
import poolkeeper.adapters
from integrations.socketpool.adapter import SocketPoolDriver
from integrations.socketpool.pool import SocketPool
from integrations.socketpool.server import LineServer
from poolkeeper import KeeperState, RegistrationError, Registry, UnsupportedResourceError
from poolkeeper.adapters import Driver, register_adapter, unregister_adapter

ROOT = Path(__file__).resolve().parent.parent
SOCKET_POOL = "integrations.socketpool.pool.SocketPool"


@pytest.fixture
def line_server() -> Iterator[LineServer]:
    with LineServer() as server:
        yield server


@pytest.fixture
def pool(line_server: LineServer) -> Iterator[SocketPool]:
    pool = SocketPool(*line_server.address, size=2)
    yield pool
    pool.close()


@pytest.fixture(autouse=True)
def _forget_registrations() -> Iterator[None]:
    """Each test starts and ends with no adapter registered for the socket pool (or the test classes)."""
    unregister_adapter(SocketPool)
    yield
    for target in (SocketPool, SubPool, "redis.client.Redis"):
        unregister_adapter(target)


class SubPool(SocketPool):
    """A subclass of the in-house pool."""


class SubPoolDriver(SocketPoolDriver):
    """Another driver, told apart by its kind."""

    kind = "subpool"


class AbstractDriver(Driver):
    """A driver that implements none of the abstract methods."""

    kind = "abstract"


class NoKindDriver(SocketPoolDriver):
    """A driver whose kind is empty."""

    kind = ""


def test_register_adapter_is_exported_at_the_top_level():
    """``poolkeeper.register_adapter`` is the adapters package's function, listed in ``__all__``."""
    assert poolkeeper.register_adapter is register_adapter
    assert "register_adapter" in poolkeeper.__all__


def test_an_unregistered_type_is_refused_and_a_registered_one_is_wrapped(pool, line_server):
    """Before registration wrap() refuses the pool; after it, the same pool is managed and closes its connections."""
    registry = Registry()
    with pytest.raises(UnsupportedResourceError, match=SOCKET_POOL):
        registry.wrap(pool)
    assert len(registry) == 0

    register_adapter(SocketPool, SocketPoolDriver, label="in-house SocketPool")
    assert registry.wrap(pool, name="lines") is pool
    keeper = registry["lines"]
    assert keeper.kind == "socketpool"
    with pool.connection() as connection:
        assert connection.call("PING") == "PONG"
    assert line_server.open_connections() == 1

    report = registry.close()
    assert report.ok
    assert keeper.state is KeeperState.CLOSED
    assert line_server.wait_for(lambda server: server.open_connections() == 0)


def test_a_qualified_name_registers_without_the_class(pool):
    """A target given as 'module.QualName' matches objects of that class."""
    register_adapter(SOCKET_POOL, SocketPoolDriver)
    registry = Registry()
    registry.wrap(pool, name="lines")
    assert registry["lines"].kind == "socketpool"
    registry.close()


def test_a_registered_label_is_listed_in_the_unsupported_error():
    """The error for an unknown object names the registered adapters beside the built-in ones."""
    register_adapter(SocketPool, SocketPoolDriver, label="in-house SocketPool")
    with pytest.raises(UnsupportedResourceError) as caught:
        Registry().wrap(object())
    message = str(caught.value)
    assert "in-house SocketPool" in message
    for builtin in poolkeeper.adapters.SUPPORTED:
        assert builtin in message


def test_subclasses_match_and_the_most_derived_adapter_wins(line_server):
    """An adapter for a base class handles its subclasses, unless the subclass has its own."""
    register_adapter(SocketPool, SocketPoolDriver)
    registry = Registry()
    sub = SubPool(*line_server.address)
    registry.wrap(sub, name="sub")
    assert registry["sub"].kind == "socketpool"
    registry.unwrap("sub")

    register_adapter(SubPool, SubPoolDriver)
    registry.wrap(sub, name="sub")
    assert registry["sub"].kind == "subpool"
    registry.close()


def test_registering_the_same_adapter_twice_is_a_no_op(pool):
    """Registering the same factory and label again changes nothing (a module imported twice)."""
    register_adapter(SocketPool, SocketPoolDriver)
    register_adapter(SocketPool, SocketPoolDriver)
    registry = Registry()
    registry.wrap(pool, name="lines")
    assert registry["lines"].kind == "socketpool"
    registry.close()


def test_a_different_adapter_for_a_registered_type_needs_replace(pool):
    """A second, different factory is refused with RegistrationError naming the first; replace=True swaps it."""
    register_adapter(SocketPool, SocketPoolDriver)
    with pytest.raises(RegistrationError, match=r"already registered.*SocketPoolDriver.*replace=True"):
        register_adapter(SocketPool, SubPoolDriver)
    registry = Registry()
    registry.wrap(pool, name="before")
    assert registry["before"].kind == "socketpool"  # the refused registration changed nothing
    registry.unwrap("before")

    register_adapter(SocketPool, SubPoolDriver, replace=True)
    registry.wrap(pool, name="after")
    assert registry["after"].kind == "subpool"
    registry.close()


def test_a_builtin_type_is_replaced_only_when_asked():
    """Registering for a type poolkeeper supports itself is refused unless replace=True; unregistering restores it."""
    with pytest.raises(RegistrationError, match=r"poolkeeper has its own adapter for redis\.client\.Redis"):
        register_adapter("redis.client.Redis", SocketPoolDriver)
    assert unregister_adapter("redis.client.Redis") is False
    register_adapter("redis.client.Redis", SocketPoolDriver, replace=True)
    assert unregister_adapter("redis.client.Redis") is True


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((42, SocketPoolDriver), r"target must be a class or its qualified name.*42"),
        (("SocketPool", SocketPoolDriver), r"target must be a class or its qualified name.*'SocketPool'"),
        (("integrations.socket pool.X", SocketPoolDriver), r"target must be"),
        ((SocketPool, "SocketPoolDriver"), r"factory must be a callable.*'SocketPoolDriver'"),
        ((SocketPool, SocketPool), r"factory must be a poolkeeper\.adapters\.Driver subclass.*not a Driver"),
        ((SocketPool, AbstractDriver), r"factory .*AbstractDriver does not implement close_connections, force_close"),
        ((SocketPool, NoKindDriver), r"factory .*NoKindDriver must set 'kind' to a non-empty string"),
    ],
)
def test_bad_registrations_name_the_argument_and_register_nothing(pool, arguments, message):
    """A bad target or factory is a TypeError naming it; afterwards the pool is still unsupported."""
    with pytest.raises(TypeError, match=message):
        register_adapter(*arguments)
    with pytest.raises(UnsupportedResourceError):
        Registry().wrap(pool)


@pytest.mark.parametrize(
    ("options", "message"), [({"label": ""}, "label must be"), ({"replace": "yes"}, "replace must be True or False")]
)
def test_bad_options_name_the_argument(pool, options, message):
    """An empty label or a non-boolean replace is a TypeError naming it; nothing is registered."""
    with pytest.raises(TypeError, match=message):
        register_adapter(SocketPool, SocketPoolDriver, **options)
    with pytest.raises(UnsupportedResourceError):
        Registry().wrap(pool)


def test_a_factory_that_makes_no_driver_fails_the_wrap_and_registers_nothing(pool):
    """A factory returning something that is not a Driver makes wrap() raise TypeError; the registry stays empty."""

    def factory(_resource: Any) -> Any:
        return object()

    register_adapter(SocketPool, factory)
    registry = Registry()
    with pytest.raises(TypeError, match=r"returned <object object .*>, not a poolkeeper\.adapters\.Driver"):
        registry.wrap(pool)
    assert len(registry) == 0
    assert "acquire" not in vars(pool)  # no guard left behind


def test_a_factory_refusing_the_object_fails_the_wrap(pool):
    """The factory's own TypeError (here: the driver's type check) reaches the caller of wrap()."""
    register_adapter(SocketPool, lambda resource: SocketPoolDriver(resource.host))
    registry = Registry()
    with pytest.raises(TypeError, match="expected a SocketPool, got str"):
        registry.wrap(pool)
    assert len(registry) == 0


def test_the_third_party_adapter_imports_only_the_public_api():
    """integrations/socketpool/adapter.py imports from poolkeeper only names its public modules list in __all__."""
    tree = ast.parse((ROOT / "integrations" / "socketpool" / "adapter.py").read_text())
    public = {"poolkeeper": set(poolkeeper.__all__), "poolkeeper.adapters": set(poolkeeper.adapters.__all__)}
    imported: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("poolkeeper"):
            imported += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("poolkeeper") for alias in node.names), ast.dump(node)
    assert imported, "the adapter imports poolkeeper"
    for module, name in imported:
        assert module in public, f"{module} is not a public module"
        assert name in public[module], f"{module}.{name} is not public"


# -- entry points -------------------------------------------------------------------------------


def install_distribution(site: Path, name: str, entry_points: dict[str, str]) -> None:
    """Write a minimal installed distribution (a ``.dist-info`` directory) declaring ``entry_points``."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = [f"{target} = {value}" for target, value in entry_points.items()]
    (info / "entry_points.txt").write_text("[poolkeeper.adapters]\n" + "\n".join(lines) + "\n")


def run_python(code: str, site: Path) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter with ``site`` on its path; it prints one JSON object."""
    environment = {"PYTHONPATH": f"{ROOT}:{site}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
        env=environment,
        cwd=site,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])  # type: ignore[no-any-return]


ENTRY_POINT_WRAP = """
    import json, sys
    import poolkeeper
    after_import = {
        "metadata": "importlib.metadata" in sys.modules,
        "adapter": "integrations.socketpool.adapter" in sys.modules,
    }
    from integrations.socketpool.pool import SocketPool
    from integrations.socketpool.server import LineServer
    with LineServer() as server:
        pool = SocketPool(*server.address)
        registry = poolkeeper.Registry()
        try:
            registry.wrap(pool, name="lines")
        except Exception as error:
            print(json.dumps({"error": f"{type(error).__name__}: {error}", "after_import": after_import}))
            raise SystemExit(0)
        with pool.connection() as connection:
            answer = connection.call("PING")
        report = registry.close()
    print(json.dumps({
        "after_import": after_import,
        "adapter_loaded": "integrations.socketpool.adapter" in sys.modules,
        "kind": registry["lines"].kind,
        "answer": answer,
        "outcome": report["lines"].outcome,
    }))
"""


def test_an_entry_point_adapter_is_loaded_only_when_its_type_is_wrapped(tmp_path):
    """With a distribution declaring the adapter, import poolkeeper reads no metadata; wrap() loads the adapter."""
    install_distribution(
        tmp_path, "socketpool-poolkeeper", {SOCKET_POOL: "integrations.socketpool.adapter:SocketPoolDriver"}
    )
    result = run_python(ENTRY_POINT_WRAP, tmp_path)
    assert result == {
        "after_import": {"metadata": False, "adapter": False},
        "adapter_loaded": True,
        "kind": "socketpool",
        "answer": "PONG",
        "outcome": "clean",
    }


def test_a_broken_entry_point_is_an_unsupported_resource_error_naming_it(tmp_path):
    """An entry point whose module cannot be imported fails the wrap with its name, value and distribution."""
    install_distribution(tmp_path, "broken-adapter", {SOCKET_POOL: "no_such_module:Driver"})
    result = run_python(ENTRY_POINT_WRAP, tmp_path)
    assert result["error"].startswith("UnsupportedResourceError: poolkeeper cannot wrap an integrations.socketpool")
    assert "entry point 'integrations.socketpool.pool.SocketPool' = 'no_such_module:Driver'" in result["error"]
    assert "of distribution 'broken-adapter'" in result["error"]
    assert "ModuleNotFoundError: No module named 'no_such_module'" in result["error"]


def test_an_entry_point_that_is_no_driver_factory_is_refused(tmp_path):
    """An entry point naming a class that is not a Driver fails the wrap, saying so."""
    install_distribution(tmp_path, "wrong-adapter", {SOCKET_POOL: "integrations.socketpool.pool:SocketPool"})
    result = run_python(ENTRY_POINT_WRAP, tmp_path)
    assert "failed to load: TypeError:" in result["error"]
    assert "is not a Driver" in result["error"]


def test_two_distributions_declaring_the_same_type_are_a_registration_error(tmp_path):
    """Two installed distributions with adapters for one class: wrap() names both and says how to choose."""
    value = "integrations.socketpool.adapter:SocketPoolDriver"
    install_distribution(tmp_path, "first-adapter", {SOCKET_POOL: value})
    install_distribution(tmp_path, "second-adapter", {SOCKET_POOL: "integrations.socketpool.adapter:Other"})
    result = run_python(ENTRY_POINT_WRAP, tmp_path)
    assert result["error"].startswith("RegistrationError: several installed distributions")
    assert "'first-adapter'" in result["error"]
    assert "'second-adapter'" in result["error"]
    assert "register_adapter(..., replace=True)" in result["error"]


def test_a_registration_by_call_wins_over_an_entry_point(tmp_path):
    """An adapter registered with register_adapter() is used; the entry point is never loaded."""
    install_distribution(tmp_path, "broken-adapter", {SOCKET_POOL: "no_such_module:Driver"})
    code = "from integrations.socketpool.adapter import SocketPoolDriver\n" + textwrap.dedent(ENTRY_POINT_WRAP).replace(
        "import poolkeeper\n",
        "import poolkeeper\npoolkeeper.register_adapter('integrations.socketpool.pool.SocketPool', SocketPoolDriver)\n",
    )
    result = run_python(code, tmp_path)
    assert result["kind"] == "socketpool"
    assert result["outcome"] == "clean"


def test_wrapping_a_builtin_type_reads_no_entry_points(tmp_path):
    """Entry points are read only for types nothing else handles: wrapping a SQLite engine leaves a broken one alone."""
    install_distribution(tmp_path, "broken-adapter", {"sqlalchemy.engine.base.Engine": "no_such_module:Driver"})
    code = """
        import json, sys
        import sqlalchemy as sa
        import poolkeeper
        from poolkeeper.adapters import _registration
        reads = []
        original = _registration._entry_points
        _registration._entry_points = lambda: reads.append(1) or original()
        registry = poolkeeper.Registry()
        engine = registry.wrap(sa.create_engine("sqlite://"), name="db")
        report = registry.close()
        print(json.dumps({"reads": len(reads), "kind": registry["db"].kind, "ok": report.ok}))
    """
    assert run_python(code, tmp_path) == {"reads": 0, "kind": "sqlalchemy", "ok": True}
