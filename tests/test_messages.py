"""Messages built from type names read as English: the right indefinite article."""

from __future__ import annotations

import pytest
import redis

from poolkeeper import Registry, UnsupportedResourceError
from poolkeeper._grammar import with_article


@pytest.mark.parametrize(
    ("expected", "noun"),
    [
        ("an aio_pika.Connection", "aio_pika.Connection"),
        ("an asyncpg Pool", "asyncpg Pool"),
        ("an int", "int"),
        ("an unclosed session", "unclosed session"),
        ("a redis.Redis", "redis.Redis"),
        ("a uvicorn.Server", "uvicorn.Server"),
        ("a urllib3.PoolManager", "urllib3.PoolManager"),
        ("an HTTPTransport", "HTTPTransport"),
        ("a URL", "URL"),
        ("a builtins.object", "builtins.object"),
    ],
)
def test_the_article_follows_how_the_name_is_spoken(expected, noun):
    """'an' before a vowel sound (including initialisms like HTTP), 'a' before a consonant sound."""
    assert expected == with_article(noun)


def test_an_unsupported_type_starting_with_a_vowel_reads_an():
    """Wrapping an object of a module starting with a vowel says 'cannot wrap an ...', not 'a ...'."""
    resource = type("Connection", (), {"__module__": "aio_pika.robust_connection"})()
    with pytest.raises(UnsupportedResourceError) as raised:
        Registry().wrap(resource)
    assert str(raised.value).startswith("poolkeeper cannot wrap an aio_pika.robust_connection.Connection; ")


def test_a_redis_client_without_a_redis_pool_names_the_client_with_its_article():
    """A redis client whose pool is not redis-py's is refused with a message that reads 'expected a redis.Redis'."""
    client = redis.Redis()
    client.connection_pool = object()  # type: ignore[assignment]  # the foreign pool under test
    expected = r"^expected a redis\.Redis with a redis-py connection pool, got a pool of type object$"
    with pytest.raises(TypeError, match=expected):
        Registry().wrap(client)
