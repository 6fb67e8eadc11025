"""
Tests for the line protocol and the orchestration behind it, over in-memory
transports with a fake clock and a synchronous thread pool.
"""

from __future__ import annotations

import json
from typing import Any, List, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from pfo3.errors import TaskFailed
from pfo3.protocol import TaskFactory, TaskProtocol
from pfo3.tasks import ASYNC, BUILTINS, INLINE, THREAD, TaskRegistry, TaskType
from pfo3.testing import FakeReactor, make_server

from .conftest import connect_transport, take_replies

PEER = IPv4Address("TCP", "10.1.2.3", 4567)


def connect(factory: TaskFactory) -> Tuple[TaskProtocol, StringTransport]:
    return connect_transport(factory, PEER)


replies = take_replies


def send(proto: TaskProtocol, *objs: Any) -> None:
    proto.dataReceived(b"".join(json.dumps(o).encode() + b"\n" for o in objs))


class Never:
    """
    An async task that never finishes and records whether it was cancelled.
    """

    def __init__(self) -> None:
        self.cancelled: List[str] = []

    def __call__(self, clock: Any, arg: Any) -> Deferred[Any]:
        return Deferred(lambda d: self.cancelled.append(arg))


def registry_with(*extra: TaskType) -> TaskRegistry:
    return TaskRegistry(BUILTINS + extra)


class SeedCompatibilityTests(SynchronousTestCase):
    """
    Requests written by the seed's clients get the seed's replies.
    """

    def setUp(self) -> None:
        self.factory = make_server()
        self.clock = self.factory.orchestrator.clock
        self.proto, self.transport = connect(self.factory)

    def test_seed_request_gets_seed_reply(self) -> None:
        """
        {"tarea_id": "x", "tipo": "1", "contenido": "hola"} is answered with
        exactly the seed's four fields, as one line.
        """
        self.proto.dataReceived(b'{"tarea_id": "x", "tipo": "1", "contenido": "hola"}\n')
        self.assertEqual(
            self.transport.value(),
            b'{"estado": "ok", "resultado": "HOLA", "tarea_id": "x", "worker": 0}\n',
        )

    def test_each_task_type(self) -> None:
        """
        Each seed task type computes its result.
        """
        send(self.proto,
             {"tarea_id": "u", "tipo": "mayus", "contenido": "hola mundo"},
             {"tarea_id": "r", "tipo": 2, "contenido": "hola"},
             {"tarea_id": "w", "tipo": "palabras", "contenido": "uno  dos tres"},
             {"tarea_id": "s", "tipo": "espera", "contenido": "0.5"})
        got = {r["tarea_id"]: r["resultado"] for r in replies(self.transport)}
        self.assertEqual(got, {"u": "HOLA MUNDO", "r": "aloh", "w": 3})
        self.clock.advance(0.5)
        [reply] = replies(self.transport)
        self.assertEqual((reply["estado"], reply["tarea_id"]), ("ok", "s"))
        self.assertIn("0.5", reply["resultado"])

    def test_crlf_and_blank_lines(self) -> None:
        """
        Lines may end in \\r\\n (telnet); blank lines are ignored.
        """
        self.proto.dataReceived(
            b'\r\n\n   \n{"tarea_id": "a", "tipo": "reverse", "contenido": "ab"}\r\n\r\n'
        )
        self.assertEqual(replies(self.transport), [
            {"estado": "ok", "resultado": "ba", "tarea_id": "a", "worker": 0}])

    def test_request_split_across_reads(self) -> None:
        """
        A request that arrives in pieces is answered once it is complete.
        """
        line = b'{"tarea_id": "p", "tipo": "upper", "contenido": "trozo"}\n'
        for i in range(len(line)):
            self.proto.dataReceived(line[i:i + 1])
        self.assertEqual(replies(self.transport)[0]["resultado"], "TROZO")

    def test_ping_and_tipos(self) -> None:
        """
        {"op": "ping"} answers pong; {"op": "tipos"} lists the task types.
        """
        send(self.proto, {"op": "ping"}, {"op": "tipos", "tarea_id": "m"})
        ping, tipos = replies(self.transport)
        self.assertEqual(ping, {"estado": "ok", "resultado": "pong"})
        self.assertEqual(tipos["tarea_id"], "m")
        self.assertEqual([t["tipo"] for t in tipos["resultado"]],
                         ["uppercase", "reverse", "word_count", "sleep"])


class PipeliningTests(SynchronousTestCase):
    """
    One connection carries many tasks; replies come in completion order.
    """

    def test_completion_order(self) -> None:
        """
        Pipelined sleeps of 3, 1 and 2 seconds and an uppercase are answered
        uppercase first, then 1, 2, 3.
        """
        factory = make_server()
        proto, transport = connect(factory)
        send(proto, *[{"tarea_id": f"s{n}", "tipo": "sleep", "contenido": n} for n in (3, 1, 2)],
             {"tarea_id": "u", "tipo": "uppercase", "contenido": "ya"})
        order = [r["tarea_id"] for r in replies(transport)]
        for _ in range(3):
            factory.orchestrator.clock.advance(1)
            order += [r["tarea_id"] for r in replies(transport)]
        self.assertEqual(order, ["u", "s1", "s2", "s3"])

    def test_duplicate_tarea_id_in_flight(self) -> None:
        """
        A second task with the tarea_id of one still in flight on the same
        connection is refused; the first still completes; afterwards the id
        may be reused.
        """
        factory = make_server()
        proto, transport = connect(factory)
        send(proto, {"tarea_id": "d", "tipo": "sleep", "contenido": 1},
             {"tarea_id": "d", "tipo": "uppercase", "contenido": "x"})
        [dup] = replies(transport)
        self.assertEqual((dup["codigo"], dup["tarea_id"]), ("tarea_id_duplicado", "d"))
        factory.orchestrator.clock.advance(1)
        self.assertEqual(replies(transport)[0]["estado"], "ok")
        send(proto, {"tarea_id": "d", "tipo": "uppercase", "contenido": "x"})
        self.assertEqual(replies(transport)[0]["resultado"], "X")

    def test_same_tarea_id_on_two_connections(self) -> None:
        """
        tarea_id only has to be unique within a connection.
        """
        factory = make_server()
        (p1, t1), (p2, t2) = connect(factory), connect(factory)
        send(p1, {"tarea_id": "same", "tipo": "sleep", "contenido": 1})
        send(p2, {"tarea_id": "same", "tipo": "sleep", "contenido": 1})
        factory.orchestrator.clock.advance(1)
        self.assertEqual([r["estado"] for r in replies(t1) + replies(t2)], ["ok", "ok"])


class BadInputTests(SynchronousTestCase):
    """
    Bad input gets an error line and the connection keeps working.
    """

    def setUp(self) -> None:
        self.factory = make_server(max_line=100)
        self.proto, self.transport = connect(self.factory)

    def assert_still_serves(self) -> None:
        self.assertFalse(self.transport.disconnecting)
        send(self.proto, {"tarea_id": "ok?", "tipo": 1, "contenido": "sigo"})
        self.assertEqual(replies(self.transport)[-1]["resultado"], "SIGO")

    def test_error_reply_shape(self) -> None:
        """
        An error reply has estado, mensaje, codigo and tarea_id.
        """
        send(self.proto, {"tarea_id": "e", "tipo": "uppercase", "contenido": 5})
        self.assertEqual(replies(self.transport), [{
            "estado": "error", "mensaje": "'contenido' debe ser un texto, no un número.",
            "codigo": "contenido_invalido", "tarea_id": "e"}])
        self.assert_still_serves()

    def test_garbage_then_good(self) -> None:
        """
        Invalid JSON and invalid UTF-8 are answered and the next line works.
        """
        self.proto.dataReceived(b"{nope\n\xc3\x28\n")
        self.assertEqual([r["codigo"] for r in replies(self.transport)],
                         ["json_invalido", "utf8_invalido"])
        self.assert_still_serves()

    def test_line_too_long_in_one_read(self) -> None:
        """
        A complete line over the limit is refused; the lines around it are
        answered.
        """
        self.proto.dataReceived(
            b'{"tipo":1,"contenido":"a"}\n' + b"x" * 101 + b'\n{"tipo":1,"contenido":"b"}\n'
        )
        got = replies(self.transport)
        self.assertEqual([r.get("resultado", r.get("codigo")) for r in got],
                         ["A", "linea_demasiado_larga", "B"])
        self.assert_still_serves()

    def test_line_too_long_across_reads_is_not_buffered(self) -> None:
        """
        An endless line is refused as soon as it passes the limit, its bytes
        are dropped rather than buffered, and the line after it works.
        """
        self.proto.dataReceived(b'{"contenido": "' + b"z" * 200)
        [err] = replies(self.transport)
        self.assertEqual(err["codigo"], "linea_demasiado_larga")
        for _ in range(100):
            self.proto.dataReceived(b"z" * 1000)
        self.assertEqual(self.factory.budget.used, 0)  # nothing of it is held
        self.proto.dataReceived(b'zzz"}\n{"tipo": "reverse", "contenido": "ok"}\n')
        self.assertEqual(replies(self.transport)[0]["resultado"], "ko")
        self.assert_still_serves()

    def test_limit_is_exact(self) -> None:
        """
        A line of exactly max_line bytes (not counting its \\n or \\r\\n) is
        accepted, one byte more is not.
        """
        # Blanks fill the line: its reply, "A", is well within the limit
        # that replies are held to as well.
        line = b'{"tipo": 1, "contenido": "a"' + b" " * 71 + b"}"
        self.assertEqual(len(line), 100)
        self.proto.dataReceived(line[:50])
        self.proto.dataReceived(line[50:] + b"\r")
        self.proto.dataReceived(b"\n" + line + b"\n" + line[:-1] + b' }\n')
        self.assertEqual([r.get("resultado") or r.get("codigo") for r in replies(self.transport)],
                         ["A", "A", "linea_demasiado_larga"])

    def test_sleep_longer_than_timeout_refused_at_once(self) -> None:
        """
        A sleep longer than the task timeout is refused without waiting.
        """
        send(self.proto, {"tarea_id": "big", "tipo": "sleep", "contenido": 31})
        [r] = replies(self.transport)
        self.assertEqual((r["codigo"], r["tarea_id"]), ("excede_timeout", "big"))
        self.assertEqual(self.factory.orchestrator.clock.getDelayedCalls(), [])


class LimitTests(SynchronousTestCase):
    """
    Timeouts, the global limit and per-connection backpressure.
    """

    def test_timeout_cancels_the_task(self) -> None:
        """
        A task still running at the timeout is answered 'timeout' and its
        Deferred is cancelled.
        """
        never = Never()
        factory = make_server(
            registry_with(TaskType("nunca", 9, (), "d", never, ASYNC)), timeout=5)
        proto, transport = connect(factory)
        send(proto, {"tarea_id": "n", "tipo": "nunca", "contenido": "arg"})
        factory.orchestrator.clock.advance(4.9)
        self.assertEqual(replies(transport), [])
        factory.orchestrator.clock.advance(0.1)
        [r] = replies(transport)
        self.assertEqual((r["codigo"], r["tarea_id"]), ("timeout", "n"))
        self.assertEqual(never.cancelled, ["arg"])
        self.assertEqual(factory.orchestrator.active, 0)

    def test_staggered_timeouts(self) -> None:
        """
        Each task times out exactly `timeout` seconds after it was accepted,
        whatever came before it; tasks that finish in time are not touched,
        and no timer is left once nothing is in flight.
        """
        never = Never()
        factory = make_server(
            registry_with(TaskType("nunca", 9, (), "d", never, ASYNC)), timeout=5)
        clock = factory.orchestrator.clock
        proto, transport = connect(factory)
        timed_out: List[Tuple[float, str]] = []
        for step in range(24):
            if step in (0, 4, 8):
                t = "abc"[step // 4]
                send(proto, {"tarea_id": t, "tipo": "nunca", "contenido": t},
                     {"tarea_id": "s" + t, "tipo": "sleep", "contenido": 1})
            clock.advance(0.5)
            timed_out += [(clock.seconds(), r["tarea_id"]) for r in replies(transport)
                          if r["estado"] == "error"]
        self.assertEqual(timed_out, [(5.0, "a"), (7.0, "b"), (9.0, "c")])
        self.assertEqual(never.cancelled, ["a", "b", "c"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_deadline_queue_stays_proportional(self) -> None:
        """
        The timeout bookkeeping of finished tasks is dropped, so it stays
        proportional to the tasks in flight, not to all tasks ever run.
        """
        factory = make_server(timeout=30)
        orch = factory.orchestrator
        proto, transport = connect(factory)
        send(proto, {"tarea_id": "long", "tipo": "sleep", "contenido": 29})
        for _round in range(50):
            send(proto, *[{"tipo": "sleep", "contenido": 0.01} for _ in range(100)])
            orch.clock.advance(0.01)
        self.assertEqual(len(replies(transport)), 5000)
        self.assertEqual(orch.active, 1)
        self.assertLess(len(orch._deadlines), 2 * orch.active + 1024 + 100)

    def test_busy_past_global_limit(self) -> None:
        """
        Past max_tasks in flight over all connections, new tasks get
        'ocupado'; control requests still work; capacity
        comes back as tasks finish.
        """
        factory = make_server(max_tasks=2)
        (p1, t1), (p2, t2) = connect(factory), connect(factory)
        send(p1, {"tarea_id": "a", "tipo": 4, "contenido": 1})
        send(p2, {"tarea_id": "b", "tipo": 4, "contenido": 1},
             {"tarea_id": "c", "tipo": 4, "contenido": 1}, {"op": "ping"})
        self.assertEqual([r.get("codigo") or r.get("resultado") for r in replies(t2)],
                         ["ocupado", "pong"])
        factory.orchestrator.clock.advance(1)
        replies(t1), replies(t2)
        send(p2, {"tarea_id": "c", "tipo": 4, "contenido": 1})
        factory.orchestrator.clock.advance(1)
        self.assertEqual(replies(t2)[0]["estado"], "ok")

    def test_backpressure_per_connection(self) -> None:
        """
        With max_inflight tasks in flight the server stops reading the
        connection and holds the rest; as tasks finish it reads again, and
        every task is answered.
        """
        factory = make_server(max_inflight=2)
        proto, transport = connect(factory)
        send(proto, *[{"tarea_id": str(i), "tipo": "sleep", "contenido": 1} for i in range(5)])
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(factory.orchestrator.active, 2)
        done: List[str] = []
        for _ in range(3):
            factory.orchestrator.clock.advance(1)
            done += [r["tarea_id"] for r in replies(transport)]
            self.assertLessEqual(factory.orchestrator.active, 2)
        self.assertEqual(done, ["0", "1", "2", "3", "4"])
        self.assertEqual(transport.producerState, "producing")

    def test_full_write_buffer_stops_reading(self) -> None:
        """
        When the transport says its write buffer is full (pauseProducing),
        the server holds further lines and stops reading until it drains.
        """
        factory = make_server()
        proto, transport = connect(factory)
        proto.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        send(proto, {"tarea_id": "held", "tipo": 1, "contenido": "x"})
        self.assertEqual(transport.value(), b"")
        proto.resumeProducing()
        self.assertEqual(replies(transport)[0]["tarea_id"], "held")
        self.assertEqual(transport.producerState, "producing")

    def test_disconnect_cancels_tasks(self) -> None:
        """
        When a client goes away its tasks are cancelled (no timers left), the
        global count drops, nothing is written and other clients carry on.
        """
        factory = make_server()
        (p1, t1), (p2, t2) = connect(factory), connect(factory)
        send(p1, *[{"tipo": "sleep", "contenido": 5} for _ in range(10)])
        send(p2, {"tarea_id": "other", "tipo": "sleep", "contenido": 5})
        self.assertEqual(factory.orchestrator.active, 11)
        p1.connectionLost()
        self.assertEqual(factory.orchestrator.active, 1)
        self.assertEqual(len(factory.orchestrator.clock.getDelayedCalls()), 2)
        factory.orchestrator.clock.advance(5)
        self.assertEqual(t1.value(), b"")
        self.assertEqual(replies(t2)[0]["tarea_id"], "other")
        self.assertEqual(factory.orchestrator.active, 0)
        self.assertNotIn(p1, factory.protocols)


class TaskFailureTests(SynchronousTestCase):
    """
    Failures inside tasks become error replies; tracebacks go to the log.
    """

    def test_internal_error_is_logged_not_sent(self) -> None:
        """
        A task raising an unexpected exception is answered 'error_interno'
        without the traceback, which goes to the log with the tarea_id.
        """
        events: List[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        factory = make_server(registry_with(
            TaskType("divide", 9, (), "d", lambda s: 1 / 0, THREAD),
            TaskType("divide_inline", 10, (), "d", lambda s: 1 / 0, INLINE),
        ))
        proto, transport = connect(factory)
        send(proto, {"tarea_id": "z", "tipo": "divide", "contenido": "x"},
             {"tarea_id": "zi", "tipo": "divide_inline", "contenido": "x"})
        got = replies(transport)
        self.assertEqual([(r["codigo"], r["tarea_id"]) for r in got],
                         [("error_interno", "z"), ("error_interno", "zi")])
        self.assertNotIn("ZeroDivision", json.dumps(got))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.assertEqual(sorted(e["tarea_id"] for e in events if "log_failure" in e), ["z", "zi"])
        self.assert_serves(proto, transport)

    def assert_serves(self, proto: TaskProtocol, transport: StringTransport) -> None:
        send(proto, {"tipo": 1, "contenido": "bien"})
        self.assertEqual(replies(transport)[0]["resultado"], "BIEN")

    def test_task_failed_message_reaches_client(self) -> None:
        """
        A task raising TaskFailed sends its message with code tarea_fallida.
        """
        def refuse(arg: Any) -> None:
            raise TaskFailed("No puedo con eso.")

        factory = make_server(registry_with(TaskType("niega", 9, (), "d", refuse, THREAD)))
        proto, transport = connect(factory)
        send(proto, {"tarea_id": "q", "tipo": "niega", "contenido": 1})
        self.assertEqual(replies(transport), [{
            "estado": "error", "mensaje": "No puedo con eso.", "codigo": "tarea_fallida",
            "tarea_id": "q"}])

    def test_unserialisable_result_is_internal_error(self) -> None:
        """
        A task whose result JSON cannot carry gets 'error_interno', whether
        it ran on the pool or inline, and the connection keeps working.
        """
        factory = make_server(registry_with(
            TaskType("conjunto", 9, (), "d", set, THREAD),
            TaskType("conjunto_inline", 10, (), "d", set, INLINE),
        ))
        proto, transport = connect(factory)
        send(proto, {"tarea_id": "c", "tipo": "conjunto", "contenido": "ab"},
             {"tarea_id": "ci", "tipo": "conjunto_inline", "contenido": "ab"})
        self.assertEqual([(r["tarea_id"], r["codigo"]) for r in replies(transport)],
                         [("c", "error_interno"), ("ci", "error_interno")])
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 2)
        self.assert_serves(proto, transport)


class WorkerTests(SynchronousTestCase):
    """
    The 'worker' field says where a task ran.
    """

    def test_thread_tasks_report_pool_thread_number(self) -> None:
        """
        With inline execution off, text tasks run on the pool and report the
        pool thread's number (1..N), as the seed's workers did.
        """
        factory = make_server(inline=False)
        proto, transport = connect(factory)
        send(proto, {"tipo": 1, "contenido": "x"}, {"tipo": 3, "contenido": "a b"})
        got = replies(transport)
        self.assertEqual([(r["resultado"], r["worker"]) for r in got], [("X", 1), (2, 1)])


class LoggingTests(SynchronousTestCase):
    """
    Per-task events are logged only when asked for.
    """

    def log_events(self, every: int) -> List[LogEvent]:
        events: List[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        factory = make_server()
        factory.orchestrator.log_every = every
        proto, transport = connect(factory)
        send(proto, *[{"tarea_id": str(i), "tipo": 1, "contenido": "x"} for i in range(6)],
             {"tarea_id": "s", "tipo": 4, "contenido": 2})
        factory.orchestrator.clock.advance(2)
        return [e for e in events if "estado" in e]

    def test_off_by_default(self) -> None:
        """
        With log_every=0 no per-task event is emitted.
        """
        self.assertEqual(self.log_events(0), [])

    def test_sampled_events_carry_fields(self) -> None:
        """
        With log_every=N every N-th task emits an event with tarea_id, tipo,
        worker, duration, estado and peer.
        """
        events = self.log_events(3)
        self.assertEqual([e["tarea_id"] for e in events], ["2", "5"])
        every = self.log_events(1)
        self.assertEqual(len(every), 7)
        sleep = every[-1]
        self.assertEqual((sleep["tipo"], sleep["estado"], sleep["worker"], sleep["duration"],
                          sleep["peer"]), ("sleep", "ok", 0, 2.0, "10.1.2.3:4567"))


class ReactorFakeTests(SynchronousTestCase):
    """
    The shipped fakes behave as the real reactor and pool would.
    """

    def test_fake_reactor_runs_thread_results_at_once(self) -> None:
        """
        FakeReactor.callFromThread runs the call synchronously, in the
        caller, so that deferToThreadPool results arrive without a reactor.
        """
        seen: List[int] = []
        FakeReactor().callFromThread(seen.append, 1)
        self.assertEqual(seen, [1])


class IdleTimeoutTests(SynchronousTestCase):
    """
    Connections that sit idle are closed; busy ones are not.
    """

    def test_idle_connection_closed_busy_one_kept(self) -> None:
        """
        After idle_timeout seconds with nothing received and nothing in
        flight a connection is closed; one with a task in flight, or that
        sent something meanwhile, stays open.
        """
        factory = make_server(idle_timeout=10)
        clock = factory.orchestrator.clock
        (_, t_idle), (busy, t_busy), (chatty, t_chatty) = (
            connect(factory), connect(factory), connect(factory))
        send(busy, {"tipo": "sleep", "contenido": 25})
        clock.advance(6)
        send(chatty, {"op": "ping"})
        clock.advance(4)
        self.assertEqual(factory.close_idle(), 1)
        self.assertEqual((t_idle.disconnecting, t_busy.disconnecting, t_chatty.disconnecting),
                         (True, False, False))
        clock.advance(6)
        self.assertEqual(factory.close_idle(), 1)
        self.assertTrue(t_chatty.disconnecting)
        clock.advance(15)
        self.assertEqual(replies(t_busy)[0]["estado"], "ok")
        self.assertEqual(factory.close_idle(), 0)
        clock.advance(10)
        self.assertEqual(factory.close_idle(), 1)
        self.assertTrue(t_busy.disconnecting)

    def test_zero_means_never(self) -> None:
        """
        With idle_timeout 0 nothing is ever closed for idleness.
        """
        factory = make_server(idle_timeout=0)
        _, transport = connect(factory)
        factory.orchestrator.clock.advance(10 ** 6)
        self.assertEqual(factory.close_idle(), 0)
        self.assertFalse(transport.disconnecting)


class CancellationTests(SynchronousTestCase):
    """
    Timeouts and shutdown cancel the right tasks and answer with the right
    code, whatever the task's Deferred looks like.
    """

    def test_task_waiting_on_a_chained_deferred_times_out(self) -> None:
        """
        A task whose Deferred has fired but waits on another Deferred
        returned by a callback (d.called is true) still times out, and the
        inner Deferred is cancelled.
        """
        inner_cancelled: List[bool] = []

        def chained(clock: Any, arg: Any) -> Deferred[Any]:
            inner: Deferred[Any] = Deferred(lambda d: inner_cancelled.append(True))
            outer: Deferred[Any] = Deferred()
            outer.addCallback(lambda _: inner)
            outer.callback(None)
            return outer

        factory = make_server(
            registry_with(TaskType("cadena", 9, (), "d", chained, ASYNC)), timeout=5)
        proto, transport = connect(factory)
        send(proto, {"tarea_id": "c", "tipo": "cadena", "contenido": 1})
        factory.orchestrator.clock.advance(5)
        self.assertEqual([(r["tarea_id"], r["codigo"]) for r in replies(transport)],
                         [("c", "timeout")])
        self.assertEqual(inner_cancelled, [True])
        self.assertEqual(factory.orchestrator.active, 0)

    def test_code_does_not_depend_on_the_cancellers_exception(self) -> None:
        """
        A task whose canceller fails it with its own exception (not
        CancelledError) is still answered 'timeout' on timeout and
        'apagando' at the shutdown deadline, and leaves nothing behind.
        """
        class Gone(Exception):
            pass

        def own_error(clock: Any, arg: Any) -> Deferred[Any]:
            return Deferred(lambda d: d.errback(Gone()))

        factory = make_server(
            registry_with(TaskType("propio", 9, (), "d", own_error, ASYNC)), timeout=5)
        proto, transport = connect(factory)
        send(proto, {"tarea_id": "t", "tipo": "propio", "contenido": 1})
        factory.orchestrator.clock.advance(5)
        send(proto, {"tarea_id": "s", "tipo": "propio", "contenido": 1})
        factory.orchestrator.cancel_all()
        self.assertEqual([(r["tarea_id"], r["codigo"]) for r in replies(transport)],
                         [("t", "timeout"), ("s", "apagando")])
        self.assertEqual(proto.session.inflight, 0)
        self.assertEqual(self.flushLoggedErrors(Gone), [])

    def test_task_failing_with_cancelled_error_by_itself_is_answered(self) -> None:
        """
        A task that fails with CancelledError of its own accord, on an open
        connection, is answered 'error_interno' rather than left unanswered.
        """
        from twisted.internet.defer import CancelledError, fail

        factory = make_server(registry_with(
            TaskType("anula", 9, (), "d", lambda c, a: fail(CancelledError()), ASYNC)))
        proto, transport = connect(factory)
        send(proto, {"tarea_id": "x", "tipo": "anula", "contenido": 1})
        self.assertEqual([(r["tarea_id"], r["codigo"]) for r in replies(transport)],
                         [("x", "error_interno")])
        self.assertEqual(len(self.flushLoggedErrors(CancelledError)), 1)

    def test_one_timer_when_timeouts_free_held_lines(self) -> None:
        """
        When a timeout frees a connection held at max_inflight and the next
        held task is accepted during the expiry, there is still only one
        deadline timer, and none once nothing is in flight.
        """
        never = Never()
        factory = make_server(registry_with(TaskType("nunca", 9, (), "d", never, ASYNC)),
                              timeout=5, max_inflight=1)
        clock = factory.orchestrator.clock
        proto, transport = connect(factory)
        send(proto, *[{"tarea_id": str(i), "tipo": "nunca", "contenido": i} for i in range(6)])
        for n in range(6):
            self.assertEqual(len(clock.getDelayedCalls()), 1, n)
            clock.advance(5)
        self.assertEqual([r["codigo"] for r in replies(transport)], ["timeout"] * 6)
        self.assertEqual(clock.getDelayedCalls(), [])


class PluginFaultTests(SynchronousTestCase):
    """
    A task type whose validation code breaks costs its request an
    'error_interno', never the connection or its other tasks.
    """

    def check(self, tasktype: TaskType, exc: type) -> None:
        factory = make_server(registry_with(tasktype))
        proto, transport = connect(factory)
        send(proto, {"tarea_id": "s", "tipo": "sleep", "contenido": 1},
             {"tarea_id": "p", "tipo": tasktype.name, "contenido": "abc"})
        self.assertEqual([(r["tarea_id"], r["codigo"]) for r in replies(transport)],
                         [("p", "error_interno")])
        self.assertEqual(len(self.flushLoggedErrors(exc)), 1)
        self.assertFalse(transport.disconnecting)
        factory.orchestrator.clock.advance(1)
        self.assertEqual(replies(transport)[0]["tarea_id"], "s")

    def test_validator_raising(self) -> None:
        """
        A plugin whose validate() raises an unexpected TypeError gets
        'error_interno' for that request, with the traceback logged, while
        the connection stays open and its other task is still answered.
        """
        def validate(contenido: Any) -> Any:
            return contenido["clave"]

        self.check(TaskType("roto", 9, (), "d", str, INLINE, validate), TypeError)

    def test_duration_raising(self) -> None:
        """
        A plugin whose duration() raises an unexpected ValueError gets
        'error_interno' for that request, with the traceback logged, while
        the connection stays open and its other task is still answered.
        """
        self.check(TaskType("roto", 9, (), "d", Never(), ASYNC,
                            duration=lambda a: float(a)), ValueError)


class CloseTests(SynchronousTestCase):
    """
    Closing a connection from the server side.
    """

    def test_close_stops_being_the_transports_producer(self) -> None:
        """
        close() unregisters the protocol as the transport's producer before
        closing: a transport with a registered producer does not finish
        closing (TLS waits for it; TCP asks a paused one for more data).
        """
        factory = make_server(idle_timeout=1)
        proto, transport = connect(factory)
        self.assertIs(transport.producer, proto)
        factory.orchestrator.clock.advance(1)
        self.assertEqual(factory.close_idle(), 1)
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)

    def test_connection_that_does_not_read_is_not_idle(self) -> None:
        """
        A connection the server stopped reading because its client does not
        read the replies is not closed as idle: its unread requests would be
        lost.
        """
        factory = make_server(idle_timeout=1)
        proto, transport = connect(factory)
        proto.pauseProducing()
        factory.orchestrator.clock.advance(5)
        self.assertEqual(factory.close_idle(), 0)
        proto.resumeProducing()
        factory.orchestrator.clock.advance(1)
        self.assertEqual(factory.close_idle(), 1)


class TLSWriteTests(SynchronousTestCase):
    """
    Behind Twisted's TLS layer (what C{ssl:} ports give), the replies of a
    read leave with that read, not on a later reactor iteration.
    """

    def test_replies_leave_with_the_read(self) -> None:
        """
        The replies to the lines of one TLS record are encrypted and handed
        to the socket's transport before C{dataReceived} returns, with no
        delayed call left for them; a reply that comes later (a timer
        task) leaves as soon as it is ready, after the earlier ones.
        """
        import tempfile
        from pathlib import Path

        from OpenSSL import SSL
        from twisted.internet import ssl
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from .conftest import TLSFiles

        with tempfile.TemporaryDirectory() as folder:
            files = TLSFiles(Path(folder))
            pem = Path(files.key).read_text() + Path(files.cert).read_text()
        clock = FakeReactor()
        tls = TLSMemoryBIOFactory(ssl.PrivateCertificate.loadPEM(pem).options(), False,
                                  make_server(reactor=clock), clock=clock)
        server = tls.buildProtocol(PEER)
        wire = StringTransport(peerAddress=PEER)
        server.makeConnection(wire)
        client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        client.set_connect_state()

        def to_server() -> None:
            try:
                server.dataReceived(client.bio_read(65536))
            except SSL.WantReadError:
                pass

        def from_server() -> bytes:
            client.bio_write(wire.value())
            wire.clear()
            got = b""
            while True:
                try:
                    got += client.recv(65536)
                except SSL.WantReadError:
                    return got

        for _ in range(5):  # the handshake's round trips
            try:
                client.do_handshake()
                break
            except SSL.WantReadError:
                to_server()
                from_server()
        client.send(b'{"tarea_id": "a", "tipo": "1", "contenido": "hola"}\n'
                    b'{"tarea_id": "s", "tipo": "sleep", "contenido": 1}\n'
                    b'{"tarea_id": "b", "tipo": "2", "contenido": "hola"}\n')
        to_server()
        # Only the sleep's timer and the orchestrator's deadline are due.
        self.assertEqual(sorted(c.getTime() for c in clock.getDelayedCalls()), [1.0, 30.0])
        first = [json.loads(line) for line in from_server().splitlines()]
        self.assertEqual([(r["tarea_id"], r["resultado"]) for r in first],
                         [("a", "HOLA"), ("b", "aloh")])
        clock.advance(1.0)
        later = [json.loads(line) for line in from_server().splitlines()]
        self.assertEqual([(r["tarea_id"], r["estado"]) for r in later], [("s", "ok")])


class ReplyLineLimitTests(SynchronousTestCase):
    """
    No client gets a reply line longer than the server's C{--max-line}: a
    seed client, which reads lines and knows nothing of references, gets
    C{resultado_demasiado_grande} instead, whatever the path of the reply.
    """

    def limited(self, inline: bool) -> Tuple[TaskProtocol, StringTransport]:
        return connect(make_server(max_line=2000, inline=inline))

    def check(self, proto: TaskProtocol, transport: StringTransport) -> None:
        # 600 "ΐ" make a request line of about 1,260 bytes of UTF-8;
        # upper-cased, each becomes three code points of 6 bytes in all.
        for tarea_id, text in (("big", "ΐ" * 600), ("small", "ΐ")):
            line = {"tarea_id": tarea_id, "tipo": "uppercase", "contenido": text}
            proto.dataReceived(json.dumps(line, ensure_ascii=False).encode() + b"\n")
        lines = transport.value().splitlines()
        self.assertTrue(all(len(line) <= 2000 for line in lines), [len(x) for x in lines])
        got = {r["tarea_id"]: r for r in map(json.loads, lines)}
        self.assertEqual(got["big"]["codigo"], "resultado_demasiado_grande")
        self.assertIn("2000", got["big"]["mensaje"])
        self.assertEqual(got["small"]["resultado"], "ΐ".upper())
        self.assertFalse(transport.disconnecting)

    def test_inline_reply(self) -> None:
        self.check(*self.limited(inline=True))

    def test_reply_ready_later(self) -> None:
        """
        A reply that comes after the read (from the pool here) is checked too.
        """
        self.check(*self.limited(inline=False))

    def test_estado_of_a_large_result(self) -> None:
        """
        C{op: estado} carries the task's recorded result: its line is held
        to the same limit.
        """
        from pfo3.store import MemoryStore

        reactor = FakeReactor()
        proto, transport = connect(make_server(max_line=2000, reactor=reactor,
                                               store=MemoryStore(reactor)))
        for tarea_id, text in (("big", "ΐ" * 600), ("small", "ΐ")):
            line = {"tarea_id": tarea_id, "tipo": "uppercase", "contenido": text}
            proto.dataReceived(json.dumps(line, ensure_ascii=False).encode() + b"\n")
        transport.clear()
        for tarea_id in ("big", "small"):
            proto.dataReceived(json.dumps({"op": "estado", "tarea_id": tarea_id}).encode()
                               + b"\n")
        lines = transport.value().splitlines()
        self.assertTrue(all(len(line) <= 2000 for line in lines), [len(x) for x in lines])
        got = {r["tarea_id"]: r for r in map(json.loads, lines)}
        self.assertEqual(got["big"]["codigo"], "resultado_demasiado_grande")
        self.assertEqual(got["small"]["resultado"]["resultado"], "ΐ".upper())

