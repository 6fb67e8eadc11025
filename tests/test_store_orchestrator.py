"""
The orchestrator's use of the results store, with the memory store and a
fake clock: every task recorded, C{op: estado}, background submission
(C{"esperar": false}), idempotent resubmission and attach, retention, owner
isolation, and the shutdown that waits for background tasks and flushes.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pfo3 import wire
from pfo3.auth import Identity
from pfo3.errors import StoreUnavailable
from pfo3.protocol import TaskFactory, TaskProtocol
from pfo3.service import TaskServerService
from pfo3.store import ANONYMOUS, MemoryStore, Record
from pfo3.tasks import TaskRegistry, TaskType, default_registry
from pfo3.testing import FakeReactor, make_server


def connect(factory: TaskFactory) -> Tuple[TaskProtocol, StringTransport]:
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def send(proto: TaskProtocol, **request: Any) -> None:
    proto.dataReceived(json.dumps(request).encode() + b"\n")


def replies(transport: StringTransport) -> List[Dict[str, Any]]:
    data = transport.value()
    transport.clear()
    return [json.loads(line) for line in data.splitlines()]


class StoreTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = FakeReactor()
        self.store = MemoryStore(self.clock, max_age=3600, max_records=1000)
        self.store.start()
        self.addCleanup(self.store.stop)
        self.factory = make_server(reactor=self.clock, store=self.store, timeout=30)
        self.orch = self.factory.orchestrator

    def stored(self, tarea_id: str, owner: str = ANONYMOUS) -> Optional[Record]:
        result: Optional[Record] = self.successResultOf(self.store.get(owner, tarea_id))
        return result


class RecordingTests(StoreTestCase):
    """
    Every task accepted is recorded, from acceptance to its end.
    """

    def test_inline_task_recorded_finished(self) -> None:
        """
        An inline task is recorded once, finished: tipo, contenido, estado
        ok, resultado, worker, the peer and its three times.
        """
        self.clock.advance(100)
        proto, transport = connect(self.factory)
        send(proto, tarea_id="a", tipo="1", contenido="hola")
        self.assertEqual(replies(transport)[0]["resultado"], "HOLA")
        rec = self.stored("a")
        assert rec is not None
        self.assertEqual(
            (rec.tipo, rec.contenido, rec.estado, rec.resultado, rec.worker),
            ("uppercase", "hola", "ok", "HOLA", 0))
        self.assertEqual((rec.aceptada, rec.iniciada, rec.terminada), (100, 100, 100))
        self.assertEqual(rec.peer, "192.168.1.1:54321")

    def test_running_then_ok(self) -> None:
        """
        A sleep is recorded C{en_curso} when it starts and C{ok} with its
        end time when it ends.
        """
        proto, transport = connect(self.factory)
        send(proto, tarea_id="s", tipo="sleep", contenido=2)
        rec = self.stored("s")
        assert rec is not None
        self.assertEqual((rec.estado, rec.terminada), ("en_curso", None))
        self.clock.advance(2)
        rec = self.stored("s")
        assert rec is not None
        self.assertEqual((rec.estado, rec.resultado, rec.terminada),
                         ("ok", "Esperé 2 segundos", 2))

    def test_timeout_recorded(self) -> None:
        """
        A task cancelled by the timeout is recorded C{timeout} with the
        error's code and message.
        """
        factory = make_server(reactor=self.clock, store=self.store, timeout=1,
                              registry=_slow_registry())
        proto, transport = connect(factory)
        send(proto, tarea_id="t", tipo="lento", contenido="x")
        self.clock.advance(1)
        self.assertEqual(replies(transport)[0]["codigo"], "timeout")
        rec = self.stored("t")
        assert rec is not None
        self.assertEqual((rec.estado, rec.codigo), ("timeout", "timeout"))

    def test_error_recorded(self) -> None:
        """
        A task that fails is recorded C{error} with its code.
        """
        registry = TaskRegistry([TaskType("falla", 9, (), "", _boom, "inline")])
        factory = make_server(reactor=self.clock, store=self.store, registry=registry)
        proto, transport = connect(factory)
        send(proto, tarea_id="f", tipo="falla", contenido="x")
        self.assertEqual(replies(transport)[0]["codigo"], "error_interno")
        rec = self.stored("f")
        assert rec is not None
        self.assertEqual((rec.estado, rec.codigo), ("error", "error_interno"))
        self.flushLoggedErrors(ZeroDivisionError)

    def test_client_gone_recorded_abandoned(self) -> None:
        """
        A plain task whose client disconnects is cancelled and recorded
        C{abandonada}.
        """
        proto, transport = connect(self.factory)
        send(proto, tarea_id="s", tipo="sleep", contenido=5)
        proto.connectionLost()
        rec = self.stored("s")
        assert rec is not None
        self.assertEqual(rec.estado, "abandonada")

    def test_refusals_not_recorded(self) -> None:
        """
        A request refused before it runs (invalid, too long) leaves no
        record.
        """
        proto, transport = connect(self.factory)
        send(proto, tarea_id="x", tipo="sleep", contenido=99)
        send(proto, tarea_id="y", tipo="1", contenido=5)
        self.assertEqual([r["codigo"] for r in replies(transport)],
                         ["excede_timeout", "contenido_invalido"])
        self.assertIsNone(self.stored("x"))
        self.assertIsNone(self.stored("y"))

    def test_no_store(self) -> None:
        """
        Without a store (C{--store none}) tasks run as before and
        C{op: estado} knows of no finished task.
        """
        factory = make_server(reactor=self.clock)
        proto, transport = connect(factory)
        send(proto, tarea_id="a", tipo="1", contenido="hola")
        send(proto, op="estado", tarea_id="a")
        self.assertEqual([r["estado"] for r in replies(transport)], ["ok", "error"])


class EstadoTests(StoreTestCase):
    """
    C{op: estado} answers the recorded state of a task, from any connection.
    """

    def test_finished_from_another_connection(self) -> None:
        """
        A task finished on one connection is reported on another with its
        result, worker and times.
        """
        a, ta = connect(self.factory)
        send(a, tarea_id="a", tipo="reverse", contenido="hola")
        a.connectionLost()
        b, tb = connect(self.factory)
        send(b, op="estado", tarea_id="a")
        reply = replies(tb)[0]
        self.assertEqual(reply["estado"], "ok")
        self.assertEqual(reply["tarea_id"], "a")
        self.assertEqual(
            reply["resultado"],
            {"estado": "ok", "tipo": "reverse", "resultado": "aloh", "worker": 0,
             "aceptada": 0, "iniciada": 0, "terminada": 0})

    def test_running(self) -> None:
        """
        A task still running is reported C{en_curso}.
        """
        a, ta = connect(self.factory)
        send(a, tarea_id="s", tipo="sleep", contenido=3)
        send(a, op="estado", tarea_id="s")
        self.assertEqual(replies(ta)[0]["resultado"]["estado"], "en_curso")

    def test_unknown(self) -> None:
        """
        An id never submitted is answered with C{tarea_desconocida}.
        """
        a, ta = connect(self.factory)
        send(a, op="estado", tarea_id="nada")
        self.assertEqual(
            replies(ta), [{"estado": "error", "codigo": "tarea_desconocida",
                           "mensaje": "No hay registro de la tarea 'nada'.",
                           "tarea_id": "nada"}])

    def test_needs_tarea_id(self) -> None:
        """
        C{op: estado} without C{tarea_id} is C{tarea_id_invalido}.
        """
        a, ta = connect(self.factory)
        send(a, op="estado")
        self.assertEqual(replies(ta)[0]["codigo"], "tarea_id_invalido")

    def test_half_close_waits_for_a_slow_lookup(self) -> None:
        """
        A client that ends its input right after C{op: estado} gets the
        answer of a store that takes its time, then the connection closes.
        """
        slow: Deferred[Optional[Record]] = Deferred()
        self.orch.store = _Slow(slow)  # type: ignore[assignment]
        a, ta = connect(self.factory)
        send(a, op="estado", tarea_id="x")
        a.readConnectionLost()
        self.assertFalse(ta.disconnecting)
        slow.callback(None)
        self.assertEqual(replies(ta)[0]["codigo"], "tarea_desconocida")
        self.assertTrue(ta.disconnecting)

    def test_store_unavailable(self) -> None:
        """
        A store that cannot answer makes C{op: estado} fail with
        C{almacen_no_disponible}.
        """
        self.orch.store = _Unavailable()  # type: ignore[assignment]
        a, ta = connect(self.factory)
        send(a, op="estado", tarea_id="x")
        self.assertEqual(replies(ta)[0]["codigo"], "almacen_no_disponible")


class BackgroundTests(StoreTestCase):
    """
    C{"esperar": false}: answered C{aceptada} at once; the task runs even if
    the client leaves, and still obeys the timeout.
    """

    def test_accepted_then_estado(self) -> None:
        """
        The client gets C{aceptada}, disconnects; the task finishes; another
        connection reads its result.
        """
        a, ta = connect(self.factory)
        send(a, tarea_id="bg", tipo="sleep", contenido=2, esperar=False)
        self.assertEqual(replies(ta), [{"estado": "aceptada", "tarea_id": "bg"}])
        a.connectionLost()
        b, tb = connect(self.factory)
        send(b, op="estado", tarea_id="bg")
        self.assertEqual(replies(tb)[0]["resultado"]["estado"], "en_curso")
        self.clock.advance(2)
        send(b, op="estado", tarea_id="bg")
        result = replies(tb)[0]["resultado"]
        self.assertEqual((result["estado"], result["resultado"]), ("ok", "Esperé 2 segundos"))

    def test_inline_background(self) -> None:
        """
        An inline task in the background is answered C{aceptada} too, and
        recorded finished.
        """
        a, ta = connect(self.factory)
        send(a, tarea_id="u", tipo="1", contenido="x", esperar=False)
        self.assertEqual(replies(ta), [{"estado": "aceptada", "tarea_id": "u"}])
        rec = self.stored("u")
        assert rec is not None
        self.assertEqual((rec.estado, rec.resultado), ("ok", "X"))

    def test_background_obeys_timeout(self) -> None:
        """
        A background task past the timeout is cancelled and recorded
        C{timeout}, client or not.
        """
        factory = make_server(reactor=self.clock, store=self.store, timeout=1,
                              registry=_slow_registry())
        a, ta = connect(factory)
        send(a, tarea_id="t", tipo="lento", contenido="x", esperar=False)
        a.connectionLost()
        self.clock.advance(1)
        rec = self.stored("t")
        assert rec is not None
        self.assertEqual(rec.estado, "timeout")
        self.assertEqual(factory.orchestrator.active, 0)

    def test_not_cancelled_by_disconnect(self) -> None:
        """
        A durable task waited for (C{"esperar": true}) keeps running after
        its client leaves, unlike a plain one.
        """
        a, ta = connect(self.factory)
        send(a, tarea_id="d", tipo="sleep", contenido=1, esperar=True)
        send(a, tarea_id="p", tipo="sleep", contenido=1)
        a.connectionLost()
        self.clock.advance(1)
        d, p = self.stored("d"), self.stored("p")
        assert d is not None and p is not None
        self.assertEqual((d.estado, p.estado), ("ok", "abandonada"))

    def test_invalid_esperar(self) -> None:
        """
        C{esperar} that is not a boolean is C{esperar_invalido}.
        """
        a, ta = connect(self.factory)
        send(a, tarea_id="x", tipo="1", contenido="x", esperar="no")
        self.assertEqual(replies(ta)[0]["codigo"], "esperar_invalido")

    def test_shutdown_waits_for_background_then_flushes(self) -> None:
        """
        Stopping the service waits for background tasks that no connection
        waits for, then stops the store, after the last record update.
        """
        stops: List[str] = []
        store = _Spy(self.store, stops)
        self.orch.store = store  # type: ignore[assignment]
        service = TaskServerService(self.factory, self.orch.executor, self.clock,
                                    shutdown_timeout=10)
        service.startService()
        a, ta = connect(self.factory)
        send(a, tarea_id="bg", tipo="sleep", contenido=3, esperar=False)
        a.connectionLost()
        d = service.stopService()
        self.assertNoResult(d)
        self.clock.advance(3)
        self.successResultOf(d)
        self.assertEqual(stops, ["record:en_curso", "record:ok", "stop"])
        rec = self.stored("bg")
        assert rec is not None
        self.assertEqual(rec.estado, "ok")

    def test_shutdown_deadline_abandons_background(self) -> None:
        """
        A background task still running at the shutdown deadline is
        cancelled and recorded C{abandonada} with C{apagando}.
        """
        service = TaskServerService(self.factory, self.orch.executor, self.clock,
                                    shutdown_timeout=1)
        service.startService()
        a, ta = connect(self.factory)
        send(a, tarea_id="bg", tipo="sleep", contenido=5, esperar=False)
        d = service.stopService()
        self.clock.advance(1)
        self.clock.advance(5)
        self.successResultOf(d)
        rec = self.stored("bg")
        assert rec is not None
        self.assertEqual((rec.estado, rec.codigo), ("abandonada", "apagando"))


class IdempotencyTests(StoreTestCase):
    """
    Resubmitting a durable task: a finished one gets the recorded reply
    without running again; a running one is attached to.
    """

    def test_finished_is_replayed(self) -> None:
        """
        The second submission of a finished task gets the first reply at
        once (the sleep does not run again).
        """
        a, ta = connect(self.factory)
        send(a, tarea_id="s", tipo="sleep", contenido=2, esperar=True)
        self.clock.advance(2)
        first = replies(ta)
        b, tb = connect(self.factory)
        send(b, tarea_id="s", tipo="sleep", contenido=2, esperar=True)
        self.assertEqual(replies(tb), first)
        self.assertEqual(self.orch.active, 0)

    def test_recorded_error_is_replayed(self) -> None:
        """
        A task that timed out is answered C{timeout} again, not rerun.
        """
        factory = make_server(reactor=self.clock, store=self.store, timeout=1,
                              registry=_slow_registry())
        a, ta = connect(factory)
        send(a, tarea_id="t", tipo="lento", contenido="x", esperar=True)
        self.clock.advance(1)
        first = replies(ta)
        self.assertEqual(first[0]["codigo"], "timeout")
        send(a, tarea_id="t", tipo="lento", contenido="x", esperar=True)
        self.assertEqual(replies(ta), first)
        self.assertEqual(factory.orchestrator.active, 0)

    def test_running_is_attached(self) -> None:
        """
        Two clients submit the same durable task: it runs once and both get
        its reply; a third asking not to wait gets C{aceptada}.
        """
        a, ta = connect(self.factory)
        b, tb = connect(self.factory)
        c, tc = connect(self.factory)
        send(a, tarea_id="s", tipo="sleep", contenido=2, esperar=True)
        self.clock.advance(1)
        send(b, tarea_id="s", tipo="sleep", contenido=2, esperar=True)
        send(c, tarea_id="s", tipo="sleep", contenido=2, esperar=False)
        self.assertEqual(replies(tc), [{"estado": "aceptada", "tarea_id": "s"}])
        self.assertEqual(self.orch.active, 1)
        self.clock.advance(1)
        self.assertEqual(replies(ta), replies(tb))
        self.assertEqual(self.orch.completed, 1)

    def test_attach_after_submitter_left(self) -> None:
        """
        A client that reconnects and resubmits gets the reply of the run its
        first connection started.
        """
        a, ta = connect(self.factory)
        send(a, tarea_id="s", tipo="sleep", contenido=2, esperar=False)
        a.connectionLost()
        b, tb = connect(self.factory)
        send(b, tarea_id="s", tipo="sleep", contenido=2, esperar=True)
        self.clock.advance(2)
        self.assertEqual(replies(tb)[0]["resultado"], "Esperé 2 segundos")
        self.assertEqual(self.orch.completed, 1)

    def test_different_content_is_refused(self) -> None:
        """
        Reusing a durable task's id with another contenido is
        C{tarea_id_en_uso}, running or finished.
        """
        a, ta = connect(self.factory)
        send(a, tarea_id="s", tipo="sleep", contenido=2, esperar=True)
        b, tb = connect(self.factory)
        send(b, tarea_id="s", tipo="sleep", contenido=1, esperar=True)
        self.assertEqual(replies(tb)[0]["codigo"], "tarea_id_en_uso")
        self.clock.advance(2)
        send(b, tarea_id="s", tipo="reverse", contenido="x", esperar=True)
        self.assertEqual(replies(tb)[0]["codigo"], "tarea_id_en_uso")

    def test_plain_tasks_never_replayed(self) -> None:
        """
        Plain tasks (no C{esperar}) keep the seed's behaviour: the same id
        runs again, on any connection, and is recorded again.
        """
        a, ta = connect(self.factory)
        send(a, tarea_id="1", tipo="1", contenido="a")
        send(a, tarea_id="1", tipo="1", contenido="b")
        self.assertEqual([r["resultado"] for r in replies(ta)], ["A", "B"])
        rec = self.stored("1")
        assert rec is not None
        self.assertEqual(rec.resultado, "B")

    def test_abandoned_runs_again(self) -> None:
        """
        A durable task recorded C{abandonada} (a shutdown) runs again when
        resubmitted.
        """
        self.store.record(Record(ANONYMOUS, "s", "sleep", 1.0, "abandonada", "-", 0,
                                 huella=_huella("sleep", 1), codigo="apagando",
                                 mensaje="x", terminada=0))
        a, ta = connect(self.factory)
        send(a, tarea_id="s", tipo="sleep", contenido=1, esperar=True)
        self.clock.advance(1)
        self.assertEqual(replies(ta)[0]["resultado"], "Esperé 1 segundo")

    def test_duplicate_on_one_connection(self) -> None:
        """
        The same durable id twice on one connection while it runs is
        C{tarea_id_duplicado}, as for plain tasks.
        """
        a, ta = connect(self.factory)
        send(a, tarea_id="s", tipo="sleep", contenido=1, esperar=True)
        send(a, tarea_id="s", tipo="sleep", contenido=1, esperar=True)
        self.assertEqual(replies(ta)[0]["codigo"], "tarea_id_duplicado")

    def test_half_close_waits_for_durable_reply(self) -> None:
        """
        A client that ends its input still gets its durable task's reply
        before the connection closes.
        """
        a, ta = connect(self.factory)
        send(a, tarea_id="s", tipo="sleep", contenido=1, esperar=True)
        a.readConnectionLost()
        self.assertFalse(ta.disconnecting)
        self.clock.advance(1)
        self.assertEqual(replies(ta)[0]["estado"], "ok")
        self.assertTrue(ta.disconnecting)

    def test_lookup_failure_runs_the_task(self) -> None:
        """
        When the store cannot say whether the task ran already, it runs.
        """
        self.orch.store = _Unavailable()  # type: ignore[assignment]
        a, ta = connect(self.factory)
        send(a, tarea_id="u", tipo="1", contenido="x", esperar=True)
        self.assertEqual(replies(ta)[0]["resultado"], "X")


class OwnerTests(StoreTestCase):
    """
    A task belongs to its owner: another owner can neither read it nor
    attach to it, even with the same C{tarea_id}.
    """

    def owned(self, owner: str) -> Tuple[TaskProtocol, StringTransport]:
        proto, transport = connect(self.factory)
        proto.session.set_identity(Identity(owner))
        return proto, transport

    def test_estado_of_another_owner(self) -> None:
        """
        C{op: estado} from another identity does not see the task.
        """
        a, ta = self.owned("ana")
        send(a, tarea_id="x", tipo="1", contenido="hola")
        b, tb = self.owned("beto")
        send(b, op="estado", tarea_id="x")
        self.assertEqual(replies(tb)[0]["codigo"], "tarea_desconocida")
        send(a, op="estado", tarea_id="x")
        self.assertEqual(replies(ta)[1]["resultado"]["resultado"], "HOLA")

    def test_no_attach_across_owners(self) -> None:
        """
        The same durable id from two identities is two tasks, run twice,
        each recorded under its owner.
        """
        a, ta = self.owned("ana")
        b, tb = self.owned("beto")
        send(a, tarea_id="s", tipo="sleep", contenido=1, esperar=True)
        send(b, tarea_id="s", tipo="sleep", contenido=1, esperar=True)
        self.assertEqual(self.orch.active, 2)
        send(b, op="estado", tarea_id="s")
        self.clock.advance(1)
        self.assertIsNotNone(self.stored("s", "ana"))
        self.assertIsNotNone(self.stored("s", "beto"))
        self.assertIsNone(self.stored("s"))

    def test_no_replay_across_owners(self) -> None:
        """
        A finished durable task of one identity is not replayed to another
        with different content: that one runs its own.
        """
        a, ta = self.owned("ana")
        send(a, tarea_id="s", tipo="1", contenido="x", esperar=True)
        b, tb = self.owned("beto")
        send(b, tarea_id="s", tipo="1", contenido="y", esperar=True)
        self.assertEqual(replies(tb)[0]["resultado"], "Y")


class RetentionTests(SynchronousTestCase):
    """
    The memory store forgets finished tasks after C{max_age} (a periodic
    purge on the clock) and keeps at most C{max_records}.
    """

    def test_purged_after_max_age(self) -> None:
        """
        A record older than the retention is gone after the next purge;
        a recent one stays.
        """
        clock = FakeReactor()
        store = MemoryStore(clock, max_age=100, max_records=10)
        store.start()
        factory = make_server(reactor=clock, store=store)
        a, ta = connect(factory)
        send(a, tarea_id="old", tipo="1", contenido="x")
        clock.advance(95)
        send(a, tarea_id="new", tipo="1", contenido="y")
        clock.advance(15)  # purges every 10 s
        send(a, op="estado", tarea_id="old")
        send(a, op="estado", tarea_id="new")
        self.assertEqual([r["estado"] for r in replies(ta)[2:]], ["error", "ok"])
        store.stop()

    def test_bounded_count(self) -> None:
        """
        Past C{max_records} the oldest record goes.
        """
        clock = FakeReactor()
        store = MemoryStore(clock, max_records=3)
        factory = make_server(reactor=clock, store=store)
        a, ta = connect(factory)
        for i in range(5):
            send(a, tarea_id=f"t{i}", tipo="1", contenido="x")
        self.assertEqual(len(store), 3)
        self.assertEqual(store.evicted, 2)
        self.assertIsNone(self.successResultOf(store.get(ANONYMOUS, "t1")))
        self.assertIsNotNone(self.successResultOf(store.get(ANONYMOUS, "t4")))

    def test_running_tasks_not_purged_early(self) -> None:
        """
        The purge measures a finished record's age from its end.
        """
        clock = FakeReactor()
        store = MemoryStore(clock, max_age=10)
        rec = Record(ANONYMOUS, "x", "sleep", 1, "ok", "-", 0, terminada=8)
        store.record(rec)
        self.assertEqual(self.successResultOf(store.purge(5)), 0)
        self.assertEqual(self.successResultOf(store.purge(9)), 1)


def _boom(arg: Any) -> Any:
    return 1 / 0


def _slow_registry() -> TaskRegistry:
    registry = default_registry(entry_points=False)
    registry.register(TaskType("lento", 50, (), "Never ends.", _never, "async"))
    return registry


def _never(clock: Any, arg: Any) -> Deferred[Any]:
    return Deferred()


def _huella(tipo: str, arg: Any) -> str:
    from pfo3.orchestrator import fingerprint

    tasktype = default_registry(entry_points=False).lookup(tipo)
    return fingerprint(wire.TaskRequest("-", tasktype, tasktype.validate(arg)))


class _Unavailable:
    def record(self, record: Record) -> None:
        pass

    def record_done(self, *fields: Any) -> None:
        pass

    def get(self, owner: str, tarea_id: str) -> Deferred[Optional[Record]]:
        d: Deferred[Optional[Record]] = Deferred()
        d.errback(StoreUnavailable("El almacén no responde.", tarea_id))
        return d


class _Slow:
    def __init__(self, d: Deferred[Optional[Record]]) -> None:
        self.d = d

    def get(self, owner: str, tarea_id: str) -> Deferred[Optional[Record]]:
        return self.d


class _Spy:
    def __init__(self, store: MemoryStore, calls: List[str]) -> None:
        self._store = store
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def record(self, record: Record) -> None:
        self._calls.append(f"record:{record.estado}")
        self._store.record(record)

    def stop(self) -> Deferred[None]:
        self._calls.append("stop")
        return succeed(None)

    def start(self) -> Deferred[None]:
        return succeed(None)

