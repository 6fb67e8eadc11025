"""
Tests for the server-wide budget of bytes held by unfinished lines
(C{--max-buffered}), over in-memory transports.
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from pfo3.errors import ERROR_CODES, BufferFull, Busy
from pfo3.framing import DEFAULT_MAX_BUFFERED, DEFAULT_SMALL_LINE
from pfo3.protocol import TaskFactory, TaskProtocol
from pfo3.tap import Options, makeService
from pfo3.testing import FakeReactor, make_server

from .conftest import connect_transport, take_replies

PEER = IPv4Address("TCP", "10.1.2.3", 4567)
BIG = 60_000  # well past the small-line allowance
LIMIT = 100_000


def server(max_buffered: int = LIMIT, max_line: int = 1024 * 1024) -> TaskFactory:
    base = make_server(max_line=max_line)
    return TaskFactory(base.orchestrator, max_line, max_buffered=max_buffered)


def connect(factory: TaskFactory) -> Tuple[TaskProtocol, StringTransport]:
    return connect_transport(factory, PEER)


replies = take_replies


def start_big(proto: TaskProtocol, tid: str, size: int = BIG) -> None:
    """
    Send the start of a request line of about C{size} bytes, without its end.
    """
    proto.dataReceived(
        b'{"tarea_id": "' + tid.encode() + b'", "tipo": 2, "contenido": "' + b"a" * size
    )


class BudgetTests(SynchronousTestCase):
    """
    Unfinished lines are bounded over the whole server; the accounting is
    exact; short lines are never refused.
    """

    def setUp(self) -> None:
        self.factory = server()
        self.budget = self.factory.budget

    def test_default_budget(self) -> None:
        """
        A factory's budget is 64 MiB unless told otherwise.
        """
        factory = TaskFactory(make_server().orchestrator)
        self.assertEqual(factory.budget.limit, DEFAULT_MAX_BUFFERED)
        self.assertEqual(DEFAULT_MAX_BUFFERED, 64 * 1024 * 1024)

    def test_over_budget_refused_then_line_dropped(self) -> None:
        """
        A connection whose large unfinished line would take the server past
        the budget gets one buffer_lleno error (no tarea_id: its line is
        unfinished), holds nothing, has the rest of that line dropped, stays
        open, and its next line is served; the holder is untouched.
        """
        hog, hog_t = connect(self.factory)
        start_big(hog, "hog")
        late, late_t = connect(self.factory)
        start_big(late, "late")
        [err] = replies(late_t)
        self.assertEqual(err["codigo"], "buffer_lleno")
        self.assertEqual(err["estado"], "error")
        self.assertIsNone(err["tarea_id"])
        self.assertIn("Reintente", err["mensaje"])
        self.assertEqual(self.budget.used, hog._splitter.pending_bytes)
        self.assertEqual(late._splitter.pending_bytes, 0)
        for _ in range(10):
            late.dataReceived(b"a" * 10_000)
        self.assertEqual(replies(late_t), [])
        self.assertEqual(late._splitter.pending_bytes, 0)
        late.dataReceived(b'"}\n{"tarea_id": "n", "tipo": 1, "contenido": "sigo"}\n')
        self.assertEqual([r["resultado"] for r in replies(late_t)], ["SIGO"])
        self.assertFalse(late_t.disconnecting)
        hog.dataReceived(b'"}\n')
        [done] = replies(hog_t)
        self.assertEqual((done["tarea_id"], len(done["resultado"])), ("hog", BIG))

    def test_lines_before_refusal_answered_first(self) -> None:
        """
        The complete lines of the read that starts the refused line are
        answered before the refusal.
        """
        hog, _ = connect(self.factory)
        start_big(hog, "hog")
        late, late_t = connect(self.factory)
        late.dataReceived(b'{"tarea_id": "a", "tipo": 1, "contenido": "x"}\n'
                          + b'{"contenido": "' + b"b" * BIG)
        self.assertEqual([r.get("resultado", r.get("codigo")) for r in replies(late_t)],
                         ["X", "buffer_lleno"])

    def test_released_on_completion(self) -> None:
        """
        The bytes of a line go back to the budget when its \\n arrives.
        """
        proto, transport = connect(self.factory)
        start_big(proto, "x")
        self.assertEqual(self.budget.used, proto._splitter.pending_bytes)
        self.assertGreater(self.budget.used, BIG)
        proto.dataReceived(b'"}\n')
        self.assertEqual(self.budget.used, 0)
        self.assertEqual(replies(transport)[0]["tarea_id"], "x")

    def test_released_on_connection_lost(self) -> None:
        """
        The bytes of an unfinished line go back to the budget when the
        connection is lost, and then a new large line fits again.
        """
        hog, _ = connect(self.factory)
        start_big(hog, "hog")
        self.assertGreater(self.budget.used, BIG)
        hog.connectionLost()
        self.assertEqual(self.budget.used, 0)
        other, other_t = connect(self.factory)
        start_big(other, "o")
        other.dataReceived(b'"}\n')
        self.assertEqual(replies(other_t)[0]["tarea_id"], "o")

    def test_released_when_too_long(self) -> None:
        """
        A line refused for --max-line gives its bytes back to the budget.
        """
        factory = server(max_line=BIG)
        proto, transport = connect(factory)
        start_big(proto, "x", BIG // 2)
        self.assertGreater(factory.budget.used, 0)
        proto.dataReceived(b"a" * BIG)
        self.assertEqual([r["codigo"] for r in replies(transport)], ["linea_demasiado_larga"])
        self.assertEqual(factory.budget.used, 0)

    def test_exact_over_many_connections(self) -> None:
        """
        Over many connections that start, grow, finish, get refused and
        drop lines, the budget always equals the bytes held and ends at 0.
        """
        protos = [connect(self.factory)[0] for _ in range(6)]
        for step in range(40):
            p = protos[step % 6]
            if step % 7 == 3:
                p.dataReceived(b'"}\n')
            else:
                p.dataReceived(b'{"c": "' + b"z" * (7_000 + step) if step % 5 == 0
                               else b"z" * 9_000)
            self.assertEqual(self.budget.used, sum(q._splitter.pending_bytes for q in protos))
            self.assertLessEqual(self.budget.used, LIMIT + 6 * DEFAULT_SMALL_LINE)
        for p in protos:
            p.connectionLost()
        self.assertEqual(self.budget.used, 0)

    def test_short_lines_unaffected_when_full(self) -> None:
        """
        With the budget used up, other clients' short lines, even ones that
        arrive in pieces, are served as usual.
        """
        for i in range(3):
            start_big(connect(self.factory)[0], f"hog{i}", LIMIT // 3 - 100)
        self.assertGreaterEqual(self.budget.used, LIMIT - DEFAULT_SMALL_LINE)
        clients = [connect(self.factory) for _ in range(50)]
        for proto, _ in clients:
            proto.dataReceived(b'{"tarea_id": "s", "tipo": 1, "conte')
        for proto, transport in clients:
            proto.dataReceived(b'nido": "hola"}\n{"op": "ping"}\n')
            self.assertEqual([r["resultado"] for r in replies(transport)], ["HOLA", "pong"])

    def test_buffer_lleno_is_a_busy_error(self) -> None:
        """
        buffer_lleno is a registered code whose exception is a kind of Busy
        (retry later), so clients rebuild it as such.
        """
        self.assertIs(ERROR_CODES["buffer_lleno"], BufferFull)
        self.assertTrue(issubclass(BufferFull, Busy))


def test_max_buffered_option() -> None:
    """
    --max-buffered reaches the factory's budget; the default is 64 MiB.
    """
    o = Options()
    o.parseOptions(["--max-buffered", "2000000", "--no-plugins"])
    assert makeService(o, FakeReactor()).factory.budget.limit == 2_000_000
    o = Options()
    o.parseOptions(["--no-plugins"])
    assert makeService(o, FakeReactor()).factory.budget.limit == 64 * 1024 * 1024


@pytest.mark.parametrize("argv", [
    ["--max-buffered", "0"], ["--max-buffered", "1000", "--max-line", "2000"],
])
def test_max_buffered_below_max_line_rejected(argv: List[str]) -> None:
    """
    --max-buffered smaller than --max-line is a usage error.
    """
    with pytest.raises(usage.UsageError):
        Options().parseOptions(argv)
