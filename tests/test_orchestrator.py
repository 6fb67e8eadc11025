"""
Tests for the orchestrator's policy and the protocol's end of input, over
in-memory transports with a fake clock: half-close, timeouts that survive a
misbehaving task type, the timeout boundary, bounded error messages, and
the seam between framing, wire and orchestration.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pfo3 import wire
from pfo3.errors import DuplicateTaskId, Pfo3Error, TaskFailed
from pfo3.protocol import TaskFactory, TaskProtocol
from pfo3.tap import with_backlog
from pfo3.tasks import ASYNC, BUILTINS, TaskRegistry, TaskType
from pfo3.testing import make_server

from .conftest import connect_transport, take_replies


def connect(factory: TaskFactory) -> Tuple[TaskProtocol, StringTransport]:
    return connect_transport(factory)


replies = take_replies


class HalfCloseTests(SynchronousTestCase):
    """
    A client that ends its input gets every reply, then the connection
    closes.
    """

    def setUp(self) -> None:
        self.factory = make_server()
        self.clock = self.factory.orchestrator.clock
        self.proto, self.transport = connect(self.factory)

    def test_declares_half_close(self) -> None:
        """
        The protocol provides IHalfCloseableProtocol, so transports tell it
        about the end of input instead of closing the connection.
        """
        self.assertTrue(IHalfCloseableProtocol.providedBy(self.proto))

    def test_tasks_in_flight_are_answered_before_the_close(self) -> None:
        """
        After the end of input, a sleep in flight is answered when it ends
        and only then is the connection closed.
        """
        self.proto.dataReceived(b'{"tarea_id": "s", "tipo": "sleep", "contenido": 2}\n'
                                b'{"tarea_id": "u", "tipo": "upper", "contenido": "a"}\n')
        self.proto.readConnectionLost()
        self.assertEqual([r["tarea_id"] for r in replies(self.transport)], ["u"])
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertEqual([r["resultado"] for r in replies(self.transport)],
                         ["Esperé 2 segundos"])
        self.assertTrue(self.transport.disconnecting)

    def test_last_line_without_newline(self) -> None:
        """
        Bytes after the last newline at the end of input are one more line.
        """
        self.proto.dataReceived(b'{"tarea_id": "x", "tipo": "reverse", "contenido": "ab"}')
        self.assertEqual(self.transport.value(), b"")
        self.proto.readConnectionLost()
        self.assertEqual([r["resultado"] for r in replies(self.transport)], ["ba"])
        self.assertTrue(self.transport.disconnecting)

    def test_nothing_in_flight_closes_at_once(self) -> None:
        """
        The end of input with nothing pending closes the connection at once,
        and a second notice changes nothing.
        """
        self.proto.readConnectionLost()
        self.proto.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")

    def test_never_reads_again_after_end_of_input(self) -> None:
        """
        Once the input ended, backpressure never resumes reading (a transport
        asked to read after its end of input would report it again).
        """
        factory = make_server(max_inflight=1)
        proto, transport = connect(factory)
        proto.dataReceived(b'{"tarea_id": "a", "tipo": "sleep", "contenido": 1}\n'
                           b'{"tarea_id": "b", "tipo": "sleep", "contenido": 1}\n')
        self.assertEqual(transport.producerState, "paused")
        proto.readConnectionLost()
        factory.orchestrator.clock.advance(1)
        factory.orchestrator.clock.advance(1)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual([r["tarea_id"] for r in replies(transport)], ["a", "b"])
        self.assertTrue(transport.disconnecting)


class Refuses:
    """
    An async task type whose canceller raises, as a buggy plugin's might.
    """

    def __init__(self) -> None:
        self.pending: List[Deferred[Any]] = []

    def __call__(self, clock: Any, arg: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            raise RuntimeError("canceller broke")

        d: Deferred[Any] = Deferred(cancel)
        self.pending.append(d)
        return d


class MisbehavingTaskTests(SynchronousTestCase):
    """
    One bad task type cannot disable the server's timeouts nor leak a
    connection.
    """

    def setUp(self) -> None:
        self.refuses = Refuses()
        registry = TaskRegistry(BUILTINS + (
            TaskType("terca", 50, (), "d", self.refuses, ASYNC),
            TaskType("falla", 51, (), "d", self._fails, ASYNC),
        ))
        self.factory = make_server(registry, timeout=5)
        self.clock = self.factory.orchestrator.clock

    def _fails(self, clock: Any, arg: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        clock.callLater(1, d.errback, TaskFailed("no pude"))
        return d

    def test_raising_canceller_does_not_stop_timeouts(self) -> None:
        """
        A task whose canceller raises is still answered 'timeout'; a later
        task (of any type) still times out; the error is logged; the
        connection ends with nothing in flight, and the late result of the
        stuck work is ignored.
        """
        proto, transport = connect(self.factory)
        proto.dataReceived(b'{"tarea_id": "t1", "tipo": "terca", "contenido": 1}\n')
        self.clock.advance(5)
        proto.dataReceived(b'{"tarea_id": "t2", "tipo": "terca", "contenido": 1}\n'
                           b'{"tarea_id": "t3", "tipo": "sleep", "contenido": 4}\n')
        self.clock.advance(5)
        self.assertEqual([(r["tarea_id"], r.get("codigo", r["estado"]))
                          for r in replies(transport)],
                         [("t1", "timeout"), ("t3", "ok"), ("t2", "timeout")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual((proto.session.inflight, self.factory.orchestrator.active), (0, 0))
        self.refuses.pending[0].callback("tarde")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        proto.connectionLost()
        self.assertEqual(self.factory.protocols, set())

    def test_raising_canceller_on_disconnect_and_shutdown(self) -> None:
        """
        Closing a connection, or cancelling everything at shutdown, with such
        tasks in flight gives up on all of them (shutdown answers
        'apagando').
        """
        proto, transport = connect(self.factory)
        proto.dataReceived(b'{"tarea_id": "a", "tipo": "terca", "contenido": 1}\n'
                           b'{"tarea_id": "b", "tipo": "terca", "contenido": 1}\n')
        self.factory.orchestrator.cancel_all()
        self.assertEqual([r["codigo"] for r in replies(transport)], ["apagando", "apagando"])
        other, _ = connect(self.factory)
        other.dataReceived(b'{"tarea_id": "c", "tipo": "terca", "contenido": 1}\n'
                           b'{"tarea_id": "d", "tipo": "terca", "contenido": 1}\n')
        other.connectionLost()
        self.assertEqual(self.factory.orchestrator.active, 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 4)

    def test_no_stale_reason_for_a_reused_tarea_id(self) -> None:
        """
        After a task timed out (with a canceller that raised), a new task
        with the same tarea_id that fails on its own gets its own error, not
        the old timeout.
        """
        proto, transport = connect(self.factory)
        proto.dataReceived(b'{"tarea_id": "t", "tipo": "terca", "contenido": 1}\n')
        self.clock.advance(5)
        proto.dataReceived(b'{"tarea_id": "t", "tipo": "falla", "contenido": 1}\n')
        self.clock.advance(1)
        self.assertEqual([r["codigo"] for r in replies(transport)], ["timeout", "tarea_fallida"])
        self.flushLoggedErrors(RuntimeError)


class BoundaryTests(SynchronousTestCase):
    """
    The one timeout rule: a task that declares its duration must declare
    less than the timeout.
    """

    def answer(self, contenido: Any, timeout: float = 2.0) -> Dict[str, Any]:
        factory = make_server(timeout=timeout)
        proto, transport = connect(factory)
        proto.dataReceived(json.dumps(
            {"tarea_id": "s", "tipo": "sleep", "contenido": contenido}).encode() + b"\n")
        factory.orchestrator.clock.advance(timeout)
        return replies(transport)[0]

    def test_sleep_equal_to_timeout_is_refused_at_once(self) -> None:
        """
        A sleep of exactly --timeout seconds (number or text) is refused with
        'excede_timeout' instead of being accepted and then timed out.
        """
        for contenido in (2, 2.0, "2", "2.000"):
            self.assertEqual(self.answer(contenido)["codigo"], "excede_timeout")

    def test_sleep_just_under_timeout_is_answered(self) -> None:
        """
        A sleep shorter than the timeout is answered 'ok'.
        """
        self.assertEqual(self.answer(1.99)["estado"], "ok")

    def test_negative_zero(self) -> None:
        """
        A sleep of -0 waits 0 seconds and says so without a sign.
        """
        for contenido in (-0.0, "-0", "-0.0"):
            self.assertEqual(self.answer(contenido)["resultado"], "Esperé 0 segundos")

    def test_one_second_is_singular(self) -> None:
        """
        A one-second sleep says "1 segundo".
        """
        self.assertEqual(self.answer(1)["resultado"], "Esperé 1 segundo")


class BoundedEchoTests(SynchronousTestCase):
    """
    Error messages quote the client's input, but never all of it.
    """

    def test_long_op_and_tipo_are_cut(self) -> None:
        """
        A 500,000-character 'op' and a 1 MiB 'tipo' of control characters
        get error replies of less than 1 KiB, with the usual codes.
        """
        factory = make_server(max_line=8 * 1024 * 1024)
        proto, transport = connect(factory)
        proto.dataReceived(json.dumps({"op": "x" * 500_000}).encode() + b"\n")
        proto.dataReceived(json.dumps({"tipo": "\x01" * (1 << 20), "contenido": "a"}).encode()
                           + b"\n")
        lines = transport.value().splitlines()
        self.assertEqual([json.loads(x)["codigo"] for x in lines],
                         ["op_desconocida", "tipo_desconocido"])
        self.assertTrue(all(len(x) < 1024 for x in lines), [len(x) for x in lines])

    def test_long_sleep_text_is_cut(self) -> None:
        """
        A sleep's invalid text is quoted in part.
        """
        with self.assertRaises(Pfo3Error) as caught:
            wire.decode_request(json.dumps({"tipo": "sleep", "contenido": "9" * 10_000 + "x"})
                                .encode(), TaskRegistry(BUILTINS))
        self.assertLess(len(caught.exception.mensaje), 300)


class SpanishMessagesTests(SynchronousTestCase):
    """
    Every decoding error reads in Spanish, like the rest of the protocol.
    """

    def test_json_errors_are_spanish(self) -> None:
        """
        The JSON decoder's English messages, and Python's message for an
        integer with too many digits, are never sent.
        """
        registry = TaskRegistry(BUILTINS)
        for line in [b"", b"{", b'{"a" 1}', b'{"a": 1 "b": 2}', b'"abc', b'"a\x01"',
                     b'"\\q"', b'"\\u12"', b"{} x", b"[1,]", b"1" * 5000, b"NaN",
                     b'{"tipo": "sleep", "contenido": -Infinity}']:
            with self.assertRaises(Pfo3Error) as caught:
                wire.decode_request(line, registry)
            mensaje = caught.exception.mensaje
            self.assertEqual(caught.exception.codigo, "json_invalido")
            self.assertTrue(mensaje.startswith("JSON inválido: "), mensaje)
            for english in ("Expecting", "Exceeds", "Invalid", "Extra", "Unterminated",
                            "limit", "digits"):
                self.assertNotIn(english, mensaje)


class RegistrationTests(SynchronousTestCase):
    """
    Task types are checked when they are registered, not when used.
    """

    def test_bad_fields_are_refused(self) -> None:
        """
        A code that is not an int, aliases that are not a tuple of texts, a
        description that is not a text, or a run that cannot be called
        raise ValueError at once.
        """
        good: Dict[str, Any] = dict(name="x", code=70, aliases=("y",), description="d",
                                    run=str.upper)
        for field, bad in [("code", "70"), ("code", True), ("code", 7.0),
                           ("aliases", ["y"]), ("aliases", ("",)), ("aliases", (1,)),
                           ("description", None), ("run", "str.upper"), ("name", 5)]:
            with self.assertRaises(ValueError, msg=f"{field}={bad!r}"):
                TaskType(**dict(good, **{field: bad}))

    def test_tipos_keeps_working(self) -> None:
        """
        With only valid types registered, {"op": "tipos"} answers every type.
        """
        factory = make_server()
        proto, transport = connect(factory)
        proto.dataReceived(b'{"op": "tipos"}\n')
        self.assertEqual([t["tipo"] for t in replies(transport)[0]["resultado"]],
                         ["uppercase", "reverse", "word_count", "sleep"])


class SeamTests(SynchronousTestCase):
    """
    The orchestrator works on decoded requests and reply objects; the wire
    alone turns them into bytes.
    """

    def test_session_answers_reply_objects(self) -> None:
        """
        Session.handle takes a decoded request and returns a TaskResult for
        an inline task, a Deferred of one for a timer, a ControlResult for a
        ping, and raises a typed error for a refusal.
        """
        factory = make_server()
        registry = factory.orchestrator.registry
        session = factory.orchestrator.session()
        result = session.handle(wire.decode_request(
            b'{"tarea_id": "a", "tipo": 1, "contenido": "x"}', registry))
        self.assertIsInstance(result, wire.TaskResult)
        self.assertEqual(wire.encode_reply(result),  # type: ignore[arg-type]
                         b'{"estado": "ok", "resultado": "X", "tarea_id": "a", "worker": 0}\n')
        d = session.handle(wire.decode_request(
            b'{"tarea_id": "s", "tipo": 4, "contenido": 1}', registry))
        self.assertIsInstance(d, Deferred)
        with self.assertRaises(DuplicateTaskId):
            session.handle(wire.decode_request(
                b'{"tarea_id": "s", "tipo": 4, "contenido": 1}', registry))
        factory.orchestrator.clock.advance(1)
        self.assertEqual(self.successResultOf(d).resultado, "Esperé 1 segundo")  # type: ignore
        ping = session.handle(wire.decode_request(b'{"op": "ping"}', registry))
        self.assertEqual(wire.encode_reply(ping), b'{"estado": "ok", "resultado": "pong"}\n')

    def test_unserialisable_result_is_an_internal_error(self) -> None:
        """
        A task whose result is not JSON is answered 'error_interno' and the
        cause is logged.
        """
        registry = TaskRegistry(BUILTINS + (
            TaskType("conjunto", 60, (), "d", lambda s: {s}, "inline"),))
        proto, transport = connect(make_server(registry))
        proto.dataReceived(b'{"tarea_id": "c", "tipo": "conjunto", "contenido": "a"}\n')
        self.assertEqual(replies(transport)[0]["codigo"], "error_interno")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)


class BacklogTests(SynchronousTestCase):
    """
    --backlog reaches the endpoints that take one.
    """

    def test_with_backlog(self) -> None:
        """
        tcp, ssl and unix endpoints (also inside haproxy:) get backlog=N
        unless they set their own; other endpoint types are left alone.
        """
        cases = {
            "tcp:9000": "tcp:9000:backlog=7",
            "tcp:port=9000:interface=127.0.0.1": "tcp:port=9000:interface=127.0.0.1:backlog=7",
            "ssl:9443:privateKey=k.pem": "ssl:9443:privateKey=k.pem:backlog=7",
            "unix:/tmp/s.sock": "unix:/tmp/s.sock:backlog=7",
            "haproxy:tcp:9001": "haproxy:tcp:9001:backlog=7",
            "tcp:9000:backlog=3": "tcp:9000:backlog=3",
            "systemd:domain=INET:index=0": "systemd:domain=INET:index=0",
        }
        for description, expected in cases.items():
            self.assertEqual(with_backlog(description, 7), expected)
