"""
Several messages in one: the inline tasks an orchestrator publishes in one
reactor turn, and the replies a worker sends in one turn to one
orchestrator, go to the broker as one batch (C{pfo3.amqp.messages}).

The broker's work is per message (a quorum queue writes and replicates each
one; every message is routed, stored, delivered and acknowledged), and so is
most of the client library's: under load a batch cuts both by its size.  A
message alone in its turn goes out as it is, at once at the end of the
turn: batching waits for nothing.

A batch is delivered, acknowledged and dead-lettered as one message; a
worker acknowledges it once each of its tasks is answered (L{SharedAck}),
and one delivered again (its worker may have died of one of its tasks)
goes back to the queue split into messages of its own, so that a task that
kills its workers is dead-lettered alone (C{pfo3.amqp.worker}).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from pfo3.amqp import messages
from pfo3.amqp.connection import IChannel

#: Messages in one batch at most.
MAX_ITEMS = 16

#: Bytes of the bodies in one batch at most (unless one body alone is
#: larger: it goes alone).
MAX_BYTES = 256 * 1024


class ChannelGone(Exception):
    """
    There was no channel to the broker when the batch was to go out.
    """


#: Where a batch goes, and how: C{(routing_key, reply_to, expiration,
#: persistent)}; messages that differ in any of these are not batched.
_Key = Tuple[str, Optional[str], Optional[float], bool]


class _Waiting:
    __slots__ = ("items", "size")

    def __init__(self) -> None:
        self.items: List[Tuple[str, bytes, Deferred[None]]] = []
        self.size = 0


class Batcher:
    """
    Publishes the messages given to it in one reactor turn at its end, those
    that go to the same place as one batch.
    """

    def __init__(
        self, clock: IReactorTime, channel: Callable[[], Optional[IChannel]],
        max_items: int = MAX_ITEMS, max_bytes: int = MAX_BYTES,
    ) -> None:
        """
        @param channel: The channel to publish on, asked as a batch goes
            out (L{None}: the broker is not connected).
        """
        self._clock = clock
        self._channel = channel
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._waiting: Dict[_Key, _Waiting] = {}
        self._call: Optional[IDelayedCall] = None

    def publish(
        self, routing_key: str, body: bytes, correlation_id: str,
        reply_to: Optional[str] = None, expiration: Optional[float] = None,
        persistent: bool = True,
    ) -> Deferred[None]:
        """
        Publish a message (a body of C{pfo3.amqp.messages}) soon.

        @return: A Deferred firing once the broker confirmed it (with the
            rest of its batch), failing as L{IChannel.publish} fails, or
            with L{ChannelGone}.
        """
        d: Deferred[None] = Deferred()
        key = (routing_key, reply_to, expiration, persistent)
        waiting = self._waiting.get(key)
        if waiting is not None and waiting.size + len(body) > self.max_bytes:
            del self._waiting[key]  # full: it goes now, and this one starts the next
            self._send(key, waiting.items)
            waiting = None
        if waiting is None:
            waiting = self._waiting[key] = _Waiting()
        waiting.items.append((correlation_id, body, d))
        waiting.size += len(body)
        if len(waiting.items) >= self.max_items or waiting.size >= self.max_bytes:
            del self._waiting[key]
            self._send(key, waiting.items)
        elif self._call is None:
            self._call = self._clock.callLater(0, self.flush)
        return d

    def flush(self) -> None:
        """
        Publish what waits now.
        """
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        waiting, self._waiting = self._waiting, {}
        for key, batch in waiting.items():
            self._send(key, batch.items)

    def _send(self, key: _Key, items: List[Tuple[str, bytes, Deferred[None]]]) -> None:
        routing_key, reply_to, expiration, persistent = key
        channel = self._channel()
        if len(items) == 1:
            correlation_id, body = items[0][:2]
        else:
            correlation_id = f"lote.{items[0][0]}"
            body = messages.encode_batch([(c, body) for c, body, _ in items])
        try:
            if channel is None:
                raise ChannelGone("not connected to the broker")
            sent = channel.publish(routing_key, body, correlation_id, reply_to, expiration,
                                   persistent)
        except Exception:
            # No channel, or one closing under pika (which raises): each
            # message fails, as a publish on a lost channel does.
            sent = fail()

        def confirmed(_: Any) -> None:
            for _c, _b, d in items:
                d.callback(None)

        def refused(f: Failure) -> None:
            for _c, _b, d in items:
                d.errback(f)

        sent.addCallbacks(confirmed, refused)


class SharedAck:
    """
    The acknowledgement of a batch's delivery, shared by its tasks: it goes
    out once each task's part (L{part}) acknowledged.
    """

    __slots__ = ("_channel", "_left")

    def __init__(self, channel: IChannel, parts: int) -> None:
        self._channel = channel
        self._left = parts

    def part(self) -> Part:
        """
        @return: What one task acknowledges its part of the batch with.
        """
        return Part(self)

    def _settled(self, tag: int) -> None:
        self._left -= 1
        if self._left == 0:
            self._channel.ack(tag)


class Part:
    """
    One task's part of a L{SharedAck}: acknowledging it twice counts once.
    """

    __slots__ = ("_shared", "_done")

    def __init__(self, shared: SharedAck) -> None:
        self._shared = shared
        self._done = False

    def ack(self, tag: int) -> None:
        if not self._done:
            self._done = True
            self._shared._settled(tag)
