"""
L{pfo3.amqp.connection.PikaChannel} hands pika the properties each message
needs, though it builds them once per kind of message.
"""

from __future__ import annotations

from typing import Any, List, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from pfo3.amqp.connection import PikaChannel


class _RecordingChannel:
    """
    The C{basic_publish} of pika's Twisted channel, recording the properties
    as they are when pika encodes them (during the call).
    """

    def __init__(self) -> None:
        self.published: List[Tuple[str, Any, Any, Any, Any]] = []

    def basic_publish(self, exchange: str, routing_key: str, body: bytes, properties: Any,
                      mandatory: bool = False) -> Deferred[Any]:
        self.published.append((
            routing_key, properties.correlation_id, properties.reply_to,
            properties.expiration, properties.delivery_mode))
        return succeed(None)


class PropertiesTests(SynchronousTestCase):
    """
    Each publish carries its own correlation id and settings.
    """

    def test_each_message_its_properties(self) -> None:
        """
        Messages of the same kind carry their own correlation ids; messages
        of other kinds (another reply queue, expiry or persistence) their
        own settings, and the first kind is unchanged after them.
        """
        raw = _RecordingChannel()
        channel = PikaChannel(raw)  # type: ignore[arg-type]
        channel.publish("q", b"1", "a", reply_to="r1", expiration=2.5)
        channel.publish("q", b"2", "b", reply_to="r1", expiration=2.5)
        channel.publish("q", b"3", "c", reply_to="r2", persistent=False)
        channel.publish("q", b"4", "d", reply_to="r1", expiration=2.5)
        self.assertEqual(raw.published, [
            ("q", "a", "r1", "2500", 2), ("q", "b", "r1", "2500", 2),
            ("q", "c", "r2", None, 1), ("q", "d", "r1", "2500", 2)])

    def test_many_reply_queues(self) -> None:
        """
        A channel publishing more kinds of message than it keeps properties
        for still gives each message its own settings.
        """
        raw = _RecordingChannel()
        channel = PikaChannel(raw)  # type: ignore[arg-type]
        for i in range(200):
            channel.publish(f"q{i}", b"x", str(i), reply_to=f"r{i}", persistent=False)
        self.assertEqual([(p[1], p[2]) for p in raw.published],
                         [(str(i), f"r{i}") for i in range(200)])
