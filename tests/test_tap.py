"""
Tests for C{twistd pfo3} options, the service tree and graceful shutdown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from pfo3.protocol import TaskFactory
from pfo3.service import TaskServerService
from pfo3.tap import Options, makeService
from pfo3.testing import FakeReactor, SynchronousThreadPool, make_server


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults() -> None:
    """
    With no options pfo3 listens on tcp:9000 with the seed's 4 workers and
    30 s timeout.
    """
    o = parse()
    assert o["ports"] == ["tcp:9000"]
    assert (o["workers"], o["timeout"], o["max-line"]) == (4, 30.0, 1024 * 1024)
    assert not o["no-inline"] and not o["no-plugins"]


def test_port_is_repeatable() -> None:
    """
    --port and -p may be given several times, with any endpoint type.
    """
    o = parse("--port", "tcp:9001", "-p", "unix:/tmp/x.sock", "--port", "haproxy:tcp:9002")
    assert o["ports"] == ["tcp:9001", "unix:/tmp/x.sock", "haproxy:tcp:9002"]


@pytest.mark.parametrize("argv", [
    ["--workers", "0"], ["--workers", "many"], ["--timeout", "0"], ["--timeout", "-1"],
    ["--timeout", "nan"], ["--timeout", "inf"], ["--max-line", "0"], ["--max-inflight", "0"],
    ["--max-tasks", "0"], ["--shutdown-timeout", "0"], ["--log-tasks", "-1"],
    ["--idle-timeout", "-1"], ["--idle-timeout", "inf"], ["--gc-threshold", "-5"],
    ["--port", "bogus:1"], ["--port", "tcp:notaport"],
    ["--port", "ssl:9443:privateKey=/no/such/key.pem"], ["--unknown"],
    ["--max-auth-failures", "-1"], ["--broker-ca", "/etc/hosts"],
    ["--broker-cert", "/etc/hosts"], ["--broker-key", "/etc/hosts"],
])
def test_bad_options_are_usage_errors(argv: List[str]) -> None:
    """
    Invalid options raise UsageError (twistd prints it; no traceback).
    """
    with pytest.raises(usage.UsageError):
        parse(*argv)


def test_make_service_tree() -> None:
    """
    makeService builds one listening child per --port, all serving one
    factory whose settings come from the options.
    """
    o = parse("-p", "tcp:0:interface=127.0.0.1", "-p", "unix:/tmp/pfo3-t.sock", "-w", "7",
              "--max-line", "5000", "--max-inflight", "9", "--timeout", "2.5", "--no-plugins",
              "--no-inline", "--log-tasks", "10", "--idle-timeout", "60")
    service = makeService(o, FakeReactor())
    assert isinstance(service, TaskServerService)
    children = list(service)
    assert len(children) == 2 and all(isinstance(c, StreamServerEndpointService) for c in children)
    factory = service.factory
    assert all(c.factory is factory for c in children)  # type: ignore[attr-defined]
    assert (factory.max_line, factory.max_inflight, factory.idle_timeout) == (5000, 9, 60)
    orch = factory.orchestrator
    assert (orch.timeout, orch.log_every) == (2.5, 10)
    assert orch.executor.inline is False
    assert service.executor.workers == 7
    assert service.gc_threshold == 10_000
    assert makeService(parse("--gc-threshold", "0"), FakeReactor()).gc_threshold == 0


def test_max_auth_failures_reaches_the_gate(tmp_path: Path) -> None:
    """
    --max-auth-failures sets the gate's limit of refused tokens per connection.
    """
    from pfo3.gate import DEFAULT_MAX_AUTH_FAILURES

    secret = tmp_path / "secret"
    secret.write_text("s" * 40 + "\n")
    options = ["-p", "tcp:0:interface=127.0.0.1", "--jwt-secret-file", str(secret)]
    gate = makeService(parse(*options), FakeReactor()).factory.gate
    assert gate.max_auth_failures == DEFAULT_MAX_AUTH_FAILURES
    gate = makeService(parse(*options, "--max-auth-failures", "2"), FakeReactor()).factory.gate
    assert gate.max_auth_failures == 2


def test_pool_threads_are_daemons() -> None:
    """
    The server's pool threads do not keep the process alive, so a blocking
    task that never returns cannot stop the server from exiting.
    """
    import threading

    from pfo3.executor import DaemonThreadPool

    pool = DaemonThreadPool(0, 1)
    seen: List[bool] = []
    done = threading.Event()
    pool.start()
    try:
        pool.callInThread(lambda: (seen.append(threading.current_thread().daemon), done.set()))
        assert done.wait(10)
    finally:
        pool.stop()
    assert seen == [True]
    assert isinstance(makeService(parse(), FakeReactor()).executor.threadpool, DaemonThreadPool)


def test_gc_tuning_applied_at_start() -> None:
    """
    A service with gc_threshold freezes the heap it starts with and sets the
    youngest generation's threshold; with 0 it changes nothing.
    """
    import gc

    saved = gc.get_threshold()
    reactor = FakeReactor()
    try:
        untouched_factory = make_server(reactor=reactor)
        untouched = TaskServerService(untouched_factory, untouched_factory.orchestrator.executor,
                                      reactor, gc_threshold=0)
        untouched.startService()
        assert gc.get_threshold() == saved
        assert gc.get_freeze_count() == 0
        tuned_factory = make_server(reactor=reactor)
        tuned = TaskServerService(tuned_factory, tuned_factory.orchestrator.executor,
                                  reactor, gc_threshold=12_345)
        tuned.startService()
        assert gc.get_threshold() == (12_345,) + saved[1:]
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


class ShutdownTests(SynchronousTestCase):
    """
    Stopping the service lets tasks in flight finish, within a deadline.
    """

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.factory: TaskFactory = make_server(reactor=self.reactor)
        self.service = TaskServerService(
            self.factory, self.factory.orchestrator.executor, self.reactor, 5.0)
        self.service.startService()
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
        self.proto.makeConnection(self.transport)

    def send(self, obj: Any) -> None:
        self.proto.dataReceived(json.dumps(obj).encode() + b"\n")

    def replies(self) -> List[Any]:
        out = [json.loads(x) for x in self.transport.value().splitlines()]
        self.transport.clear()
        return out

    def test_in_flight_tasks_finish_and_new_ones_are_refused(self) -> None:
        """
        After stopService, a task in flight still gets its reply, a new task
        gets 'apagando', and once all are answered the connection is closed
        and the stop completes.
        """
        self.send({"tarea_id": "old", "tipo": "sleep", "contenido": 2})
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        self.send({"tarea_id": "new", "tipo": "uppercase", "contenido": "x"})
        self.assertEqual([(r["tarea_id"], r["codigo"]) for r in self.replies()],
                         [("new", "apagando")])
        self.reactor.advance(2)
        self.assertEqual([(r["tarea_id"], r["estado"]) for r in self.replies()], [("old", "ok")])
        self.assertTrue(self.transport.disconnecting)
        self.assertNoResult(stopped)
        self.proto.connectionLost()
        self.successResultOf(stopped)

    def test_deadline_cancels_the_rest(self) -> None:
        """
        Tasks still running at the shutdown deadline are cancelled and their
        clients told 'apagando'; the stop then completes.
        """
        self.send({"tarea_id": "long", "tipo": "sleep", "contenido": 20})
        stopped = self.service.stopService()
        self.reactor.advance(4.9)
        self.assertNoResult(stopped)
        self.reactor.advance(0.1)
        self.assertEqual([(r["tarea_id"], r["codigo"]) for r in self.replies()],
                         [("long", "apagando")])
        self.assertTrue(self.transport.disconnecting)
        self.proto.connectionLost()
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_blocking_task_still_running_does_not_hang_the_stop(self) -> None:
        """
        A server stopped while a blocking task runs on the pool answers it
        'apagando' at the shutdown deadline and completes its stop without
        stopping (joining) the pool, which would wait for the task without
        limit; stopped after the task returned, it stops the pool.
        """
        class HoldingPool(SynchronousThreadPool):
            def __init__(self) -> None:
                self.held: List[Any] = []
                self.stopped = False

            def callInThreadWithCallback(self, onResult: Any, f: Any, *args: Any,
                                         **kwargs: Any) -> None:
                self.held.append((onResult, f, args))

            def run_held(self) -> None:
                on_result, f, args = self.held.pop()
                on_result(True, f(*args))

            def stop(self) -> None:
                self.stopped = True

        from pfo3.tasks import BUILTINS, THREAD, TaskRegistry, TaskType

        def stop_with(stop_while_running: bool) -> Tuple[HoldingPool, Any, bytes, int]:
            reactor = FakeReactor()
            seen: Dict[str, Any] = {}

            def bloquea(arg: str) -> str:
                seen["running"] = executor.running
                if stop_while_running:
                    seen["stopped"] = service.stopService()
                    reactor.advance(5)  # the shutdown deadline passes meanwhile
                    proto.connectionLost()
                return arg.upper()

            factory = make_server(TaskRegistry(BUILTINS + (
                TaskType("bloquea", 9, (), "d", bloquea, THREAD),)), reactor=reactor)
            executor = factory.orchestrator.executor
            pool = HoldingPool()
            executor.threadpool = pool
            service = TaskServerService(factory, executor, reactor, 5.0)
            service.startService()
            proto = factory.buildProtocol(None)
            transport = StringTransport()
            proto.makeConnection(transport)
            proto.dataReceived(b'{"tarea_id": "b", "tipo": "bloquea", "contenido": "x"}\n')
            pool.run_held()
            if not stop_while_running:
                seen["stopped"] = service.stopService()
                proto.connectionLost()
            self.successResultOf(seen["stopped"])
            reply = json.loads(transport.value())
            return pool, reply.get("codigo", reply["estado"]), seen["running"], executor.running

        pool, answer, running_during, running_after = stop_with(stop_while_running=True)
        self.assertEqual((pool.stopped, answer, running_during, running_after),
                         (False, "apagando", 1, 0))
        pool, answer, running_during, running_after = stop_with(stop_while_running=False)
        self.assertEqual((pool.stopped, answer, running_during, running_after),
                         (True, "ok", 1, 0))

    def test_sweeper_closes_idle_connections(self) -> None:
        """
        A running service closes idle connections on its own clock, and
        stops sweeping when stopped.
        """
        reactor = FakeReactor()
        factory = make_server(reactor=reactor, idle_timeout=8)
        service = TaskServerService(factory, factory.orchestrator.executor, reactor)
        service.startService()
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        reactor.advance(6)
        self.assertFalse(transport.disconnecting)
        reactor.advance(4)
        self.assertTrue(transport.disconnecting)
        proto.connectionLost()
        self.successResultOf(service.stopService())
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_idle_stop_closes_connections(self) -> None:
        """
        With nothing in flight the service closes the connections at once and
        is stopped as soon as they are gone.
        """
        stopped = self.service.stopService()
        self.assertTrue(self.transport.disconnecting)
        self.proto.connectionLost()
        self.successResultOf(stopped)

    def test_client_that_never_closes_is_aborted(self) -> None:
        """
        A connection that does not close within the shutdown timeout and the
        close grace after it (its peer reads nothing) is aborted so the stop
        still completes.
        """
        stopped = self.service.stopService()
        self.reactor.advance(5)  # the shutdown timeout: nothing to cancel
        self.reactor.advance(4.9)  # most of the close grace
        self.assertNoResult(stopped)
        self.reactor.advance(0.1)
        self.assertTrue(self.transport.disconnected)
        self.proto.connectionLost()
        self.successResultOf(stopped)
