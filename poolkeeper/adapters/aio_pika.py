"""The aio-pika keeper: a ``Connection`` or ``RobustConnection``, its channels, queues and consumers.

``wrap()`` returns the same connection. Its class becomes a guarded subclass of its own
(``isinstance`` and every reference still hold), and the channels it makes create guarded
queues and exchanges, so that:

* a delivered message is a borrow from the moment its handler receives it until the handler
  acks, nacks or rejects it (``message.process()`` included); with ``no_ack=True`` it is a
  borrow until the handler returns, since there is nothing to acknowledge;
* once closing starts, every consumer is cancelled on the broker (``basic.cancel``), messages
  already delivered but not yet handed to a handler (still in a ``queue.iterator()``'s buffer,
  or arriving before the broker saw the cancel) are given back at once (``basic.nack`` with
  requeue), new ``channel()`` and ``consume()`` calls raise
  :class:`~poolkeeper.PoolClosedError`, and publishing goes on (handlers publish their results);
* handlers in progress get the drain timeout to finish; at the deadline the ones still running
  are cancelled and their messages requeued (``basic.nack``), each reported as forced with its
  queue and delivery tag; a late ``ack()`` from such a handler raises ``MessageProcessError``
  instead of acknowledging a message the broker already gave to someone else, and publishing is
  refused from then on;
* then the connection closes (its channels with it); a ``RobustConnection`` never reconnects
  afterwards, and ``await connection.close()`` (or leaving ``async with connection``) on a
  wrapped connection runs this same close instead of cutting the handlers off.

When a channel closes (the broker closed it, or the connection dropped) the broker requeues its
unacknowledged messages by itself; their borrows end there, counted as returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from functools import partial
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any

import aio_pika
import aio_pika.queue
from aio_pika.connection import Connection
from aio_pika.exceptions import ChannelInvalidStateError, MessageProcessError
from aio_pika.message import IncomingMessage
from aio_pika.queue import QueueIterator
from aio_pika.tools import ensure_awaitable

from poolkeeper._concurrency import current_task_of, run_on_loop
from poolkeeper._keeper import KeeperState
from poolkeeper._shutdown import close_keeper
from poolkeeper.adapters._base import Driver, guarded_subclass, unsupported_version
from poolkeeper.errors import PoolClosedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from poolkeeper._borrowers import Borrow
    from poolkeeper._keeper import Keeper

__all__ = ["AioPikaDriver", "AioPikaPoolClosedError", "make_driver"]

logger = logging.getLogger("poolkeeper.aio_pika")

# -- what this adapter reads from aio-pika, per version line ----------------------------------
# Resolved at import (class attributes) and checked at wrap time; a missing name makes wrap()
# raise UnsupportedResourceError, never a shutdown fail halfway.
#
#   Connection.channel(), .close(), .loop,      9.4+  channel() is sync and returns the channel
#     .transport, .url, .is_closed                     unopened: its class attributes are set before
#                                                      it opens
#   Connection._close_called                    9.4+  (10.x adds the public close_called over it)
#   Channel.QUEUE_CLASS, .EXCHANGE_CLASS,       9.4+  read by declare_queue/get_queue/declare_exchange
#     ._connection                                     and by the default exchange as the channel opens
#   Queue.consume(callback, no_ack, ...),       9.4+  RobustQueue.restore() calls consume() again with
#     .cancel(tag), .iterator(), .name                 the callback it was given: ours, already wrapped
#   QueueIterator.on_message, ._queue,          9.4+  its consumer callback, its buffer (an
#     ._amqp_queue                                     asyncio.Queue, emptied by the close), its queue
#   IncomingMessage.ack/nack/reject, .channel,  9.4+  (the class uses __slots__: the guarded subclass
#     .delivery_tag, .processed                        adds none, so __class__ assignment works);
#     ._IncomingMessage__channel                       the slot behind .channel, read per message
#   aiormq Channel.basic_nack, .closing         aiormq 6.8+
#   aio_pika.queue.consumer, aiormq             9.4+  optional (the per-message fast path): Queue.consume
#     Channel.consumers, DeliveredMessage                registers partial(consumer, callback, no_ack=...)
#     .channel                                           in the aiormq channel's consumers by tag; when
#                                                        that is what is there, the keeper's own consumer
#                                                        takes its place (see AioPikaDriver.take_over)

#: The aio-pika versions this adapter is tested with.
SUPPORTED_VERSIONS = ">=9.4.0"

_REQUIRED: tuple[tuple[Any, str], ...] = (
    (Connection, "channel"),
    (Connection, "CHANNEL_CLASS"),
    (aio_pika.Channel, "QUEUE_CLASS"),
    (aio_pika.Channel, "EXCHANGE_CLASS"),
    (aio_pika.Queue, "consume"),
    (aio_pika.Queue, "cancel"),
    (aio_pika.Queue, "iterator"),
    (QueueIterator, "on_message"),
    (IncomingMessage, "processed"),
    (IncomingMessage, "_IncomingMessage__channel"),
)


def _missing_names() -> list[str]:
    """The names this adapter needs that the installed aio-pika lacks."""
    return [f"{owner.__name__}.{name}" for owner, name in _REQUIRED if not hasattr(owner, name)]


class AioPikaPoolClosedError(PoolClosedError, ChannelInvalidStateError):
    """A channel, consumer or publish refused by a closing keeper.

    Also aio-pika's ``ChannelInvalidStateError`` (a ``RuntimeError``), what it raises on a closed
    channel or connection, so that existing ``except`` clauses catch it.
    """


class _Delivery(tuple[Any, ...]):
    """One delivered message from its handler's start to its ack, nack or reject: the unit of borrow.

    ``(driver, keeper, message, queue name, aiormq channel, handler task)``. A tuple, made by
    :data:`_new_delivery` without a Python-level ``__init__``, because one is made for every
    message; compared and hashed by identity, as each delivery is a borrow of its own. The
    handler task is ``None`` while the message waits in a queue iterator's buffer (then see
    :data:`_HANDED`).
    """

    __slots__ = ()
    __hash__ = object.__hash__
    __eq__ = object.__eq__

    if TYPE_CHECKING:
        driver: AioPikaDriver
        keeper: Keeper
        message: IncomingMessage
        queue: str
        channel: Any  # the aiormq channel it was delivered on
    else:  # read-only fields, read without a Python-level call (as namedtuple's are)
        driver, keeper, message, queue, channel = (property(itemgetter(index)) for index in range(5))

    @property
    def task(self) -> asyncio.Task[Any] | None:
        """The handler's task: the consumer callback's, or the task iterating that took it."""
        task: asyncio.Task[Any] | None = self[5]
        return _HANDED.get(self) if task is None else task

    @property
    def tag(self) -> int | None:
        """The broker's delivery tag (per channel)."""
        return self.message.delivery_tag

    def describe(self) -> str:
        return f"queue {self.queue!r} delivery tag {self.tag}"


_new_delivery: Callable[[tuple[Any, ...]], _Delivery] = partial(tuple.__new__, _Delivery)
# What IncomingMessage.channel returns, read without its Python-level property (the closed check
# it makes is done beside it).
_message_channel: Callable[[IncomingMessage], Any] = attrgetter("_IncomingMessage__channel")

# Every delivery out now, by message: how a guarded message finds its borrow. Entries leave at
# the ack, nack or reject, when the channel closes, or at the force-close: bounded by prefetch.
_OUT: dict[IncomingMessage, _Delivery] = {}
# Deliveries a queue iterator handed to the task iterating: that task, their handler.
_HANDED: dict[_Delivery, asyncio.Task[Any] | None] = {}
# Deliveries the force-close is giving back: the handler's own ack is refused, its reject a no-op.
_FORCED: set[_Delivery] = set()


def _driver_of(connection: Any) -> AioPikaDriver | None:
    """The driver keeping ``connection``, if it is wrapped (an instance attribute ``attach`` sets)."""
    return getattr(connection, "_poolkeeper_driver", None)


def _channel_driver(channel: Any) -> AioPikaDriver | None:
    connection = getattr(channel, "_connection", None)
    return None if connection is None else _driver_of(connection)


# -- guarded classes: subclasses of the library's own (guarded_subclass()), one per library class


def _settle(delivery: _Delivery) -> None:
    """The delivery is over (acked, given back, or its channel closed): end its borrow."""
    if _OUT.pop(delivery.message, None) is delivery:
        delivery.keeper.checkin(delivery)
    if _HANDED:
        _HANDED.pop(delivery, None)
    if _FORCED:
        _FORCED.discard(delivery)


def _settle_up_to(delivery: _Delivery) -> None:
    """``multiple=True``: every delivery of the same channel up to this tag is settled too."""
    tag = delivery.tag or 0
    for other in [d for d in _OUT.values() if d.channel is delivery.channel and (d.tag or 0) <= tag]:
        _settle(other)


class _MessageGuard(IncomingMessage):
    """``ack``/``nack``/``reject`` that end the borrow; refused on a message the force-close requeued."""

    __slots__ = ()

    async def ack(self, multiple: bool = False) -> None:
        delivery = _OUT.get(self)
        if delivery is not None and delivery in _FORCED:
            raise MessageProcessError(
                f"poolkeeper {delivery.keeper.name!r} requeued this message at the drain deadline "
                f"({delivery.describe()}); it was not acknowledged",
                self,
            )
        await IncomingMessage.ack(self, multiple)  # the next class in the MRO; super() costs a call more
        if delivery is None:
            return
        if multiple:
            _settle_up_to(delivery)
        elif _HANDED or _FORCED:
            _settle(delivery)
        elif _OUT.pop(self, None) is delivery:  # _settle(delivery), inline: this runs once per message
            delivery.keeper.checkin(delivery)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        delivery = _OUT.get(self)
        if delivery is not None and delivery in _FORCED:
            return  # the force-close has given it back already
        await super().nack(multiple, requeue)
        if delivery is not None:
            _settle_up_to(delivery) if multiple else _settle(delivery)

    async def reject(self, requeue: bool = False) -> None:
        delivery = _OUT.get(self)
        if delivery is not None and delivery in _FORCED:
            # Given back already: a handler cancelled inside message.process() rejects on its way
            # out, and must not drop what the force-close requeued.
            return
        await super().reject(requeue)
        if delivery is not None:
            _settle(delivery)


_guarded_messages: dict[type[Any], type[Any]] = {IncomingMessage: _MessageGuard}

# The class swap skips aio-pika's Message.__setattr__ (a Python call checking its lock flag,
# which does not apply to __class__): this runs once per delivered message.
_set_class = object.__setattr__


def _guarded_message_class(cls: type[Any]) -> type[Any]:
    """The guarded class for a message class met for the first time (a subclass of IncomingMessage)."""
    if issubclass(cls, _MessageGuard):
        return cls
    guarded = _guarded_messages[cls] = type(
        cls.__name__, (cls, _MessageGuard), {"__module__": cls.__module__, "__slots__": ()}
    )
    return guarded


def _connection_guard(base: type[Any]) -> type[Any]:
    """``channel()`` refused once closing starts; ``close()`` runs the keeper's close."""

    class GuardedConnection(base):  # type: ignore[misc]  # a library class chosen at run time
        def channel(self, *args: Any, **kwargs: Any) -> Any:
            driver = _driver_of(self)
            if driver is not None:
                driver.keeper.admit()
            channel = super().channel(*args, **kwargs)
            if driver is not None:
                # Read as the channel opens (the default exchange) and by every declare_*/get_*.
                channel.QUEUE_CLASS = guarded_subclass(channel.QUEUE_CLASS, _queue_guard)
                channel.EXCHANGE_CLASS = guarded_subclass(channel.EXCHANGE_CLASS, _exchange_guard)
            return channel

        async def close(self, *args: Any, **kwargs: Any) -> None:
            driver = _driver_of(self)
            if driver is None or driver.closing_connection:
                await super().close(*args, **kwargs)
                return
            await driver.close_from_user()

    return GuardedConnection


def _queue_guard(base: type[Any]) -> type[Any]:
    """``consume()`` refused once closing starts, its callback wrapped in the borrow accounting."""

    class GuardedQueue(base):  # type: ignore[misc]  # a library class chosen at run time
        async def consume(self, callback: Callable[..., Awaitable[Any]], no_ack: bool = False, **kwargs: Any) -> Any:
            driver = _channel_driver(self.channel)
            if driver is None:
                return await super().consume(callback, no_ack, **kwargs)
            driver.keeper.admit()
            wrapped = driver.wrap_callback(self, callback, no_ack=no_ack)
            tag = await super().consume(wrapped, no_ack, **kwargs)
            driver.consumers[tag] = self
            if not driver.keeper.lending:  # closing started during the round trip: cancel it too
                await driver.cancel_consumer(tag, self)
                raise driver.keeper.refusal()
            await driver.take_over(self, tag, wrapped, no_ack=no_ack)
            return tag

        async def cancel(self, consumer_tag: Any, *args: Any, **kwargs: Any) -> Any:
            driver = _channel_driver(self.channel)
            if driver is not None:
                driver.consumers.pop(consumer_tag, None)
            return await super().cancel(consumer_tag, *args, **kwargs)

        def iterator(self, **kwargs: Any) -> Any:
            iterator = super().iterator(**kwargs)
            driver = _channel_driver(self.channel)
            if driver is not None:
                iterator.__class__ = guarded_subclass(type(iterator), _iterator_guard)
                driver.iterators.add(iterator)
            return iterator

    return GuardedQueue


class _EndOfIteration:
    """Put in a queue iterator's buffer as closing starts: the iterating ``async for`` ends there.

    aio-pika 9.x waits for a next message forever once the consumer is cancelled (10.x wakes
    when the channel closes, after the drain). A loop over ``queue.iterator()`` ends when
    consuming stops, as the callbacks of ``queue.consume()`` do, so that the task iterating can
    finish and return.
    """

    async def nack(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to give back: the iterator's own close() nacks what is left in its buffer."""

    def __repr__(self) -> str:
        return "<poolkeeper: end of iteration>"


_END = _EndOfIteration()


def _iterator_guard(base: type[Any]) -> type[Any]:
    """A queue iterator that ends once closing starts, giving back the message it would have returned."""

    class GuardedQueueIterator(base):  # type: ignore[misc]  # a library class chosen at run time
        async def __anext__(self) -> Any:
            driver = _channel_driver(self._amqp_queue.channel)
            if driver is not None and not driver.keeper.lending:
                raise StopAsyncIteration  # closing started: the consumer is cancelled, the buffer given back
            message = await super().__anext__()
            if message is _END:
                raise StopAsyncIteration
            delivery = _OUT.get(message)
            if delivery is not None:
                if not delivery.keeper.lending:
                    await delivery.driver.give_back(message)
                    raise StopAsyncIteration
                _HANDED[delivery] = asyncio.current_task()  # handed to a handler: the iterating task
            return message

        async def end(self) -> None:
            """Wake the ``async for`` waiting on this iterator: it ends (its buffer is empty by now)."""
            # Through on_message(), not the buffer itself: 10.x also sets the event __anext__ waits on.
            await super().on_message(_END)

    return GuardedQueueIterator


def _exchange_guard(base: type[Any]) -> type[Any]:
    """Publishing goes on while draining (handlers publish results); refused once the deadline passed."""

    class GuardedExchange(base):  # type: ignore[misc]  # a library class chosen at run time
        async def publish(self, *args: Any, **kwargs: Any) -> Any:
            driver = _channel_driver(self.channel)
            if driver is not None and driver.keeper.state in (KeeperState.FORCING, KeeperState.CLOSED):
                raise driver.keeper.refusal()
            return await super().publish(*args, **kwargs)

    return GuardedExchange


class AioPikaDriver(Driver):
    """Keeps one ``aio_pika.Connection`` or ``RobustConnection``."""

    kind = "aio-pika"
    refusal_class = AioPikaPoolClosedError

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self.connection = connection
        self._library_class: type[Any] = type(connection)
        #: Active consumers by tag (queue.cancel() and the close remove them).
        self.consumers: dict[Any, Any] = {}
        self.iterators: weakref.WeakSet[Any] = weakref.WeakSet()
        # Messages that arrived after closing started, before their consumer's cancel was done:
        # nacked once it is, so that the broker does not hand them straight back to us.
        self._held: list[IncomingMessage] = []
        self._stopped = False
        self._stopping: asyncio.Task[None] | None = None
        self._watched: weakref.WeakSet[Any] = weakref.WeakSet()  # aiormq channels with a close callback
        self.closing_connection = False
        self._inherited = False

    @property
    def home_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the connection was made on."""
        return self.connection.loop

    def describe(self) -> str:
        """The broker URL without credentials or query."""
        return str(self.connection.url.with_user(None).with_query(None))

    def secrets(self) -> tuple[str, ...]:
        """The URL's password."""
        password = self.connection.url.password
        return (password,) if password else ()

    def describe_borrow(self, connection: Any) -> str | None:
        """``queue 'orders' delivery tag 7`` for a delivery."""
        return connection.describe() if isinstance(connection, _Delivery) else None

    # -- guards -------------------------------------------------------------------------------

    def attach(self, keeper: Keeper) -> None:
        """Give the connection its guarded class; nothing is left behind if that fails."""
        super().attach(keeper)
        connection = self.connection
        # close_called is public from aio-pika 10; the attribute behind it is there from 9.4 on.
        if connection.is_closed or getattr(connection, "_close_called", False):
            raise ValueError("resource: this aio-pika connection is already closed")
        vars(connection)["_poolkeeper_driver"] = self
        try:
            connection.__class__ = guarded_subclass(self._library_class, _connection_guard)
        except BaseException:
            vars(connection).pop("_poolkeeper_driver", None)
            raise

    def detach(self) -> None:
        """Give the connection back its own class; channels made meanwhile pass everything through."""
        if getattr(type(self.connection), "_poolkeeper_guard", None) is _connection_guard:
            self.connection.__class__ = self._library_class
        vars(self.connection).pop("_poolkeeper_driver", None)

    def wrap_callback(self, queue: Any, callback: Callable[..., Any], *, no_ack: bool) -> Any:  # noqa: C901 -- the closure's branches are the cases of one delivery
        """``callback`` wrapped so that each message it handles is a borrow until acknowledged.

        What is returned goes to aio-pika's ``Queue.consume()``: a coroutine function that makes
        the message a borrow, then awaits the handler. It also carries, as ``_poolkeeper_consumer``,
        the consumer :meth:`take_over` puts in place of aio-pika's ``consumer()`` once the broker
        confirmed the consume: the same borrow, with the handler's task started by the keeper
        itself, so that a message costs no coroutine layer more than unwrapped.
        """
        if getattr(callback, "_poolkeeper_delivery", False):
            return callback  # RobustQueue.restore() consuming again with the callback it was given
        keeper = self.keeper
        lend = keeper.lend
        out = _OUT
        new_delivery = _new_delivery
        message_channel = _message_channel
        guarded_messages = _guarded_messages
        buffered = isinstance(getattr(callback, "__self__", None), QueueIterator)  # an iterator's buffer
        if buffered and no_ack:
            return callback  # nothing to give back, and the iterating task is no borrow of ours
        handler = ensure_awaitable(callback)  # what aio-pika's consume() does with a plain function
        queue_name = queue.name
        loop = self.home_loop
        watched: list[Any] = [None]  # the channel this consumer's last message came on

        async def on_message(message: IncomingMessage) -> Any:
            if not keeper.lending:
                await self.give_back(message)
                return None
            channel = message_channel(message)  # the aiormq channel: message.channel, without a call
            if channel.is_closed:
                return None  # its channel closed already: the broker requeued it
            delivery = new_delivery(
                (self, keeper, message, queue_name, channel, None if buffered else current_task_of(loop))
            )
            if not no_ack:
                cls = type(message)
                _set_class(message, "__class__", guarded_messages.get(cls) or _guarded_message_class(cls))
            out[message] = delivery
            if not lend(delivery):
                out.pop(message, None)
                await self.give_back(message)
                return None
            if channel is not watched[0]:  # one channel per consumer, almost always: skip the WeakSet
                watched[0] = channel
                self._watch(channel)
            if not no_ack:
                return await handler(message)
            try:
                return await handler(message)
            finally:
                _settle(delivery)

        setattr(on_message, "_poolkeeper_delivery", True)  # noqa: B010 -- marks it wrapped; mypy knows no such name
        if buffered:
            return on_message  # the handler is the task iterating: nothing to start here

        consumer = self._direct_consumer(handler, queue_name, no_ack=no_ack)
        setattr(on_message, "_poolkeeper_consumer", consumer)  # noqa: B010 -- read by take_over()
        return on_message

    def _direct_consumer(
        self,
        handler: Callable[[IncomingMessage], Awaitable[Any]],
        queue_name: str,
        *,
        no_ack: bool,
    ) -> Callable[[Any], Awaitable[Any]]:
        """What :meth:`take_over` registers: aio-pika's ``consumer()``, with the borrow made inside."""
        keeper = self.keeper
        lend = keeper.lend
        out = _OUT
        new_delivery = _new_delivery
        message_class = IncomingMessage if no_ack else _MessageGuard
        create_task = self.home_loop.create_task
        watched: list[Any] = [None]

        async def consumer(delivered: Any) -> Any:
            # aio-pika's consumer() makes an IncomingMessage, then a task running the handler.
            # Here the borrow is made between the two: the task is known before it runs, the
            # message is made guarded instead of having its class changed, and the handler is
            # not awaited through on_message(), a coroutine layer each of its suspensions crosses.
            message = message_class(delivered, no_ack=no_ack)
            if not keeper.lending:
                await self.give_back(message)
                return None
            channel = delivered.channel
            if channel.is_closed:
                return None  # its channel closed already: the broker requeued it
            task: asyncio.Task[Any] = create_task(handler(message))  # type: ignore[arg-type]  # ensure_awaitable() gives a coroutine function
            delivery = new_delivery((self, keeper, message, queue_name, channel, task))
            out[message] = delivery
            if not lend(delivery):  # closing started since the check above (from another thread)
                out.pop(message, None)
                task.cancel()  # before its first step: the handler never runs
                await self.give_back(message)
                return None
            if channel is not watched[0]:  # one channel per consumer, almost always: skip the WeakSet
                watched[0] = channel
                self._watch(channel)
            if no_ack:  # nothing to acknowledge: the borrow ends with the handler
                task.add_done_callback(lambda _: _settle(delivery))
            return await task

        return consumer

    async def take_over(self, queue: Any, tag: Any, wrapped: Any, *, no_ack: bool) -> None:
        """Put the keeper's consumer in place of aio-pika's for ``tag``, where that is what is there.

        Messages delivered before this (right after the broker's ConsumeOk) went through
        ``wrapped`` itself: the same borrow, one coroutine layer slower. Where aio-pika registered
        anything else (a version that consumes differently), it stays: ``wrapped`` keeps working.
        """
        consumer = getattr(wrapped, "_poolkeeper_consumer", None)
        if consumer is None:
            return
        try:
            channel = await queue.channel.get_underlay_channel()
        except ChannelInvalidStateError:  # the channel closed meanwhile: nothing is delivered to it any more
            return
        consumers = getattr(channel, "consumers", None)
        registered = consumers.get(tag) if isinstance(consumers, dict) else None
        if (
            isinstance(registered, partial)
            and registered.func is aio_pika.queue.consumer
            and registered.args == (wrapped,)
            and registered.keywords == {"no_ack": no_ack}
        ):
            consumers[tag] = consumer  # type: ignore[index]  # a dict, checked above

    def _watch(self, channel: Any) -> None:
        """When ``channel`` closes, the broker requeues its unacknowledged messages: end their borrows."""
        if channel in self._watched:
            return
        self._watched.add(channel)
        ref = weakref.ref(channel)

        def closed(_: asyncio.Future[Any]) -> None:
            gone = [delivery for delivery in _OUT.values() if delivery.channel is ref()]
            for delivery in gone:
                _settle(delivery)

        channel.closing.add_done_callback(closed)

    async def give_back(self, message: IncomingMessage) -> None:
        """Requeue a message no handler got: now, or once the consumers are cancelled."""
        if message.processed:  # no_ack, or given back already
            return
        if not self._stopped:  # refuse() has scheduled the cancels: nack once the broker has them
            self._held.append(message)
            return
        await self._nack(message)

    async def _nack(self, message: IncomingMessage) -> None:
        delivery = _OUT.get(message)
        try:
            if not message.processed:
                await IncomingMessage.nack(message, requeue=True)
        except Exception:  # the channel closed: the broker requeued it by itself
            logger.debug("poolkeeper %r: nack failed", self.keeper.name, exc_info=True)
        if delivery is not None:
            _settle(delivery)

    async def cancel_consumer(self, tag: Any, queue: Any) -> None:
        """Cancel one consumer on the broker; a closed channel has no consumers left to cancel."""
        self.consumers.pop(tag, None)
        try:
            await queue.cancel(tag)
        except Exception:
            logger.debug("poolkeeper %r: basic.cancel %s failed", self.keeper.name, tag, exc_info=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def refuse(self) -> None:
        """Start cancelling every consumer on the broker (on the connection's loop); does not wait."""
        if self._inherited:
            return
        self.home_loop.call_soon_threadsafe(self._start_stopping)

    def _start_stopping(self) -> None:
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_consuming())

    async def _stop_consuming(self) -> None:
        consumers = list(self.consumers.items())
        await asyncio.gather(*(self.cancel_consumer(tag, queue) for tag, queue in consumers))
        self._stopped = True
        held, self._held = self._held, []
        # What waits in a queue iterator's buffer goes back one by one. Not through the iterator's
        # close(): aio-pika 9.x nacks its buffer with multiple=True, which also gives back the
        # message a handler is working on (every lower delivery tag on the channel).
        for iterator in list(self.iterators):
            buffer = iterator._queue  # noqa: SLF001 -- see the table at the top
            while not buffer.empty():
                held.append(buffer.get_nowait())
            await iterator.end()
        for message in held:
            await self._nack(message)
        logger.info(
            "poolkeeper %r: %d consumer(s) cancelled on the broker, %d undelivered message(s) given back",
            self.keeper.name,
            len(consumers),
            len(held),
            extra={"poolkeeper_keeper": self.keeper.name},
        )

    async def force_close(self, borrows: Sequence[Borrow], timeout: float) -> None:  # noqa: ARG002 -- a nack is one frame
        """Cancel the handlers still running and requeue their messages."""
        if self._inherited:
            return
        deliveries = [borrow.connection for borrow in borrows if isinstance(borrow.connection, _Delivery)]
        await run_on_loop(self.home_loop, self._force(deliveries))

    async def _force(self, deliveries: Sequence[_Delivery]) -> None:
        current = asyncio.current_task()
        for delivery in deliveries:
            _FORCED.add(delivery)  # before the cancel: the handler's own reject on its way out is a no-op
        for delivery in deliveries:
            task = delivery.task
            if task is not None and task is not current and not task.done():
                task.cancel("poolkeeper force-close")
        await asyncio.gather(*(self._requeue(delivery) for delivery in deliveries))
        for delivery in deliveries:
            logger.warning(
                "poolkeeper %r: handler still running at the drain deadline: cancelled, message requeued (%s)",
                self.keeper.name,
                delivery.describe(),
                extra={"poolkeeper_keeper": self.keeper.name, "poolkeeper_queue": delivery.queue},
            )
            _settle(delivery)

    async def _requeue(self, delivery: _Delivery) -> None:
        message = delivery.message
        if message.processed or message.delivery_tag is None:
            return  # no_ack, or acknowledged meanwhile: nothing the broker still holds for us
        try:
            # The library's own nack (past the guard's): the message counts as processed then,
            # so that a late ack() from its handler raises instead of acking what is given back.
            await IncomingMessage.nack(message, requeue=True)
        except Exception:  # the channel closed: the broker requeued it by itself
            logger.debug("poolkeeper %r: nack failed", self.keeper.name, exc_info=True)

    async def close_connections(self) -> None:
        """Close the connection and its channels; a robust one stops reconnecting for good."""
        if self._inherited:
            return
        await run_on_loop(self.home_loop, self._close())

    async def _close(self) -> None:
        stopping = self._stopping
        if stopping is not None and not stopping.done():
            await asyncio.wait((stopping,))
        self.closing_connection = True
        await self._library_class.close(self.connection)

    async def close_from_user(self) -> None:
        """``await connection.close()`` on a wrapped connection: this keeper's close, as the registry runs it."""
        keeper = self.keeper
        try:
            report = await close_keeper(keeper, None, 0.0)
        except BaseException:
            keeper.request_force()  # cancelled while draining: force the rest, then go on cancelled
            with contextlib.suppress(Exception):
                await close_keeper(keeper, None, 0.0)
            raise
        if report.outcome != "skipped":
            logger.log(
                logging.INFO if report.ok else logging.WARNING,
                "poolkeeper %r: closed by Connection.close(): %s (borrowed %d, returned %d, forced %d)",
                report.name,
                report.outcome,
                report.borrowed_at_start,
                report.returned,
                report.forced,
                extra={"poolkeeper_keeper": report.name, "poolkeeper_report": report.to_dict()},
            )

    def forget_inherited(self, borrowed: Sequence[Any]) -> None:  # noqa: ARG002 -- all of them are the parent's
        """In a forked child: the connection is the parent's (its loop and socket); refuse, close nothing."""
        self._inherited = True


def make_driver(resource: Any) -> AioPikaDriver:
    """The driver for an ``aio_pika.Connection`` or ``RobustConnection``.

    Raises:
        UnsupportedResourceError: the installed aio-pika lacks a name this adapter needs.
    """
    if not isinstance(resource, Connection):
        raise TypeError(f"expected an aio-pika Connection, got {type(resource).__qualname__}")
    missing = _missing_names()
    if missing:
        raise unsupported_version("aio-pika", aio_pika.__version__, SUPPORTED_VERSIONS, missing)
    return AioPikaDriver(resource)
