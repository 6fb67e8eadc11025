"""
Tests of C{{"op": "stats"}} and the counters behind it (L{pfo3.tally},
L{pfo3.stats}), over in-memory transports and a fake clock: after a known
sequence of tasks, refusals and timeouts the summary says exactly what
happened; it needs an identity when authentication is on; in distributed
mode it reports the broker's queue.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

import jwt
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from pfo3.auth import JWTAuthenticator
from pfo3.service import TaskServerService
from pfo3.stats import BrokerProbe, OldestPublished, ServerStats
from pfo3.store import MemoryStore
from pfo3.tally import BUCKETS, Tally
from pfo3.tasks import ASYNC, BUILTINS, TaskRegistry, TaskType
from pfo3.testing import FakeReactor, make_server

from .conftest import connect_transport, take_replies
from .test_amqp import Cluster

SECRET = b"k" * 32


def never_registry(pending: List[Deferred[Any]]) -> TaskRegistry:
    """
    The built-in types and C{nunca}, a task that ends only when the test
    fires it.
    """

    def never(clock: Any, arg: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append(d)
        return d

    return TaskRegistry(BUILTINS + (TaskType("nunca", 40, (), "d", never, ASYNC),))


def ask_stats(proto: Any, transport: Any) -> Dict[str, Any]:
    proto.dataReceived(b'{"op": "stats", "tarea_id": "st"}\n')
    reply = [r for r in take_replies(transport) if r.get("tarea_id") == "st"]
    assert len(reply) == 1, reply
    return reply[0]


class StatsTests(SynchronousTestCase):
    """
    C{op: stats} on a local server.
    """

    def setUp(self) -> None:
        self.pending: List[Deferred[Any]] = []
        self.reactor = FakeReactor()
        self.reactor.advance(1000)
        self.factory = make_server(never_registry(self.pending), reactor=self.reactor,
                                   timeout=10, store=MemoryStore(self.reactor))
        self.service = TaskServerService(self.factory, self.factory.orchestrator.executor,
                                         self.reactor)
        self.proto, self.transport = connect_transport(self.factory)

    def send(self, *lines: bytes) -> List[Dict[str, Any]]:
        self.proto.dataReceived(b"".join(line + b"\n" for line in lines))
        return take_replies(self.transport)

    def test_known_sequence(self) -> None:
        """
        Three inline tasks, a two-second sleep, a task that times out, a
        sleep refused as too long and a line that is not JSON appear as
        such: tasks by type and state, error lines by code, the latency of
        the two timed tasks, connections, uptime and the executor's threads.
        """
        self.send(b'{"tipo": "uppercase", "contenido": "a"}',
                  b'{"tipo": "uppercase", "contenido": "b"}',
                  b'{"tipo": "reverse", "contenido": "c"}',
                  b'{"tipo": "sleep", "contenido": 2, "tarea_id": "s"}',
                  b'{"tipo": "nunca", "contenido": "x", "tarea_id": "n"}',
                  b'{"tipo": "sleep", "contenido": 50}',
                  b'no json')
        self.reactor.advance(2)
        self.reactor.advance(8)
        summary = ask_stats(self.proto, self.transport)
        self.assertEqual(summary["estado"], "ok")
        stats = summary["resultado"]
        self.assertEqual(stats["tareas"], {
            "uppercase": {"ok": 2}, "reverse": {"ok": 1}, "sleep": {"ok": 1},
            "nunca": {"timeout": 1},
        })
        self.assertEqual(stats["total"], 5)
        self.assertEqual(stats["errores"],
                         {"excede_timeout": 1, "json_invalido": 1, "timeout": 1})
        self.assertEqual(stats["en_curso"], 0)
        self.assertEqual(stats["conexiones"], 1)
        self.assertEqual(stats["latencia"], {
            "ventana": 60.0, "tareas": 2, "p50": 2.0, "p90": 10.0, "p99": 10.0, "max": 10.0})
        self.assertEqual(stats["segundos_activo"], 10.0)
        self.assertEqual(stats["ejecutor"], {"hilos": 1, "ocupados": 0, "abandonadas": 0})
        self.assertEqual(stats["store"], {"pendientes": 0, "descartadas": 0})
        self.assertFalse(stats["apagando"])
        self.assertNotIn("broker", stats)

    def test_store_dropped_updates(self) -> None:
        """
        The store's given-up updates show in the summary, for an operator to
        see that records are missing.
        """
        self.factory.orchestrator.store.dropped = 7  # type: ignore[union-attr]
        stats = ask_stats(self.proto, self.transport)["resultado"]
        self.assertEqual(stats["store"], {"pendientes": 0, "descartadas": 7})

    def test_in_flight_and_window(self) -> None:
        """
        A task still running counts as in flight; once the latency window
        has passed, the tasks that ended before it are no longer in the
        percentiles (but still in the totals).
        """
        self.send(b'{"tipo": "sleep", "contenido": 1}',
                  b'{"tipo": "nunca", "contenido": 1, "tarea_id": "n"}')
        self.reactor.advance(1)
        stats = ask_stats(self.proto, self.transport)["resultado"]
        self.assertEqual((stats["en_curso"], stats["latencia"]["tareas"]), (1, 1))
        self.pending[0].callback(("hecho", 0))
        self.reactor.advance(61)
        stats = ask_stats(self.proto, self.transport)["resultado"]
        self.assertEqual(stats["en_curso"], 0)
        self.assertEqual(stats["latencia"]["tareas"], 0)
        self.assertIsNone(stats["latencia"]["p50"])
        self.assertEqual(stats["tareas"], {"sleep": {"ok": 1}, "nunca": {"ok": 1}})

    def test_draining(self) -> None:
        """
        Once the server drains, the summary says so, and the refused task
        is counted under its code.
        """
        self.factory.orchestrator.drain()
        self.send(b'{"tipo": "uppercase", "contenido": "a"}')
        stats = ask_stats(self.proto, self.transport)["resultado"]
        self.assertTrue(stats["apagando"])
        self.assertEqual(stats["errores"], {"apagando": 1})
        self.assertEqual(stats["total"], 0)

    def test_connection_refusal_is_counted(self) -> None:
        """
        A connection refused by the gate (too many connections) counts
        under its code too.
        """
        self.factory.gate.max_connections = 1
        _, other = connect_transport(self.factory)
        take_replies(other)
        stats = ask_stats(self.proto, self.transport)["resultado"]
        self.assertEqual(stats["errores"], {"demasiadas_conexiones": 1})
        self.assertTrue(other.disconnecting)


class StatsAuthenticationTests(SynchronousTestCase):
    """
    With authentication on, C{op: stats} needs an identity like any task.
    """

    def setUp(self) -> None:
        self.factory = make_server(authenticator=JWTAuthenticator.from_secret(SECRET))
        self.proto, self.transport = connect_transport(self.factory)

    def test_needs_identity(self) -> None:
        """
        Without a token, stats is refused with token_faltante (ping stays
        open); after op auth it is answered.
        """
        self.proto.dataReceived(b'{"op": "ping"}\n{"op": "stats", "tarea_id": "st"}\n')
        ping, refused = take_replies(self.transport)
        self.assertEqual(ping["resultado"], "pong")
        self.assertEqual((refused["estado"], refused["codigo"]), ("error", "token_faltante"))
        token = jwt.encode({"sub": "ops", "exp": int(time.time()) + 60}, SECRET,
                           algorithm="HS256")
        self.proto.dataReceived(b'{"op": "auth", "token": "%s"}\n' % token.encode())
        take_replies(self.transport)
        stats = ask_stats(self.proto, self.transport)
        self.assertEqual(stats["estado"], "ok")
        self.assertEqual(stats["resultado"]["errores"], {"token_faltante": 1})


class BrokerStatsTests(SynchronousTestCase):
    """
    In distributed mode the summary includes the broker's task queue.
    """

    def setUp(self) -> None:
        self.cluster = Cluster(TaskRegistry(BUILTINS))
        executor = self.cluster.executor
        # What AMQPExecutor.from_url sets up with the reactor as its clock.
        executor.oldest = OldestPublished(self.cluster.clock, executor._pending)
        probe = BrokerProbe(self.cluster.view, self.cluster.topology.tasks, self.cluster.clock,
                            executor.oldest)
        self.stats = ServerStats(self.cluster.factory, probe)
        self.cluster.orchestrator.summary = self.stats

    def test_queue_depth_and_age(self) -> None:
        """
        Tasks published while no worker consumes wait in the queue: the
        summary shows their number and the age of the oldest; once a
        worker has run them the queue is empty and the age 0.
        """
        proto, transport = self.cluster.client()
        proto.dataReceived(b'{"tipo": "uppercase", "contenido": "a"}\n')
        self.cluster.clock.advance(3)
        proto.dataReceived(b'{"tipo": "uppercase", "contenido": "b"}\n')
        self.cluster.clock.advance(1)
        stats = ask_stats(proto, transport)["resultado"]
        self.assertEqual(stats["broker"], {
            "conectado": True, "cola": 2, "consumidores": 0, "antiguedad": 4.0})
        self.cluster.worker("w1")
        self.cluster.clock.advance(1)  # the probe's last answer is a second old
        stats = ask_stats(proto, transport)["resultado"]
        self.assertEqual(stats["broker"], {
            "conectado": True, "cola": 0, "consumidores": 1, "antiguedad": 0.0})
        self.assertEqual(stats["tareas"], {"uppercase": {"ok": 2}})

    def test_broker_down(self) -> None:
        """
        Without a broker connection the summary says so, with no depth,
        and the server is not healthy.
        """
        self.cluster.view.lose()
        proto, transport = self.cluster.client()
        stats = ask_stats(proto, transport)["resultado"]
        self.assertEqual(stats["broker"], {
            "conectado": False, "cola": None, "consumidores": None, "antiguedad": None})
        self.assertEqual(self.stats.healthy(), (False, "broker down"))


class TallyTests(SynchronousTestCase):
    """
    The histogram and percentiles computed from the plain counters.
    """

    def test_histogram(self) -> None:
        """
        Inline tasks are in the first bucket; timed ones in theirs;
        buckets are cumulative and end with +Inf equal to the count.
        """
        t = Tally()
        t.ok["uppercase"] += 3
        t.ended("sleep", "ok", 0.3, 1.0)
        t.ended("sleep", "timeout", 100.0, 2.0)
        buckets, count, total = t.histogram()
        self.assertEqual(len(buckets), len(BUCKETS) + 1)
        as_dict = dict(buckets)
        self.assertEqual(as_dict["0.0005"], 3)
        self.assertEqual(as_dict["0.25"], 3)
        self.assertEqual(as_dict["0.5"], 4)
        self.assertEqual(as_dict["60.0"], 4)
        self.assertEqual(as_dict["+Inf"], 5)
        self.assertEqual((count, total), (5, 100.3))

    def test_percentiles_nearest_rank(self) -> None:
        """
        Percentiles are nearest-rank over the durations in the window.
        """
        t = Tally()
        for i in range(1, 101):
            t.ended("sleep", "ok", float(i), 10.0)
        p = t.percentiles(now=20.0, window=60.0)
        self.assertEqual((p["tareas"], p["p50"], p["p90"], p["p99"], p["max"]),
                         (100, 50.0, 90.0, 99.0, 100.0))


class OldestPublishedTests(SynchronousTestCase):
    """
    The publish times an orchestrator keeps for the queue-age metric.
    """

    def test_oldest_and_bounded(self) -> None:
        """
        The age is that of the oldest task still waited for; answered tasks
        are forgotten, and the times kept stay proportional to the tasks
        waited for even when the oldest never ends.
        """
        clock = FakeReactor()
        pending: Dict[str, Any] = {}
        oldest = OldestPublished(clock, pending)
        self.assertIsNone(oldest())
        for i in range(3):
            pending[f"t{i}"] = None
            oldest.published(f"t{i}")
            clock.advance(1)
        self.assertEqual(oldest(), 3.0)
        del pending["t0"]
        self.assertEqual(oldest(), 2.0)
        for i in range(3, 5000):
            pending[f"t{i}"] = None
            oldest.published(f"t{i}")
            del pending[f"t{i}"]
        self.assertLessEqual(len(oldest.queue), 2 * len(pending) + 1025)
        self.assertEqual(oldest(), 2.0)
