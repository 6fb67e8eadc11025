"""
L{pfo3.amqp.connection.TurnWriter}: what pika writes in one reactor turn
goes out in one send at the end of the turn.
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pfo3.amqp.connection import TurnWriter


class _Transport:
    """
    The parts of a TCP transport that L{TurnWriter} uses: C{writeSomeData}
    takes at most C{room} bytes; C{write} buffers.
    """

    def __init__(self, room: int = 1 << 20) -> None:
        self.room = room
        self.sent: List[bytes] = []
        self.buffered: List[bytes] = []
        self.connected = True
        self.disconnecting = False
        self.lost = False

    def writeSomeData(self, data: bytes) -> Any:  # noqa: N802
        taken = data[:self.room]
        self.room -= len(taken)
        self.sent.append(taken)
        return len(taken)

    def write(self, data: bytes) -> None:
        self.buffered.append(data)

    def loseConnection(self) -> None:  # noqa: N802
        self.lost = True

    def getPeer(self) -> str:  # noqa: N802
        return "peer"


class TurnWriterTests(SynchronousTestCase):
    """
    Writes of a turn are joined and sent at its end, in order, falling
    back to the transport's buffer when the socket is full.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = _Transport()
        self.writer = TurnWriter(self.transport, self.clock)

    def test_one_send_per_turn(self) -> None:
        """
        The frames written in one turn are sent together, by one send at the
        end of the turn, and nothing goes through the transport's buffer.
        """
        for frame in (b"a", b"b", b"c"):
            self.writer.write(frame)
        self.assertEqual(self.transport.sent, [])
        self.clock.advance(0)
        self.writer.writeSequence([b"d", b"e"])
        self.clock.advance(0)
        self.assertEqual((self.transport.sent, self.transport.buffered), ([b"abc", b"de"], []))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_full_socket(self) -> None:
        """
        What the socket does not take goes to the transport's buffered
        C{write}, and so does everything written after it: the order holds.
        """
        self.transport.room = 2
        self.writer.write(b"abc")
        self.clock.advance(0)
        self.transport.room = 100
        self.writer.write(b"d")
        self.clock.advance(0)
        self.assertEqual((self.transport.sent, self.transport.buffered),
                         ([b"ab"], [b"c", b"d"]))

    def test_closed_transport(self) -> None:
        """
        A transport no longer connected, or closing, gets the bytes through
        its own C{write}, which applies its rules for that state.
        """
        self.transport.disconnecting = True
        self.writer.write(b"a")
        self.clock.advance(0)
        self.assertEqual((self.transport.sent, self.transport.buffered), ([], [b"a"]))

    def test_lose_connection_sends_first(self) -> None:
        """
        Closing the connection first sends what this turn wrote (pika's last
        frames), then closes.
        """
        self.writer.write(b"close")
        self.writer.loseConnection()
        self.assertEqual((self.transport.sent, self.transport.lost), ([b"close"], True))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_other_attributes(self) -> None:
        """
        Everything else is the transport's (C{setTcpNoDelay}, C{getPeer}...).
        """
        self.assertEqual(self.writer.getPeer(), "peer")
