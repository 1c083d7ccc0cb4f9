"""Wording helpers for messages built from names the code does not know in advance."""

from __future__ import annotations

__all__ = ["with_article"]

# Letters whose spoken name starts with a vowel sound: "an HTTPTransport", "an SQL...", "an MQ...".
_VOWEL_SOUND_LETTERS = frozenset("AEFHILMNORSX")
# Words that start with the letter u but sound "you": "a uvicorn.Server", "a urllib3 pool".
_YOU_SOUND_PREFIXES = ("uni", "uvi", "use", "usu", "uti", "uu", "url", "uj")


def with_article(noun: str) -> str:
    """``noun`` behind the indefinite article that reads right.

    ``an aio_pika.Connection``, ``a redis.Redis``, ``an int``, ``a uvicorn.Server``, and for an
    initialism (two capitals first) by how its first letter is spoken: ``an HTTPTransport``,
    ``a URL``.
    """
    if not noun:
        return noun
    if noun[:2].isupper() and noun[:2].isalpha():
        vowel_sound = noun[0] in _VOWEL_SOUND_LETTERS
    else:
        lowered = noun.lower()
        vowel_sound = lowered[0] in "aeio" or (lowered[0] == "u" and not lowered.startswith(_YOU_SOUND_PREFIXES))
    return f"{'an' if vowel_sound else 'a'} {noun}"
