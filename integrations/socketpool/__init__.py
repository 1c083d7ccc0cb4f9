"""A third-party adapter, written against poolkeeper's public adapter API only (docs/adapters.md).

``pool`` is an in-house connection pool that knows nothing of poolkeeper: a thread-safe pool of
sockets to a small line-protocol server (``server``, a real TCP server on loopback). ``adapter``
is what its owners write to let ``poolkeeper.wrap()`` manage it, importing nothing but
``poolkeeper`` and ``poolkeeper.adapters``.
"""
