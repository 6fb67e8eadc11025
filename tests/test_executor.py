"""
Tests for the executor seam: L{LocalExecutor} against L{IExecutor}, work
given up on before and after it starts, and how abandoned blocking work
counts against the server's limits.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, List, Tuple

from twisted.internet.defer import CancelledError
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pfo3.executor import IExecutor, LocalExecutor
from pfo3.tasks import BUILTINS, THREAD, TaskRegistry, TaskType
from pfo3.testing import FakeReactor, SynchronousThreadPool, make_server


class QueuedPool(SynchronousThreadPool):
    """
    A pool whose work waits until the test runs it, as a busy pool's queue
    would.
    """

    def __init__(self) -> None:
        self.queue: List[Tuple[Callable[..., Any], Callable[..., Any], Tuple[Any, ...]]] = []
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def callInThreadWithCallback(self, onResult: Any, f: Any, *args: Any, **kw: Any) -> None:
        self.queue.append((onResult, f, args))

    def run_next(self) -> None:
        on_result, f, args = self.queue.pop(0)
        on_result(True, f(*args))


class LocalExecutorTests(SynchronousTestCase):
    """
    L{LocalExecutor} provides L{IExecutor} and gives up cleanly on work.
    """

    def setUp(self) -> None:
        self.calls: List[str] = []
        self.pool = QueuedPool()
        self.executor = LocalExecutor(FakeReactor(), self.pool)
        self.blocking = TaskType("bloquea", 90, (), "d", self._work, THREAD)

    def _work(self, arg: str) -> str:
        self.calls.append(arg)
        return arg.upper()

    def test_provides_the_interface(self) -> None:
        """
        LocalExecutor provides IExecutor, and its start and stop start and
        stop its thread pool.
        """
        self.assertTrue(verifyObject(IExecutor, self.executor))
        self.executor.start()
        self.assertTrue(self.pool.started)
        self.successResultOf(self.executor.stop())
        self.assertTrue(self.pool.stopped)

    def test_cancelled_before_it_starts_is_dropped(self) -> None:
        """
        Blocking work cancelled while it waits in the pool's queue never
        runs, and its Deferred fails with CancelledError at once.
        """
        d = self.executor.run(self.blocking, "a")
        d.cancel()  # type: ignore[union-attr]
        self.failureResultOf(d, CancelledError)  # type: ignore[arg-type]
        self.pool.run_next()
        self.assertEqual(self.calls, [])
        self.assertEqual((self.executor.running, self.executor.abandoned), (0, 0))

    def test_cancelled_while_running_counts_as_abandoned(self) -> None:
        """
        Blocking work cancelled while its function runs is counted as
        running and abandoned until the function returns; its late result
        is dropped.
        """
        seen: List[Tuple[int, int]] = []
        box: List[Any] = []

        def slow(arg: str) -> str:
            box[0].cancel()  # the caller gives up while the function runs
            seen.append((self.executor.running, self.executor.abandoned))
            return arg

        d = self.executor.run(TaskType("lento", 91, (), "d", slow, THREAD), "x")
        box.append(d)
        self.pool.run_next()
        self.assertEqual(seen, [(1, 1)])
        self.assertEqual((self.executor.running, self.executor.abandoned), (0, 0))
        self.failureResultOf(d, CancelledError)  # type: ignore[arg-type]

    def test_stop_leaves_a_busy_pool_alone(self) -> None:
        """
        stop() does not stop (join) the pool while a blocking function still
        runs on it.
        """
        stops: List[bool] = []

        def during(arg: str) -> str:
            self.successResultOf(self.executor.stop())
            stops.append(self.pool.stopped)
            return arg

        self.executor.run(TaskType("durante", 92, (), "d", during, THREAD), "x")
        self.pool.run_next()
        self.assertEqual(stops, [False])


class AbandonedWorkLimitTests(SynchronousTestCase):
    """
    Clients that submit slow blocking work and leave cannot take the server
    past --max-tasks, and work nobody waits for any more is not run.
    """

    def test_abandoned_work_counts_against_max_tasks(self) -> None:
        """
        With max_tasks=2, a blocking task still running after its client left
        counts: one more task is accepted, the next gets 'ocupado'; once the
        abandoned function returns, new tasks are accepted again.
        """
        results: List[Any] = []

        def bloquea(arg: str) -> str:
            # While this function runs, its client leaves and others come.
            leaver.connectionLost()
            results.append(executor.abandoned)
            proto, transport = connect()
            proto.dataReceived(b'{"tarea_id": "b", "tipo": "sleep", "contenido": 1}\n'
                               b'{"tarea_id": "c", "tipo": "sleep", "contenido": 1}\n')
            results.append([json.loads(x).get("codigo") for x in transport.value().splitlines()])
            return arg

        pool = QueuedPool()
        registry = TaskRegistry(BUILTINS + (TaskType("bloquea", 90, (), "d", bloquea, THREAD),))
        factory = make_server(registry, max_tasks=2)
        executor = factory.orchestrator.executor
        executor.threadpool = pool

        def connect() -> Tuple[Any, StringTransport]:
            proto = factory.buildProtocol(None)
            transport = StringTransport()
            proto.makeConnection(transport)
            return proto, transport

        leaver, _ = connect()
        leaver.dataReceived(b'{"tarea_id": "a", "tipo": "bloquea", "contenido": "x"}\n')
        pool.run_next()
        # b is accepted (1 abandoned + 1 in flight = 2 = max_tasks), c is not.
        self.assertEqual(results, [1, ["ocupado"]])
        self.assertEqual((executor.running, executor.abandoned), (0, 0))
        proto, transport = connect()
        proto.dataReceived(b'{"tarea_id": "d", "tipo": "upper", "contenido": "x"}\n')
        self.assertEqual(json.loads(transport.value())["resultado"], "X")

    def test_queued_work_of_a_client_that_left_is_not_run(self) -> None:
        """
        Blocking tasks still queued when their client disconnects (or they
        time out) are dropped: the pool's threads go to the next clients.
        """
        ran: List[str] = []
        pool = QueuedPool()
        registry = TaskRegistry(BUILTINS + (
            TaskType("bloquea", 90, (), "d", lambda s: ran.append(s) or s, THREAD),))
        factory = make_server(registry, timeout=5)
        factory.orchestrator.executor.threadpool = pool
        gone = factory.buildProtocol(None)
        gone.makeConnection(StringTransport())
        gone.dataReceived(b"".join(
            b'{"tipo": "bloquea", "contenido": "%d"}\n' % i for i in range(3)))
        gone.connectionLost()
        slow = factory.buildProtocol(None)
        slow_transport = StringTransport()
        slow.makeConnection(slow_transport)
        slow.dataReceived(b'{"tarea_id": "t", "tipo": "bloquea", "contenido": "t"}\n')
        factory.orchestrator.clock.advance(5)  # timed out while queued
        self.assertEqual(json.loads(slow_transport.value())["codigo"], "timeout")
        fresh = factory.buildProtocol(None)
        transport = StringTransport()
        fresh.makeConnection(transport)
        fresh.dataReceived(b'{"tarea_id": "f", "tipo": "bloquea", "contenido": "f"}\n')
        while pool.queue:
            pool.run_next()
        self.assertEqual(ran, ["f"])
        self.assertEqual(json.loads(transport.value())["resultado"], "f")
        self.assertEqual(factory.orchestrator.active, 0)


def test_local_executor_accepts_before_it_returns() -> None:
    """
    LocalExecutor has a task in its keeping as soon as run is called: it
    calls C{accepted} before returning, whatever the task's mode.
    """
    from pfo3.tasks import BUILTINS
    from pfo3.testing import FakeReactor, SynchronousThreadPool

    for inline in (True, False):
        executor = LocalExecutor(FakeReactor(), SynchronousThreadPool(), inline=inline)
        calls: List[str] = []
        executor.run(BUILTINS[0], "a", accepted=functools.partial(calls.append, "accepted"))
        assert calls == ["accepted"]
