"""The NATS keeper: a nats-py ``Client`` and the JetStream consumers made through it.

``wrap()`` returns the same client. It keeps its class: the keeper sets its own ``subscribe``,
``publish``, ``jetstream``, ``close``, ``drain`` and message factory on it as instance attributes,
over the class's methods, and the messages it receives are of a guarded subclass of
``nats.aio.msg.Msg``, so that:

* a JetStream message (one with an ``$JS.ACK.`` reply subject) is a borrow from the moment the
  client receives it until it is acked, nacked or terminated (``ack``, ``ack_sync``, ``nak``,
  ``term``); ``in_progress`` keeps it borrowed. Its handler is the task it is handed to: the
  callback's task for a callback subscription, the task calling ``fetch()`` for a pull one
  (through the client's ``jetstream()`` context);
* once closing starts, every subscription made by the application is unsubscribed on the server
  (push consumers stop receiving, pull requests get no more messages), the JetStream messages
  still waiting in a subscription's buffer are nacked at once (redelivered now, to another
  instance, not after ``ack_wait``), new ``subscribe()`` calls and pull ``fetch()`` requests raise
  :class:`~poolkeeper.PoolClosedError`, and publishing goes on;
* handlers in progress get the drain timeout; at the deadline they are cancelled and their
  messages nacked, each reported as forced with its stream and sequence;
* then the client closes (no reconnect afterwards). ``await nc.close()`` and ``await nc.drain()``
  on a wrapped client run this close.

NATS's own ``drain()`` unsubscribes too, but then *processes* every buffered message before
closing (one at a time per subscription, for as long as its drain timeout allows) and leaves
unacked JetStream messages to ``ack_wait``; this keeper gives the buffered ones back instead.
Core NATS messages (no ack) are not borrows: they are at-most-once, and a buffered one is
processed as NATS's drain would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, MsgAlreadyAckdError

from poolkeeper._concurrency import current_task_of, run_on_loop
from poolkeeper._shutdown import close_keeper
from poolkeeper.adapters._base import Driver, guarded_subclass, remove_attributes, set_methods, unsupported_version
from poolkeeper.errors import PoolClosedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from poolkeeper._borrowers import Borrow
    from poolkeeper._keeper import Keeper

__all__ = ["NatsDriver", "NatsPoolClosedError", "make_driver"]

logger = logging.getLogger("poolkeeper.nats")

# -- what this adapter reads from nats-py, per version line -----------------------------------
#
#   Client.msg_class                       2.7+   the class of every received message (set on the
#                                                 client to a guarded Msg subclass)
#   Client._build_message                  2.7+   where a received message becomes a borrow
#   Client._request_sub_callback           2.7+   the request multiplexer's own subscription, which
#                                                 is never refused (JetStream API calls use it)
#   Client._send_unsubscribe(sid)          2.7+   UNSUB without stopping the subscription's task
#   Client._subs, Subscription._id,        2.7+   the subscriptions and their buffers
#     ._pending_queue, ._pending_size, ._cb
#   Msg.reply, ._ackd, .metadata           2.7+
#   Client.jetstream(),                    2.7+   the context whose pull subscriptions are guarded;
#     JetStreamContext.pull_subscribe_bind         pull_subscribe() makes its subscription there too
#     PullSubscription.fetch                       returns the messages to the task calling it

#: The nats-py versions this adapter is tested with.
SUPPORTED_VERSIONS = ">=2.7.0"

_REQUIRED: tuple[tuple[Any, str], ...] = (
    (Client, "msg_class"),
    (Client, "_build_message"),
    (Client, "_request_sub_callback"),
    (Client, "_send_unsubscribe"),
    (Msg, "ack_sync"),
    (Msg, "term"),
)
_JS_ACK_BYTES = b"$JS.ACK."  # the reply subject of a JetStream message, as the client reads it
_PULL_NEXT = "CONSUMER.MSG.NEXT."


def _missing_names() -> list[str]:
    return [f"{owner.__name__}.{name}" for owner, name in _REQUIRED if not hasattr(owner, name)]


class NatsPoolClosedError(PoolClosedError, ConnectionClosedError):
    """A subscribe or pull fetch refused by a closing keeper; also nats-py's ``ConnectionClosedError``."""

    def __str__(self) -> str:
        # nats-py's errors answer a fixed text from __str__; this one names the keeper and its state.
        return str(self.args[0]) if self.args else super().__str__()


class _Delivery:
    """One JetStream message from its arrival to its ack, nak or term: the unit of borrow."""

    __slots__ = ("driver", "forced", "keeper", "message", "task")

    def __init__(self, driver: NatsDriver, keeper: Keeper, message: Msg) -> None:
        self.driver = driver
        self.keeper = keeper  # the driver's, read without its property on every ack
        self.message = message
        self.task: asyncio.Task[Any] | None = None  # the callback's task, once it got the message
        self.forced = False

    def describe(self) -> str:
        try:
            metadata = self.message.metadata
        except Exception:  # noqa: BLE001 -- a reply subject this nats-py cannot parse: the subject still says something
            return f"subject {self.message.subject!r}"
        return f"stream {metadata.stream!r} consumer {metadata.consumer!r} sequence {metadata.sequence.stream}"


def _delivery(message: Msg) -> _Delivery | None:
    # A plain attribute (GuardedMsg's class default is None), not vars(): reading an instance's
    # __dict__ makes CPython 3.11 give up specialising attribute reads on it, in nats-py's code too.
    return getattr(message, "_poolkeeper_delivery", None)


def _mark(message: Msg, delivery: _Delivery | None) -> None:
    message._poolkeeper_delivery = delivery  # type: ignore[attr-defined]  # noqa: SLF001 -- GuardedMsg's attribute (class default None)


def _settle(delivery: _Delivery) -> None:
    message = delivery.message
    if _delivery(message) is delivery:
        _mark(message, None)
        delivery.keeper.checkin(delivery)


class GuardedMsg(Msg):
    """A received message whose ack, nak or term ends its borrow."""

    # Not a dataclass field: the borrow of a JetStream message while it is out, else None.
    _poolkeeper_delivery: _Delivery | None = None

    async def ack(self) -> None:
        """``Msg.ack``; refused (``MsgAlreadyAckdError``) on a message the force-close nacked."""
        # Once per message: the attribute read and _settle() inline, Msg.ack called directly
        # (the next class in the MRO; super() makes an object per call).
        delivery = self._poolkeeper_delivery
        if delivery is not None and delivery.forced:
            raise MsgAlreadyAckdError(self)
        await Msg.ack(self)
        if delivery is not None and self._poolkeeper_delivery is delivery:
            self._poolkeeper_delivery = None
            delivery.keeper.checkin(delivery)

    async def ack_sync(self, timeout: float = 1.0) -> Msg:
        """``Msg.ack_sync``; refused like :meth:`ack` once forced."""
        delivery = _delivery(self)
        if delivery is not None and delivery.forced:
            raise MsgAlreadyAckdError(self)
        response = await Msg.ack_sync(self, timeout)
        if delivery is not None:
            _settle(delivery)
        return response

    async def nak(self, delay: float | None = None) -> None:
        """``Msg.nak``; a no-op on a message the force-close nacked already."""
        delivery = _delivery(self)
        if delivery is not None and delivery.forced:
            return
        await Msg.nak(self, delay)
        if delivery is not None:
            _settle(delivery)

    async def term(self) -> None:
        """``Msg.term``; a no-op once forced (the message was given back for redelivery)."""
        delivery = _delivery(self)
        if delivery is not None and delivery.forced:
            return
        await Msg.term(self)
        if delivery is not None:
            _settle(delivery)


def _driver_of(client: Any) -> NatsDriver | None:
    return getattr(client, "_poolkeeper_driver", None)


def _jetstream_guard(base: type[Any]) -> type[Any]:
    """A JetStream context whose pull subscriptions record the task each fetched message goes to."""

    class GuardedJetStreamContext(base):  # type: ignore[misc]  # a library class chosen at run time
        async def pull_subscribe_bind(self, *args: Any, **kwargs: Any) -> Any:
            # pull_subscribe() ends here too: the one place a PullSubscription is made.
            subscription = await super().pull_subscribe_bind(*args, **kwargs)
            subscription.__class__ = guarded_subclass(type(subscription), _pull_guard)
            return subscription

    return GuardedJetStreamContext


def _pull_guard(base: type[Any]) -> type[Any]:
    """``fetch()`` hands its messages to the task calling it: that task is their handler."""

    class GuardedPullSubscription(base):  # type: ignore[misc]  # a library class chosen at run time
        async def fetch(self, *args: Any, **kwargs: Any) -> Any:
            messages = await super().fetch(*args, **kwargs)
            task = asyncio.current_task()
            for message in messages:
                delivery = _delivery(message)
                if delivery is not None:
                    delivery.task = task  # cancelled at the drain deadline if its message is still out
            return messages

    return GuardedPullSubscription


# -- the client's guarded methods: set on the client by NatsDriver.attach() with set_methods(), as
# instance attributes over its class's methods, each calling the class's own. Not a guarded
# subclass as __class__, which would slow every attribute read of nats-py's own code on the
# client (per message: _subs, stats, _pending...).


def _build_message(client: Any, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> Any:  # noqa: PLR0917 -- the library's own signature
    # Runs for every message the client receives: the library's own signature (the same from
    # nats-py 2.7 on), not *args/**kwargs, which would pack a tuple and a dict per message.
    message = type(client)._build_message(client, sid, subject, reply, data, headers)  # noqa: SLF001 -- the method it replaces
    if reply.startswith(_JS_ACK_BYTES) and isinstance(message, GuardedMsg):  # a JetStream message: a borrow
        keeper: Keeper | None = getattr(client, "_poolkeeper_keeper", None)
        if keeper is not None:
            delivery = message._poolkeeper_delivery = _Delivery(client._poolkeeper_driver, keeper, message)  # noqa: SLF001 -- set by attach() with the keeper
            if not keeper.lend(delivery):
                delivery.driver.refused(message)
    return message


def _jetstream(client: Any, **opts: Any) -> Any:
    context = type(client).jetstream(client, **opts)
    if _driver_of(client) is not None:
        context.__class__ = guarded_subclass(type(context), _jetstream_guard)
    return context


async def _subscribe(client: Any, subject: str, *args: Any, **kwargs: Any) -> Any:
    driver = _driver_of(client)
    cb = kwargs.get("cb")
    internal = getattr(cb, "__self__", None) is client or kwargs.get("future") is not None
    if driver is None or internal:
        return await type(client).subscribe(client, subject, *args, **kwargs)
    driver.keeper.admit()
    if cb is not None:
        kwargs["cb"] = driver.wrap_callback(cb)
    subscription = await type(client).subscribe(client, subject, *args, **kwargs)
    driver.subscriptions.append(subscription)
    return subscription


def _publish(
    client: Any, subject: str, payload: bytes = b"", reply: str = "", headers: dict[str, str] | None = None
) -> Awaitable[None]:
    # Every ack is a publish: the library's own signature (the same from nats-py 2.7 on), and no
    # coroutine of its own, so the library's publish() is awaited with no layer between. The
    # refusal is raised by the call (nats-py's fetch() awaits it at once).
    # A pull fetch asks for messages by publishing to $JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>.
    if _PULL_NEXT in subject:
        keeper: Keeper | None = getattr(client, "_poolkeeper_keeper", None)
        if keeper is not None and not keeper.lending:
            raise keeper.refusal()
    return type(client).publish(client, subject, payload, reply, headers)  # type: ignore[no-any-return]  # the library's coroutine


async def _close(client: Any) -> None:
    driver = _driver_of(client)
    if driver is None or driver.closing_client:
        await type(client).close(client)
        return
    await driver.close_from_user()


async def _drain(client: Any) -> None:
    driver = _driver_of(client)
    if driver is None or driver.closing_client:
        await type(client).drain(client)
        return
    await driver.close_from_user()


_CLIENT_GUARDS: dict[str, Callable[..., Any]] = {
    "_build_message": _build_message,
    "jetstream": _jetstream,
    "subscribe": _subscribe,
    "publish": _publish,
    "close": _close,
    "drain": _drain,
}
#: Everything attach() sets on the client, removed by detach().
_CLIENT_ATTRIBUTES = ("_poolkeeper_keeper", "_poolkeeper_driver", "msg_class", *_CLIENT_GUARDS)


class NatsDriver(Driver):
    """Keeps one ``nats.aio.client.Client``."""

    kind = "nats"
    refusal_class = NatsPoolClosedError

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.client = client
        self._loop = asyncio.get_running_loop() if _running() else None
        self.subscriptions: list[Any] = []
        self._naks: set[asyncio.Future[None]] = set()
        self._stopping: asyncio.Task[None] | None = None
        self.closing_client = False
        self._inherited = False

    @property
    def home_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the client was wrapped on (nats-py binds its tasks to the running loop)."""
        return self._loop

    def describe(self) -> str:
        """The server the client is connected to, without credentials."""
        server = getattr(self.client, "connected_url", None)
        if server is None:
            return "nats Client"
        return f"nats://{server.hostname}:{server.port}"

    def secrets(self) -> tuple[str, ...]:
        """Passwords and tokens of the configured servers and options."""
        found: list[str] = []
        options = getattr(self.client, "options", {}) or {}
        for key in ("password", "token", "nkeys_seed", "user_jwt_cb"):
            value = options.get(key)
            if isinstance(value, str):
                found.append(value)
        for server in getattr(self.client, "servers", []) or []:
            uri = getattr(server, "uri", None)
            if uri is not None and uri.password:
                found.append(uri.password)
        return tuple(dict.fromkeys(secret for secret in found if secret))

    def describe_borrow(self, connection: Any) -> str | None:
        """``stream 'ORDERS' consumer 'worker' sequence 42`` for a delivery."""
        return connection.describe() if isinstance(connection, _Delivery) else None

    # -- guards -------------------------------------------------------------------------------

    def attach(self, keeper: Keeper) -> None:
        """Set the client's guarded methods (its messages become ``GuardedMsg``)."""
        super().attach(keeper)
        if self._loop is None:
            raise ValueError("resource: wrap a nats Client from a coroutine, on the loop it runs on")
        if self.client.is_closed:
            raise ValueError("resource: this nats Client is already closed")
        client = self.client
        try:
            client._poolkeeper_driver = self  # type: ignore[attr-defined]  # noqa: SLF001 -- read by the guards above
            client._poolkeeper_keeper = keeper  # type: ignore[attr-defined]  # noqa: SLF001 -- read per message
            client.msg_class = GuardedMsg  # its messages are made guarded: _build_message() reads it
            set_methods(client, _CLIENT_GUARDS)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Give the client back its class's own methods."""
        remove_attributes(self.client, _CLIENT_ATTRIBUTES)

    def refused(self, message: GuardedMsg) -> None:
        """A JetStream message arrived after the force-close began: not lent, nacked at once."""
        _mark(message, None)
        with contextlib.suppress(RuntimeError):  # the loop is closing: nothing to give back to
            task = asyncio.ensure_future(self._nak(message))
            self._naks.add(task)  # a reference until done: asyncio keeps tasks only weakly
            task.add_done_callback(self._naks.discard)

    def wrap_callback(self, cb: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], Awaitable[None]]:
        """``cb`` recording the handler task of each message it gets; a message arriving while closing is nacked."""
        keeper = self.keeper
        loop = asyncio.get_running_loop()  # subscribe()'s: where nats-py runs the callbacks

        def on_message(message: Msg) -> Awaitable[None]:
            # No coroutine of its own: it returns the handler's (or the nak's), which the
            # subscription's task then awaits with no layer between, on every message.
            delivery: _Delivery | None = getattr(message, "_poolkeeper_delivery", None)  # _delivery(), inline
            if delivery is not None:
                if not keeper.lending:
                    return self._nak(message)  # arrived before the server saw the UNSUB: give it back
                delivery.task = current_task_of(loop)  # the subscription's task, about to await the handler
            return cb(message)

        # nats-py takes a callback that is a coroutine function, or has one as its ``func`` (its
        # rule for functools.partial): this is the second kind.
        on_message.func = cb  # type: ignore[attr-defined]  # read by nats-py's subscribe()
        return on_message

    async def _nak(self, message: Msg) -> None:
        delivery = _delivery(message)
        if not message._ackd:  # noqa: SLF001 -- no public flag
            try:
                await Msg.nak(message)
            except Exception:  # the connection closed: the server redelivers after ack_wait
                logger.debug("poolkeeper %r: nak failed", self.keeper.name, exc_info=True)
        if delivery is not None:
            _settle(delivery)

    # -- lifecycle ----------------------------------------------------------------------------

    def refuse(self) -> None:
        """Start unsubscribing and giving back the buffered messages (on the client's loop); does not wait."""
        if self._inherited or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._start_stopping)

    def _start_stopping(self) -> None:
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_receiving())

    async def _stop_receiving(self) -> None:
        client = self.client
        subscriptions = [sub for sub in self.subscriptions if sub._id in client._subs]  # noqa: SLF001
        for sub in subscriptions:
            with contextlib.suppress(Exception):  # a closed or reconnecting connection: nothing to stop
                await client._send_unsubscribe(sub._id)  # noqa: SLF001 -- UNSUB without stopping the handler's task
        with contextlib.suppress(Exception):
            await client.flush()  # the server has our UNSUBs: nothing more is on its way after this
        given_back = 0
        for sub in subscriptions:
            given_back += await self._give_back_buffered(sub)
        logger.info(
            "poolkeeper %r: %d subscription(s) stopped on the server, %d buffered message(s) given back",
            self.keeper.name,
            len(subscriptions),
            given_back,
            extra={"poolkeeper_keeper": self.keeper.name},
        )

    async def _give_back_buffered(self, sub: Any) -> int:
        """Nak the JetStream messages waiting in ``sub``'s buffer; core messages stay to be processed."""
        queue: asyncio.Queue[Msg] = sub._pending_queue  # noqa: SLF001
        waiting: list[Msg] = []
        while not queue.empty():
            waiting.append(queue.get_nowait())
            queue.task_done()
        keep = [message for message in waiting if _delivery(message) is None]
        for message in keep:
            queue.put_nowait(message)
        given_back = [message for message in waiting if _delivery(message) is not None]
        for message in given_back:
            sub._pending_size -= len(message.data)  # noqa: SLF001
        await asyncio.gather(*(self._nak(message) for message in given_back))
        return len(given_back)

    async def force_close(self, borrows: Sequence[Borrow], timeout: float) -> None:  # noqa: ARG002 -- a nak is one publish
        """Cancel the handlers still running and nak their messages."""
        if self._inherited or self._loop is None:
            return
        deliveries = [borrow.connection for borrow in borrows if isinstance(borrow.connection, _Delivery)]
        await run_on_loop(self._loop, self._force(deliveries))

    async def _force(self, deliveries: Sequence[_Delivery]) -> None:
        current = asyncio.current_task()
        for delivery in deliveries:
            delivery.forced = True
        for delivery in deliveries:
            task = delivery.task
            if task is not None and task is not current and not task.done():
                task.cancel("poolkeeper force-close")
        for delivery in deliveries:
            message = delivery.message
            if not message._ackd:  # noqa: SLF001
                try:
                    await Msg.nak(message)
                except Exception:
                    logger.debug("poolkeeper %r: nak failed", self.keeper.name, exc_info=True)
            logger.warning(
                "poolkeeper %r: message unacknowledged at the drain deadline: handler cancelled, message nacked (%s)",
                self.keeper.name,
                delivery.describe(),
                extra={"poolkeeper_keeper": self.keeper.name},
            )
            _settle(delivery)

    async def close_connections(self) -> None:
        """Close the client (its subscriptions with it); it does not reconnect afterwards."""
        if self._inherited or self._loop is None:
            return
        await run_on_loop(self._loop, self._close())

    async def _close(self) -> None:
        stopping = self._stopping
        if stopping is not None and not stopping.done():
            await asyncio.wait((stopping,))
        self.closing_client = True
        if not self.client.is_closed:
            with contextlib.suppress(Exception):
                await self.client.flush()  # the naks and acks of the drain reach the server
            await type(self.client).close(self.client)  # the class's own, past the guard

    async def close_from_user(self) -> None:
        """``await nc.close()`` / ``await nc.drain()`` on a wrapped client: this keeper's close."""
        keeper = self.keeper
        try:
            await close_keeper(keeper, None, 0.0)
        except BaseException:
            keeper.request_force()
            with contextlib.suppress(Exception):
                await close_keeper(keeper, None, 0.0)
            raise

    def forget_inherited(self, borrowed: Sequence[Any]) -> None:  # noqa: ARG002 -- all of them are the parent's
        """In a forked child: the client is the parent's; refuse, close nothing."""
        self._inherited = True


def _running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def make_driver(resource: Any) -> NatsDriver:
    """The driver for a nats-py ``Client``.

    Raises:
        UnsupportedResourceError: the installed nats-py lacks a name this adapter needs.
    """
    if not isinstance(resource, Client):
        raise TypeError(f"expected a nats Client, got {type(resource).__qualname__}")
    missing = _missing_names()
    if missing:
        raise unsupported_version("nats-py", getattr(nats, "__version__", "?"), SUPPORTED_VERSIONS, missing)
    return NatsDriver(resource)
