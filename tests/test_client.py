"""
Tests for L{pfo3.client}: the client protocol against the real server
protocol in memory (time driven by a fake clock), and once over a real socket.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, List, Tuple

import pytest
import pytest_twisted
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump
from zope.interface import implementer

from pfo3.client import ConnectionClosed, ReplyTimeout, TaskClient, connect
from pfo3.errors import (
    DuplicateTaskId,
    ExceedsTimeout,
    InvalidContent,
    LineTooLong,
    UnknownType,
)
from pfo3.executor import LocalExecutor
from pfo3.orchestrator import Orchestrator
from pfo3.protocol import TaskFactory
from pfo3.tasks import default_registry
from pfo3.testing import FakeReactor, SynchronousThreadPool, connect_in_memory, make_server


def connected(**server_options: Any) -> Tuple[FakeReactor, TaskClient, IOPump]:
    """
    A client connected in memory to a real server protocol on a fake clock.
    """
    reactor = FakeReactor()
    factory = make_server(reactor=reactor, **server_options)
    client = TaskClient(reactor)
    _, pump = connect_in_memory(factory, client)
    return reactor, client, pump


def result_of(d: Deferred[Any]) -> Any:
    """
    The result a Deferred already fired with (failing the test otherwise).
    """
    box: List[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(d: Deferred[Any]) -> BaseException:
    """
    The exception a Deferred already failed with.
    """
    box: List[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    assert isinstance(box[0], Failure), f"expected a failure, got {box[0]!r}"
    return box[0].value


def test_submit_fires_with_the_servers_reply() -> None:
    """
    A submitted task fires its Deferred with the whole success reply of the
    server, which carries the caller's tarea_id.
    """
    _, client, pump = connected()
    d = client.submit("uppercase", "hola", tarea_id="a1")
    pump.flush()
    reply = result_of(d)
    assert reply["estado"] == "ok"
    assert reply["resultado"] == "HOLA"
    assert reply["tarea_id"] == "a1"
    assert "worker" in reply
    assert client.pending == 0


def test_submit_generates_a_uuid_when_no_tarea_id_is_given() -> None:
    """
    Without a tarea_id the client sends a fresh UUID, so the reply can still
    be matched; two such tasks get different identifiers.
    """
    _, client, pump = connected()
    d1 = client.submit(2, "abc")
    d2 = client.submit("3", "uno dos")
    pump.flush()
    r1, r2 = result_of(d1), result_of(d2)
    assert r1["resultado"] == "cba"
    assert r2["resultado"] == 2
    assert uuid.UUID(r1["tarea_id"]) != uuid.UUID(r2["tarea_id"])


def test_replies_in_completion_order_reach_their_own_deferreds() -> None:
    """
    Many tasks share one connection; replies arrive as tasks finish (here in
    the reverse order of sending) and each fires the Deferred of its own
    request.
    """
    reactor, client, pump = connected()
    fired: List[str] = []
    ds = {}
    for tarea_id, tipo, contenido in [
        ("slow", "sleep", 2), ("medium", "sleep", 1), ("fast", "reverse", "xyz"),
    ]:
        ds[tarea_id] = client.submit(tipo, contenido, tarea_id)
        ds[tarea_id].addCallback(lambda r: fired.append(r["tarea_id"]) or r)
    pump.flush()
    assert fired == ["fast"]
    reactor.advance(1)
    pump.flush()
    assert fired == ["fast", "medium"]
    reactor.advance(1)
    pump.flush()
    assert fired == ["fast", "medium", "slow"]
    assert result_of(ds["fast"])["resultado"] == "zyx"
    assert result_of(ds["medium"])["resultado"] == "Esperé 1 segundo"
    assert result_of(ds["slow"])["resultado"] == "Esperé 2 segundos"


def test_many_tasks_over_one_connection_each_answered_once() -> None:
    """
    Thousands of tasks pipelined over one in-memory connection (more than the
    server lets one connection have in flight, so its backpressure kicks in)
    all get exactly their own reply.
    """
    reactor, client, pump = connected(max_inflight=100)
    replies: Dict[str, int] = {}

    def count(reply: Dict[str, Any]) -> None:
        replies[reply["tarea_id"]] = replies.get(reply["tarea_id"], 0) + 1

    for i in range(3000):
        if i % 7 == 0:
            d = client.submit("sleep", 0, tarea_id=f"id{i}")
        else:
            d = client.submit("uppercase", f"t{i}", tarea_id=f"id{i}")
        d.addCallback(count)
    for _ in range(200):
        pump.flush()
        reactor.advance(0)
        if len(replies) == 3000:
            break
    assert replies == {f"id{i}": 1 for i in range(3000)}
    assert client.pending == 0


def test_error_reply_fails_with_the_typed_error() -> None:
    """
    An error reply fails the Deferred with the exception class of its codigo,
    carrying codigo, mensaje and tarea_id.
    """
    _, client, pump = connected()
    d1 = client.submit("nope", "x", tarea_id="e1")
    d2 = client.submit("sleep", "mucho", tarea_id="e2")
    pump.flush()
    e1 = failure_of(d1)
    assert isinstance(e1, UnknownType)
    assert e1.codigo == "tipo_desconocido"
    assert e1.tarea_id == "e1"
    assert "nope" in e1.mensaje
    e2 = failure_of(d2)
    assert isinstance(e2, InvalidContent)
    assert e2.codigo == "contenido_invalido"
    assert e2.tarea_id == "e2"


def test_task_longer_than_the_server_allows_is_a_typed_error() -> None:
    """
    A sleep within the server's timeout succeeds; one longer is refused with
    ExceedsTimeout (codigo "excede_timeout"), a server error, not a
    client-side timeout.
    """
    reactor, client, pump = connected(timeout=5.0)
    d = client.submit("sleep", 4.5, tarea_id="s")
    pump.flush()
    reactor.advance(4.5)
    pump.flush()
    assert result_of(d)["tarea_id"] == "s"
    d = client.submit("sleep", 10, tarea_id="s2")
    pump.flush()
    e = failure_of(d)
    assert isinstance(e, ExceedsTimeout)
    assert e.codigo == "excede_timeout"
    assert e.tarea_id == "s2"
    assert not isinstance(e, ReplyTimeout)


def test_duplicate_pending_tarea_id_fails_fast_without_sending() -> None:
    """
    Submitting a tarea_id that is still pending on this connection fails at
    once with DuplicateTaskId and writes nothing; once the first task is
    answered the identifier can be used again.
    """
    reactor, client, pump = connected()
    first = client.submit("sleep", 1, tarea_id="dup")
    pump.flush()
    transport: Any = client.transport
    before = transport.stream[:]
    second = client.submit("uppercase", "x", tarea_id="dup")
    e = failure_of(second)
    assert isinstance(e, DuplicateTaskId)
    assert e.tarea_id == "dup"
    assert transport.stream == before
    reactor.advance(1)
    pump.flush()
    assert result_of(first)["resultado"] == "Esperé 1 segundo"
    third = client.submit("uppercase", "x", tarea_id="dup")
    pump.flush()
    assert result_of(third)["resultado"] == "X"


def test_connection_lost_fails_every_pending_request() -> None:
    """
    When the connection goes away every pending Deferred fails with
    ConnectionClosed naming its tarea_id, and later submissions fail at once.
    """
    _, client, pump = connected()
    ds = [client.submit("sleep", 5, tarea_id=f"p{i}") for i in range(3)]
    pump.flush()
    client.connectionLost(Failure(ConnectionLost("reset by peer")))
    for i, d in enumerate(ds):
        e = failure_of(d)
        assert isinstance(e, ConnectionClosed)
        assert e.tarea_id == f"p{i}"
        assert "reset by peer" in str(e)
    assert client.pending == 0
    late = failure_of(client.submit("uppercase", "x"))
    assert isinstance(late, ConnectionClosed)
    assert "conexión" in str(late)


def test_server_closing_is_reported_clearly() -> None:
    """
    A clean close by the server fails pending requests with a message that
    says the server closed the connection.
    """
    _, client, pump = connected()
    d = client.submit("sleep", 5, tarea_id="c")
    pump.flush()
    client.connectionLost(Failure(ConnectionDone()))
    assert "el servidor cerró la conexión" in str(failure_of(d))


def test_timeout_fails_cleanly_and_drops_the_late_reply() -> None:
    """
    A per-call timeout fails the Deferred with ReplyTimeout (also a Twisted
    TimeoutError) on the injected clock; the identifier stays reserved
    until the server's late reply arrives, which is then dropped quietly.
    """
    reactor, client, pump = connected()
    d = client.submit("sleep", 3, tarea_id="t", timeout=1)
    pump.flush()
    reactor.advance(1)
    e = failure_of(d)
    assert isinstance(e, ReplyTimeout)
    assert isinstance(e, TimeoutError)
    assert e.tarea_id == "t"
    assert e.seconds == 1
    assert client.pending == 0
    assert isinstance(failure_of(client.submit("uppercase", "x", tarea_id="t")), DuplicateTaskId)
    with capturedLogs() as events:
        reactor.advance(2)
        pump.flush()
    assert not any("matches no pending" in str(ev.get("log_format")) for ev in events)
    again = client.submit("uppercase", "x", tarea_id="t")
    pump.flush()
    assert result_of(again)["resultado"] == "X"


def test_reply_within_timeout_cancels_the_timer() -> None:
    """
    A reply that arrives in time fires normally and leaves no timer behind.
    """
    reactor, client, pump = connected()
    d = client.submit("sleep", 1, timeout=5)
    pump.flush()
    reactor.advance(1)
    pump.flush()
    assert result_of(d)["estado"] == "ok"
    assert reactor.getDelayedCalls() == []


def test_cancel_abandons_the_request() -> None:
    """
    Cancelling the Deferred fails it with CancelledError and frees it from
    the pending requests.
    """
    reactor, client, pump = connected()
    d = client.submit("sleep", 1, tarea_id="k")
    pump.flush()
    d.cancel()
    assert isinstance(failure_of(d), CancelledError)
    assert client.pending == 0
    reactor.advance(1)
    pump.flush()  # the late reply arrives and is dropped
    assert client.pending == 0
    again = client.submit("reverse", "ab", tarea_id="k")  # the id is free again
    pump.flush()
    assert result_of(again)["resultado"] == "ba"


def test_ping_and_tipos() -> None:
    """
    ping() fires with "pong"; tipos() with the server's task types in code
    order, as the menu needs them.
    """
    _, client, pump = connected()
    p = client.ping()
    t = client.tipos()
    pump.flush()
    assert result_of(p) == "pong"
    tipos = result_of(t)
    assert [(x["codigo"], x["tipo"]) for x in tipos] == [
        (1, "uppercase"), (2, "reverse"), (3, "word_count"), (4, "sleep"),
    ]
    assert "mayus" in tipos[0]["alias"]
    assert tipos[3]["descripcion"]


def test_line_the_server_cannot_read_is_attributed_to_the_sole_request() -> None:
    """
    A request longer than the server's line limit is answered with an error
    without tarea_id; with only one request pending, the client still fails
    that request with LineTooLong.
    """
    _, client, pump = connected(max_line=64)
    d = client.submit("uppercase", "x" * 200, tarea_id="long")
    pump.flush()
    e = failure_of(d)
    assert isinstance(e, LineTooLong)
    assert e.tarea_id == "long"


def test_unattributed_error_fails_every_pending_request() -> None:
    """
    An error without tarea_id while several requests are pending cannot be
    matched to one: every pending request fails with it (none waits
    forever), the connection stays usable, and their late replies are
    dropped.
    """
    # The sleep's reply (86 bytes) fits the server's line limit; the long
    # request does not.
    reactor, client, pump = connected(max_line=120)
    slow = client.submit("sleep", 1, tarea_id="slow")
    long = client.submit("uppercase", "x" * 200, tarea_id="long")
    pump.flush()
    errors = [failure_of(slow), failure_of(long)]
    assert all(isinstance(e, LineTooLong) for e in errors)
    assert [e.tarea_id for e in errors] == ["slow", "long"]  # type: ignore[attr-defined]
    assert client.pending == 0
    reactor.advance(1)
    pump.flush()  # the sleep's late reply is dropped
    after = client.submit("reverse", "ab", tarea_id="slow")
    pump.flush()
    assert result_of(after)["resultado"] == "ba"


def test_request_longer_than_max_request_fails_before_sending() -> None:
    """
    A request line longer than max_request fails at once with LineTooLong
    and nothing is written.
    """
    client = TaskClient(Clock(), max_request=100)
    transport = StringTransport()
    client.makeConnection(transport)
    e = failure_of(client.submit("uppercase", "x" * 200, tarea_id="big"))
    assert isinstance(e, LineTooLong)
    assert e.tarea_id == "big"
    assert transport.value() == b""
    assert client.pending == 0


def test_contenido_that_is_not_json_fails_before_sending() -> None:
    """
    contenido that JSON cannot carry fails the Deferred at once.
    """
    client = TaskClient(Clock())
    transport = StringTransport()
    client.makeConnection(transport)
    assert isinstance(failure_of(client.submit("uppercase", object())), TypeError)
    assert isinstance(failure_of(client.submit("sleep", float("nan"))), ValueError)
    assert transport.value() == b""


def test_request_bytes_follow_the_wire_format() -> None:
    """
    The client writes one JSON line per request, with tarea_id, tipo and
    contenido; control requests carry an identifier too.
    """
    client = TaskClient(Clock())
    transport = StringTransport()
    client.makeConnection(transport)
    client.submit("uppercase", "ñandú", tarea_id="w")
    client.ping()
    first, second, rest = transport.value().split(b"\n")
    assert first == '{"tarea_id": "w", "tipo": "uppercase", "contenido": "ñandú"}'.encode()
    assert second.startswith(b'{"op": "ping", "tarea_id": "ping-')
    assert rest == b""


def test_unmatched_reply_is_logged_and_dropped() -> None:
    """
    A reply whose tarea_id matches no pending request is logged and
    dropped; pending requests are unaffected.
    """
    client = TaskClient(Clock())
    client.makeConnection(StringTransport())
    d = client.submit("uppercase", "x", tarea_id="mine")
    with capturedLogs() as events:
        client.dataReceived(b'{"estado": "ok", "resultado": 1, "tarea_id": "other"}\n')
    assert any("matches no pending" in str(ev.get("log_format")) for ev in events)
    assert client.pending == 1
    client.dataReceived(b'{"estado": "ok", "resultado": "X", "tarea_id": "mine"}\r\n\n')
    assert result_of(d)["resultado"] == "X"


def test_garbage_from_the_server_closes_the_connection() -> None:
    """
    A line that is not a JSON object closes the connection, and pending
    requests fail with a ConnectionClosed that says why.
    """
    client = TaskClient(Clock())
    transport = StringTransport()
    client.makeConnection(transport)
    d = client.submit("uppercase", "x")
    client.dataReceived(b"<html>\n")
    assert transport.disconnecting
    client.connectionLost(Failure(ConnectionDone()))
    e = failure_of(d)
    assert isinstance(e, ConnectionClosed)
    assert "no es una respuesta JSON" in str(e)


def test_overlong_reply_closes_the_connection() -> None:
    """
    A reply longer than MAX_LENGTH closes the connection instead of being
    buffered without bound.
    """
    client = TaskClient(Clock())
    client.MAX_LENGTH = 50
    transport = StringTransport()
    client.makeConnection(transport)
    d = client.submit("uppercase", "x")
    client.dataReceived(b"{" + b" " * 100)
    assert transport.disconnecting
    client.connectionLost(Failure(ConnectionDone()))
    assert "más de 50 bytes" in str(failure_of(d))


def test_disconnect_fails_pending_and_fires_when_closed() -> None:
    """
    disconnect() closes the connection, fails what is pending and fires once
    the connection is gone; calling it again fires at once.
    """
    _, client, pump = connected()
    d = client.submit("sleep", 5)
    pump.flush()
    closed = client.disconnect()
    pump.flush()
    assert result_of(closed) is None
    assert "el cliente cerró la conexión" in str(failure_of(d))
    assert result_of(client.disconnect()) is None


@implementer(IStreamClientEndpoint)
class NeverConnects:
    """
    An endpoint whose connection attempt never completes.
    """

    def connect(self, factory: Any) -> Deferred[Protocol]:
        return Deferred()


def test_connect_timeout_uses_the_clock() -> None:
    """
    connect() with a timeout gives up on the injected clock with a
    TimeoutError that says so.
    """
    clock = Clock()
    d = connect(clock, NeverConnects(), timeout=3)
    clock.advance(2.9)
    assert not d.called
    clock.advance(0.1)
    e = failure_of(d)
    assert isinstance(e, TimeoutError)
    assert "3 s" in str(e)


def test_connect_rejects_a_bad_endpoint_description() -> None:
    """
    An endpoint description Twisted cannot parse is refused at once.
    """
    with pytest.raises(ValueError):
        connect(Clock(), "nosuchendpoint:1234")


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_over_a_real_socket() -> Any:
    """
    Over a real TCP connection to a real server, concurrent tasks, control
    requests and an error reply all come back matched to their requests.
    """
    from twisted.internet import reactor

    registry = default_registry(entry_points=False)
    executor = LocalExecutor(reactor, SynchronousThreadPool())
    factory = TaskFactory(Orchestrator(registry, executor, reactor))
    port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        client = yield connect(
            reactor, f"tcp:host=127.0.0.1:port={port.getHost().port}", timeout=5
        )
        slow = client.submit("sleep", 0.05, tarea_id="slow", timeout=5)
        words = client.submit("word_count", "a b c", tarea_id="wc", timeout=5)
        bad = client.submit("uppercase", 5, tarea_id="bad", timeout=5)
        pong = yield client.ping(timeout=5)
        tipos = yield client.tipos(timeout=5)
        assert pong == "pong"
        assert len(tipos) == 4
        assert (yield words)["resultado"] == 3
        assert (yield slow)["resultado"] == "Esperé 0.05 segundos"
        with pytest.raises(InvalidContent):
            yield bad
        yield client.disconnect()
    finally:
        yield port.stopListening()


@pytest.mark.integration
def test_client_library_does_not_import_the_command_line() -> None:
    """
    pfo3.client (the library) imports neither pfo3.cli nor pfo3.batch: the
    command line depends on the library, never the reverse.
    """
    import subprocess
    import sys

    code = ("import sys, pfo3.client; "
            "print(sorted(m for m in sys.modules if m in ('pfo3.cli', 'pfo3.batch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]", out


SUBMIT_MANY_AFTER_IDLE = """
import sys, time
from pfo3.client import BlockingClient
with BlockingClient(sys.argv[1], timeout=10) as c:
    print(c.submit("uppercase", "a")["resultado"])
    time.sleep(2.5)  # the server closes the idle connection meanwhile
    print([r["resultado"] for r in c.submit_many([("reverse", "ab"), ("upper", "b")])])
"""


@pytest.mark.integration
def test_submit_many_reconnects_after_the_server_closed_idle(tmp_path: Any) -> None:
    """
    BlockingClient.submit_many after the server closed the idle connection
    opens a new one and answers, instead of deadlocking (the reconnection
    used to be requested from inside the reactor thread).
    """
    import subprocess
    import sys

    from .conftest import server_env, start_server

    running = start_server(tmp_path, "--idle-timeout", "1")
    try:
        out = subprocess.run(
            [sys.executable, "-c", SUBMIT_MANY_AFTER_IDLE,
             f"tcp:host=127.0.0.1:port={running.port}"],
            capture_output=True, text=True, timeout=30, env=server_env())
    finally:
        running.stop()
    assert out.stdout.splitlines() == ["A", "['ba', 'B']"], out
    assert "Closing connection" in running.log.read_text()


def _readme_example(name: str) -> str:
    """
    The Python block that follows C{<!-- client-example: NAME -->} in the
    README.
    """
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    found = re.search(
        r"<!-- client-example: " + name + r" -->\n```python\n(.*?)```", text, re.S)
    assert found is not None, f"no client-example {name} in README.md"
    return found.group(1)


@pytest.mark.integration
@pytest.mark.parametrize("name,expected", [("connect", "aloh"), ("blocking", "HOLA")])
def test_readme_client_examples_run_as_written(
    tmp_path: Any, name: str, expected: str,
) -> None:
    """
    The README's client examples run exactly as written (only the port
    changed) against a real server and print what they say.
    """
    import subprocess
    import sys

    from .conftest import server_env, start_server

    running = start_server(tmp_path)
    try:
        code = _readme_example(name).replace("port=9000", f"port={running.port}")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=30, env=server_env())
    finally:
        running.stop()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected, out
