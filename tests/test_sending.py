"""
Tests for L{pfo3.sending}: how the line protocol writes to its transport.
"""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path
from typing import Any, List, Union

import pytest
import pytest_twisted
from twisted.internet import endpoints, main, tcp
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase

from pfo3.sending import SendNow, writers_for
from pfo3.testing import make_server

from .conftest import TLSFiles


class FakeTCP:
    """
    The parts of a TCP transport that L{SendNow} uses: a socket that takes
    C{room} bytes, then nothing (or reports the connection lost), and the
    transport's buffered C{write}.
    """

    connected = True
    disconnecting = False

    def __init__(self, room: int = 1 << 20, lost: bool = False) -> None:
        self.room = room
        self.lost = lost
        self.sent: List[bytes] = []
        self.buffered: List[bytes] = []

    def writeSomeData(self, data: bytes) -> Union[int, ConnectionLost]:  # noqa: N802
        if self.lost:
            return main.CONNECTION_LOST
        taken = bytes(data[: self.room])
        self.room -= len(taken)
        self.sent.append(taken)
        return len(taken)

    def write(self, data: bytes) -> None:
        self.buffered.append(data)


class SendNowTests(SynchronousTestCase):
    """
    L{SendNow} sends at once while the transport holds nothing of ours, and
    leaves everything to the transport from the first byte the socket does
    not take.
    """

    def test_sent_at_once(self) -> None:
        """
        Writes the socket takes whole never reach the transport's buffer.
        """
        t = FakeTCP()
        w = SendNow(t)  # type: ignore[arg-type]
        w.write(b"uno\n")
        w.write(b"dos\n")
        self.assertEqual((t.sent, t.buffered), ([b"uno\n", b"dos\n"], []))

    def test_rest_and_what_follows_go_through_the_transport(self) -> None:
        """
        What the socket did not take is given to the transport, and so is
        every later write, even once the socket would take it: the order
        of the bytes is kept.
        """
        t = FakeTCP(room=3)
        w = SendNow(t)  # type: ignore[arg-type]
        w.write(b"abcdef")
        t.room = 100
        w.write(b"gh")
        self.assertEqual(t.sent, [b"abc"])
        self.assertEqual(t.buffered, [b"def", b"gh"])

    def test_lost_connection(self) -> None:
        """
        A connection the socket reports lost gets the data through the
        transport, which reports the loss its own way.
        """
        t = FakeTCP(lost=True)
        w = SendNow(t)  # type: ignore[arg-type]
        w.write(b"x\n")
        w.write(b"y\n")
        self.assertEqual((t.sent, t.buffered), ([], [b"x\n", b"y\n"]))

    def test_soon_goes_through_the_transport(self) -> None:
        """
        A reply ready on its own goes to the transport's buffer (sent once
        per reactor turn with the others ready in that turn), and so does
        every later write, to keep the order.
        """
        t = FakeTCP()
        w = SendNow(t)  # type: ignore[arg-type]
        w.write(b"a\n")
        w.soon(b"b\n")
        w.write(b"c\n")
        self.assertEqual((t.sent, t.buffered), ([b"a\n"], [b"b\n", b"c\n"]))

    def test_closing_connection(self) -> None:
        """
        Once the transport is closing (or closed), writes are the
        transport's, under its rules.
        """
        for attribute, value in (("disconnecting", True), ("connected", False)):
            t: Any = FakeTCP()
            setattr(t, attribute, value)
            SendNow(t).write(b"z\n")
            self.assertEqual((t.sent, t.buffered), ([], [b"z\n"]))


class WriterForTests(SynchronousTestCase):
    """
    L{writers_for} looks through wrappers that pass writes through unchanged,
    and through nothing else.
    """

    def test_through_a_pass_through_wrapper(self) -> None:
        """
        Behind the PROXY protocol's wrapper, the protocol writes to the
        transport the wrapper wraps, not through the wrapper.
        """
        inner = StringTransport()
        wrapper = HAProxyProtocolWrapper(HAProxyWrappingFactory(Factory()), Protocol())
        wrapper.makeConnection(inner)
        self.assertEqual(writers_for(wrapper), (inner.write, inner.write))

    def test_not_through_a_wrapper_that_writes_its_own_way(self) -> None:
        """
        A wrapper that does something with what is written is written to.
        """
        class Counting(ProtocolWrapper):
            written = 0

            def write(self, data: bytes) -> None:
                self.written += len(data)
                ProtocolWrapper.write(self, data)

        wrapper = Counting(WrappingFactory(Factory()), Protocol())
        wrapper.makeConnection(StringTransport())
        self.assertEqual(writers_for(wrapper), (wrapper.write, wrapper.write))

    def test_other_transports(self) -> None:
        """
        Any other transport is written to as it is.
        """
        t = StringTransport()
        self.assertEqual(writers_for(t), (t.write, t.write))


def _serial_tls_client(port: int, files: TLSFiles, calls: List[Any], n: int) -> List[int]:
    """
    Over TLS, send C{n} requests one at a time, each after the reply to the
    one before; note how many C{calls} there were after the first reply and
    after the last.
    """
    context = ssl.create_default_context(cafile=str(files.ca))
    seen = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            reader = sock.makefile("rb")
            for i in range(n):
                sock.sendall(b'{"tarea_id": "%d", "tipo": 1, "contenido": "a"}\n' % i)
                assert json.loads(reader.readline())["resultado"] == "A"
                if i in (0, n - 1):
                    seen.append(len(calls))
    return seen


@pytest_twisted.inlineCallbacks
def test_tls_records_leave_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """
    Over TLS the replies of a read leave as over TCP: the TLS layer's record
    is sent at once, without the server's TCP transport registering for
    writability and waiting for the next poll.
    """
    from twisted.internet import reactor

    files = TLSFiles(tmp_path)
    calls: List[Any] = []
    start_writing = tcp.Server.startWriting

    def counted(self: tcp.Server) -> None:
        calls.append(self)
        start_writing(self)

    monkeypatch.setattr(tcp.Server, "startWriting", counted)
    port = yield endpoints.serverFromString(reactor, files.endpoint(0)).listen(make_server())
    try:
        first, last = yield deferToThread(
            _serial_tls_client, port.getHost().port, files, calls, 50)
    finally:
        yield port.stopListening()
    assert last == first, f"{last - first} waits for writability in 49 replies"
