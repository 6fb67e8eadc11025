"""
Unit tests of the distributed mode's logic over the in-memory broker of
L{pfo3.testing}, with a fake clock: the orchestrator's executor, the
worker, and the messages between them.  (The same behaviours against the
real RabbitMQ: C{tests/test_distributed.py}.)
"""

from __future__ import annotations

import json
from typing import Any, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pfo3.amqp import messages
from pfo3.amqp.batches import Batcher, ChannelGone, SharedAck
from pfo3.amqp.connection import AckBatch, Delivery, OrderedAcks, Refused
from pfo3.amqp.executor import ORPHAN_RETRY, AMQPExecutor
from pfo3.amqp.topology import DEATH_REASON, Topology
from pfo3.amqp.worker import WorkerService
from pfo3.auth import Identity
from pfo3.errors import (
    BrokerUnavailable,
    Busy,
    DeliveryLimit,
    StoreUnavailable,
    TaskFailed,
    UnknownType,
)
from pfo3.executor import IExecutor, LocalExecutor
from pfo3.orchestrator import Orchestrator
from pfo3.protocol import TaskFactory
from pfo3.store import OK, RUNNING, IStore, MemoryStore, Record
from pfo3.tasks import ASYNC, BUILTINS, TaskRegistry, TaskType
from pfo3.testing import FakeReactor, MemoryBroker, SynchronousThreadPool


class MessageTests(SynchronousTestCase):
    """
    Messages are versioned JSON, and decode back to what was sent.
    """

    def test_round_trips(self) -> None:
        """
        A task message and both kinds of reply decode to what was encoded;
        an error reply becomes the typed error of its code.
        """
        self.assertEqual(messages.decode_task(messages.encode_task("sleep", 1.5)),
                         ("sleep", 1.5, "", None))
        self.assertEqual(messages.decode_task(messages.encode_task("sleep", 1, "alice")),
                         ("sleep", 1, "alice", None))
        self.assertEqual(messages.decode_task(messages.encode_task("sleep", 1, "", "t1")),
                         ("sleep", 1, "", "t1"))
        self.assertEqual(messages.decode_reply(messages.encode_result("HOLA", "w1/0")),
                         ("HOLA", "w1/0"))
        error = messages.decode_reply(messages.encode_failure(TaskFailed("no")))
        self.assertIsInstance(error, TaskFailed)
        self.assertEqual(error.mensaje, "no")  # type: ignore[union-attr]

    def test_templates_write_what_json_writes(self) -> None:
        """
        Task and result messages written through templates are byte for
        byte what the JSON encoder writes for the same dict, for strings
        that need escaping, lone surrogates and values of other types.
        """
        dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False,
                                 separators=(",", ":")).encode
        for value in ("hola", 'ñ"\\\n\u2028\ud800', "", 3, 2.5, None, [1, "a"], {"a": "b"}):
            for identity, tarea_id in (("", None), ('al"ice', None), ("", "t"), ("bo", 'ñ"1')):
                task = {"v": 1, "tipo": "upper", "contenido": value}
                reply = {"v": 1, "estado": "ok", "resultado": value, "worker": "w1/0"}
                if identity:
                    task["identidad"] = identity
                if tarea_id is not None:
                    task["tarea_id"] = tarea_id
                    reply.update(task)
                    del reply["tipo"], reply["contenido"]
                self.assertEqual(messages.encode_task("upper", value, identity, tarea_id),
                                 dumps(task).encode("utf-8", "backslashreplace"))
                self.assertEqual(
                    messages.encode_result(value, "w1/0", identity, tarea_id),
                    dumps(reply).encode("utf-8", "backslashreplace"))
        with self.assertRaises(ValueError):
            messages.encode_result(float("nan"), "w1/0")

    def test_replies_echo_the_record_key(self) -> None:
        """
        A reply to a recorded task names its record (identity and tarea_id)
        whatever its outcome; one to a task not recorded names none, and
        carries no identity.
        """
        for identity in ("", "alice"):
            self.assertEqual(
                messages.reply_key(messages.encode_result("A", "w", identity, "t")),
                (identity, "t"))
            self.assertEqual(messages.reply_key(
                messages.encode_failure(TaskFailed("no"), identity, "t")), (identity, "t"))
            self.assertIsNone(messages.reply_key(messages.encode_result("A", "w", identity)))
            self.assertNotIn(b"alice", messages.encode_failure(TaskFailed("no"), identity))
        self.assertIsNone(messages.reply_key(b"\x80"))
        self.assertIsNone(messages.reply_key(b'{"v":1,"estado":"ok","tarea_id":3}'))

    def test_bodies_json_reads(self) -> None:
        """
        A body around which JSON allows blanks, or in UTF-16, decodes as
        with L{json.loads}, though the fast path reads only UTF-8 bodies
        that are one JSON value and nothing else.
        """
        body = b'{"v":1,"estado":"ok","resultado":"A","worker":"w"}'
        for variant in (body, b" " + body + b"\n", body.decode().encode("utf-16")):
            self.assertEqual(messages.decode_reply(variant), ("A", "w"))
        with self.assertRaises(messages.BadMessage):
            messages.decode_reply(body + b" x")

    def test_bad_bodies(self) -> None:
        """
        Bodies that are not JSON objects of this version are refused.
        """
        for body in (b"\x80", b"[]", b'{"tipo": "x", "contenido": 1}',
                     b'{"v": 1, "contenido": 1}', b'{"v": 1, "estado": "raro"}',
                     b'{"v": 1, "tipo": "x", "contenido": 1, "tarea_id": 2}'):
            with self.assertRaises(messages.BadMessage):
                if b"estado" in body:
                    messages.decode_reply(body)
                else:
                    messages.decode_task(body)

    def test_batches(self) -> None:
        """
        A batch carries each message under its own correlation id, and each
        item, its id taken out, is the message it carries; a message that is
        no batch is one item under the message's correlation id.
        """
        tasks = [("c1", messages.encode_task("upper", "a")),
                 ("c2", messages.encode_task("sleep", 1, "ana", "t2"))]
        items, batch = messages.items_of(messages.encode_batch(tasks), "lote.c1")
        self.assertTrue(batch)
        self.assertEqual([(c, messages.task_of(item)) for c, item in items],
                         [("c1", ("upper", "a", "", None)), ("c2", ("sleep", 1, "ana", "t2"))])
        self.assertEqual([messages.encode_item(item) for _, item in items],  # type: ignore
                         [body for _, body in tasks])
        self.assertEqual(messages.items_of(tasks[0][1], "c1"),
                         ([("c1", {"v": 1, "tipo": "upper", "contenido": "a"})], False))

    def test_bad_batches(self) -> None:
        """
        What is wrong with a body, or with an item of a batch, is its item's
        L{messages.BadMessage}, under the id it can be answered by.
        """
        [(c, bad)], batch = messages.items_of(b"\x80", "c9")
        self.assertEqual((c, batch), ("c9", False))
        self.assertIsInstance(bad, messages.BadMessage)
        [(c, bad)], _ = messages.items_of(b'{"v":1,"lote":3}', "c9")
        self.assertEqual(c, "c9")
        self.assertIsInstance(bad, messages.BadMessage)
        items, batch = messages.items_of(
            b'{"v":1,"lote":[7,{"id":"a","v":2},{"id":"b","v":1,"tipo":"x","contenido":1}]}', "")
        self.assertTrue(batch)
        self.assertEqual([c for c, _ in items], ["", "a", "b"])
        self.assertIsInstance(items[0][1], messages.BadMessage)
        self.assertIsInstance(items[1][1], messages.BadMessage)
        self.assertRaises(messages.BadMessage, messages.task_of, items[1][1])
        self.assertEqual(messages.task_of(items[2][1]), ("x", 1, "", None))


TOPOLOGY = Topology("t", delivery_limit=1)


class Cluster:
    """
    One orchestrator and some workers on one in-memory broker.
    """

    def __init__(self, registry: TaskRegistry, timeout: float = 10.0,
                 topology: Topology = TOPOLOGY, store: Optional[IStore] = None) -> None:
        self.clock = FakeReactor()
        self.broker = MemoryBroker(topology)
        self.topology = topology
        self.registry = registry
        self.timeout = timeout
        self.store = store
        self.orchestrator_named("o1")

    def orchestrator_named(self, name: str) -> None:
        """
        Start an orchestrator called C{name} on this broker and store (again,
        after a crash: the one before it just stops consuming).
        """
        holder: List[AMQPExecutor] = []
        view = self.broker.view(lambda raw, ch: holder[0].setup(raw, ch))
        self.executor = AMQPExecutor(  # type: ignore[arg-type]
            view, self.topology, name, self.timeout, clock=self.clock, store=self.store)
        holder.append(self.executor)
        self.view = view
        self.orchestrator = Orchestrator(self.registry, self.executor, self.clock,
                                         timeout=self.timeout, store=self.store)
        self.factory = TaskFactory(self.orchestrator)
        self.executor.start()

    def worker(self, name: str, registry: Any = None, capacity: int = 8) -> WorkerService:
        holder: List[WorkerService] = []
        view = self.broker.view(lambda raw, ch: holder[0].setup(raw, ch), prefetch=capacity)
        worker = WorkerService(
            self.clock, "amqp://unused", self.topology, registry or self.registry,
            LocalExecutor(self.clock, SynchronousThreadPool()), name, capacity=capacity,
            timeout=20, broker=view)  # type: ignore[arg-type]
        holder.append(worker)
        worker.startService()
        return worker

    def client(self) -> Tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport


def replies(transport: StringTransport) -> List[Any]:
    data = transport.value()
    transport.clear()
    return [json.loads(x) for x in data.splitlines()]


class ExecutorTests(SynchronousTestCase):
    """
    The orchestrator's side: publish, confirm, match replies, give up.
    """

    def setUp(self) -> None:
        self.never: List[Deferred[Any]] = []
        registry = TaskRegistry(BUILTINS + (
            TaskType("nunca", 40, (), "d", self._never, ASYNC),))
        self.cluster = Cluster(registry)

    def _never(self, clock: Any, arg: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.never.append(d)
        return d

    def test_provides_the_interface(self) -> None:
        """
        AMQPExecutor provides IExecutor and runs nothing itself.
        """
        self.assertTrue(verifyObject(IExecutor, self.cluster.executor))
        self.assertEqual((self.cluster.executor.running, self.cluster.executor.abandoned), (0, 0))

    def test_round_trip_through_a_worker(self) -> None:
        """
        A client's tasks are answered by the worker, which 'worker' names
        with its thread; the task and its reply are acknowledged.
        """
        self.cluster.worker("w1")
        proto, transport = self.cluster.client()
        proto.dataReceived(b'{"tarea_id": "a", "tipo": 1, "contenido": "hola"}\n'
                           b'{"tarea_id": "s", "tipo": "sleep", "contenido": 2}\n')
        self.cluster.clock.advance(0)
        self.assertEqual(replies(transport), [
            {"estado": "ok", "resultado": "HOLA", "tarea_id": "a", "worker": "w1/0"}])
        self.cluster.clock.advance(2)
        self.assertEqual(replies(transport)[0]["resultado"], "Esperé 2 segundos")
        self.assertEqual(self.cluster.broker.unacked, {})
        self.assertEqual(self.cluster.orchestrator.active, 0)

    def test_identity_travels_to_the_worker(self) -> None:
        """
        The identity that sent a task reaches the worker's executor with it.
        """
        worker = self.cluster.worker("w1")
        seen: List[str] = []
        run = worker.executor.run

        def spy(tasktype: Any, arg: Any, identity: str = "") -> Any:
            seen.append(identity)
            return run(tasktype, arg, identity)

        worker.executor.run = spy  # type: ignore[method-assign]
        proto, transport = self.cluster.client()
        proto.session.set_identity(Identity("alice"))
        proto.dataReceived(b'{"tarea_id": "a", "tipo": 1, "contenido": "hola"}\n')
        self.cluster.clock.advance(0)
        self.assertEqual(replies(transport)[0]["resultado"], "HOLA")
        self.assertEqual(seen, ["alice"])

    def test_no_broker_is_refused_at_once(self) -> None:
        """
        While disconnected, a task is refused with broker_no_disponible.
        """
        self.cluster.view.lose()
        with self.assertRaises(BrokerUnavailable):
            self.cluster.executor.run(BUILTINS[0], "x")

    def test_full_queue_is_busy(self) -> None:
        """
        A publish the broker refuses (full task queue) fails with ocupado.
        """
        self.cluster.broker.max_length[self.cluster.topology.tasks] = 0
        d = self.cluster.executor.run(BUILTINS[0], "x")
        self.cluster.clock.advance(0)
        self.failureResultOf(d, Busy)  # type: ignore[arg-type]

    def test_unconfirmed_tasks_fail_when_the_connection_drops(self) -> None:
        """
        A task the broker had not confirmed when the connection dropped
        fails with broker_no_disponible; a confirmed one keeps waiting for
        its reply, which the worker gives after the reconnection.
        """
        self.cluster.broker.hold_confirms = True
        first = self.cluster.executor.run(BUILTINS[0], "a")
        self.cluster.clock.advance(0)
        self.cluster.broker.release_confirms()
        second = self.cluster.executor.run(BUILTINS[0], "b")
        self.cluster.clock.advance(0)
        self.cluster.view.lose()
        self.failureResultOf(second, BrokerUnavailable)  # type: ignore[arg-type]
        self.assertNoResult(first)  # type: ignore[arg-type]
        self.cluster.broker.hold_confirms = False
        self.cluster.view.connect()
        self.cluster.worker("w1")
        self.cluster.clock.advance(0)
        self.assertEqual(self.successResultOf(first), ("A", "w1/0"))  # type: ignore[arg-type]

    def test_correlation_ids_are_unique(self) -> None:
        """
        Correlation ids differ from one task to the next and between two
        executors (two orchestrators, or one restarted).
        """
        ids = set()
        for cluster in (Cluster(TaskRegistry(BUILTINS)), Cluster(TaskRegistry(BUILTINS))):
            for _ in range(100):
                cluster.executor.run(BUILTINS[0], "a")
                cluster.clock.advance(0)
            ids.update(m.correlation_id for m in cluster.broker.queues[TOPOLOGY.tasks])
        self.assertEqual(len(ids), 200)

    def test_duplicate_reply_is_dropped(self) -> None:
        """
        A second reply for a task already answered (a redelivered task) is
        dropped.
        """
        self.cluster.worker("w1")
        d = self.cluster.executor.run(BUILTINS[0], "a")
        self.cluster.clock.advance(0)
        self.assertEqual(self.successResultOf(d), ("A", "w1/0"))  # type: ignore[arg-type]
        channel = self.cluster.view.channel
        assert channel is not None
        channel.publish(self.cluster.executor.reply_queue,
                        messages.encode_result("OTRA", "w2/0"), "no-such-task")
        self.assertEqual(len(self.cluster.broker.queues[self.cluster.executor.reply_queue]), 0)

    def test_timeout_cancels_on_the_worker(self) -> None:
        """
        A task that times out is answered 'timeout'; the worker running it
        is told, cancels it and acknowledges it without a reply.
        """
        worker = self.cluster.worker("w1")
        proto, transport = self.cluster.client()
        proto.dataReceived(b'{"tarea_id": "n", "tipo": "nunca", "contenido": 1}\n')
        self.cluster.clock.advance(0)
        self.assertEqual(len(worker.held), 1)
        self.cluster.clock.advance(10)
        self.assertEqual(replies(transport)[0]["codigo"], "timeout")
        self.assertEqual(worker.held, {})
        self.assertTrue(self.never[0].called)  # cancelled
        self.assertEqual(self.cluster.broker.unacked, {})
        self.assertEqual(len(self.cluster.broker.queues[self.cluster.executor.reply_queue]), 0)

    def test_cancelled_before_delivery_is_not_run(self) -> None:
        """
        A task whose client left while it waited in the queue (its worker
        busy) is dropped by the worker when it receives it.
        """
        worker = self.cluster.worker("w1", capacity=1)
        busy = self.cluster.executor.run(BUILTINS[3], 1.0)
        self.cluster.clock.advance(0)
        proto, transport = self.cluster.client()
        proto.dataReceived(b'{"tarea_id": "n", "tipo": "nunca", "contenido": 1}\n')
        self.cluster.clock.advance(0)
        self.assertEqual(len(self.cluster.broker.queues[self.cluster.topology.tasks]), 1)
        proto.connectionLost()
        self.cluster.clock.advance(1)
        self.assertEqual(self.successResultOf(busy)[0], "Esperé 1 segundo")  # type: ignore
        self.assertEqual(len(self.cluster.broker.queues[self.cluster.topology.tasks]), 0)
        self.assertEqual((self.never, worker.completed, self.cluster.broker.unacked),
                         ([], 1, {}))


class OrphanReplyTests(SynchronousTestCase):
    """
    Replies nobody waits for: after a crash, the orchestrator started again
    under the same name records in the store the outcomes of the tasks its
    predecessor accepted, once each.
    """

    def setUp(self) -> None:
        self.clock = FakeReactor()
        self.store = MemoryStore(self.clock)
        self.cluster = Cluster(TaskRegistry(BUILTINS), store=self.store)
        self.clock = self.cluster.clock
        self.store.clock = self.clock

    def record(self, tarea_id: str, owner: str = "") -> Record:
        record = self.successResultOf(self.store.get(owner, tarea_id))
        assert record is not None
        return record

    def accept_then_crash(self, tarea_ids: List[str], seconds: float = 1.0) -> WorkerService:
        """
        Background sleep tasks accepted by orchestrator o1, running on a
        worker when o1 dies (its connection drops, nothing of it stops).
        """
        worker = self.cluster.worker("w1")
        proto, transport = self.cluster.client()
        for tarea_id in tarea_ids:
            proto.dataReceived(json.dumps({"tarea_id": tarea_id, "tipo": "sleep",
                                           "contenido": seconds, "esperar": False}).encode()
                               + b"\n")
            self.clock.advance(0)  # one message each
        self.assertEqual([r["estado"] for r in replies(transport)], ["aceptada"] * len(tarea_ids))
        self.assertEqual(len(worker.held), len(tarea_ids))
        self.cluster.view.lose()
        return worker

    def test_restarted_orchestrator_records_the_outcomes(self) -> None:
        """
        Tasks accepted by an orchestrator that crashed finish on the worker;
        their replies wait in its reply queue, and the orchestrator started
        again under its name records each one's result and worker in the
        store, then acknowledges the replies.
        """
        self.accept_then_crash(["a", "b", "c"])
        self.clock.advance(1)
        reply_queue = self.cluster.executor.reply_queue
        # Ended in one turn: one batch of three replies.
        [batch] = self.cluster.broker.queues[reply_queue]
        self.assertEqual(len(messages.items_of(batch.body, batch.correlation_id)[0]), 3)
        self.assertEqual(self.record("a").estado, RUNNING)
        self.cluster.orchestrator_named("o1")
        self.clock.advance(0)
        for tarea_id in "abc":
            record = self.record(tarea_id)
            self.assertEqual((record.estado, record.resultado, record.worker),
                             (OK, "Esperé 1 segundo", "w1/0"))
            self.assertIsNotNone(record.terminada)
        self.assertEqual(len(self.cluster.broker.queues[reply_queue]), 0)
        self.assertEqual(self.cluster.broker.unacked, {})

    def test_errors_are_recorded_with_their_code(self) -> None:
        """
        An orphan reply of a task that failed records its error code and
        message.
        """
        self.accept_then_crash(["t"])
        self.clock.advance(1)
        reply_queue = self.cluster.executor.reply_queue
        self.cluster.broker.queues[reply_queue].clear()  # the worker's reply: ok
        body = messages.encode_failure(TaskFailed("falló"), "", "t")
        self.cluster.orchestrator_named("o1")
        ch = self.cluster.view.channel
        assert ch is not None
        ch.publish(reply_queue, body, "old.1")
        self.clock.advance(0)
        record = self.record("t")
        self.assertEqual((record.estado, record.codigo, record.mensaje),
                         ("error", TaskFailed.codigo, "falló"))

    def test_a_late_duplicate_changes_nothing(self) -> None:
        """
        An orphan reply for a task whose record is finished already (a
        duplicate from a redelivered task, or a task given up on) is
        acknowledged and changes nothing; so is one for a task the store
        does not know, or a reply that names no record.
        """
        self.accept_then_crash(["a"])
        self.clock.advance(1)
        self.cluster.orchestrator_named("o1")
        self.clock.advance(0)
        before = self.record("a")
        ended = before.terminada
        channel = self.cluster.view.channel
        assert channel is not None
        reply_queue = self.cluster.executor.reply_queue
        for body in (messages.encode_result("OTRA", "w2/0", "", "a"),
                     messages.encode_result("OTRA", "w2/0", "", "nadie"),
                     messages.encode_result("OTRA", "w2/0")):
            channel.publish(reply_queue, body, "old.2")
        self.clock.advance(5)
        after = self.record("a")
        self.assertEqual((after.resultado, after.worker, after.terminada),
                         ("Esperé 1 segundo", "w1/0", ended))
        self.assertIsNone(self.successResultOf(self.store.get("", "nadie")))
        self.assertEqual(len(self.cluster.broker.queues[reply_queue]), 0)
        self.assertEqual(self.cluster.broker.unacked, {})

    def test_late_replies_of_its_own_tasks_ask_the_store_nothing(self) -> None:
        """
        A late reply to a task this very process published (given up on,
        or answered already) is acknowledged without a look in the store:
        this process recorded that task's end itself.
        """
        looked: List[Any] = []
        get = self.store.get
        self.store.get = lambda *key: looked.append(key) or get(*key)  # type: ignore
        proto, transport = self.cluster.client()
        proto.dataReceived(b'{"tarea_id": "a", "tipo": 1, "contenido": "hola"}\n')
        self.clock.advance(0)
        answered = self.cluster.broker.queues[TOPOLOGY.tasks][0].correlation_id
        self.cluster.worker("w1")
        self.clock.advance(0)
        self.assertEqual(replies(transport)[0]["resultado"], "HOLA")
        channel = self.cluster.view.channel
        assert channel is not None
        channel.publish(self.cluster.executor.reply_queue,
                        messages.encode_result("OTRA", "w2/0", "", "a"), answered)
        self.clock.advance(0)
        self.assertEqual(looked, [])
        self.assertEqual(self.record("a").resultado, "HOLA")
        self.assertEqual(self.cluster.broker.unacked, {})

    def test_two_replies_of_one_task_record_once(self) -> None:
        """
        Two replies for one task handled before the store answered (a task
        run twice) record the first outcome only.
        """
        waiting: List[Deferred[Any]] = []
        get = self.store.get

        def slow_get(owner: str, tarea_id: str) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            waiting.append(d)
            d.addCallback(lambda _: get(owner, tarea_id))
            return d

        self.accept_then_crash(["a"])
        self.clock.advance(1)
        self.store.get = slow_get  # type: ignore[method-assign]
        self.cluster.orchestrator_named("o1")
        channel = self.cluster.view.channel
        assert channel is not None
        channel.publish(self.cluster.executor.reply_queue,
                        messages.encode_result("OTRA", "w2/0", "", "a"), "old.3")
        self.assertEqual(len(waiting), 1)
        waiting[0].callback(None)
        self.clock.advance(0)
        self.store.get = get  # type: ignore[method-assign]
        self.assertEqual(self.record("a").resultado, "Esperé 1 segundo")
        self.assertEqual(self.cluster.broker.unacked, {})

    def test_a_store_that_fails_gets_the_reply_again(self) -> None:
        """
        An orphan reply the store could not take is not acknowledged: it
        goes back to the reply queue after a pause and is recorded once the
        store answers.
        """
        self.accept_then_crash(["a"])
        self.clock.advance(1)
        get = self.store.get
        self.store.get = lambda *key: fail(StoreUnavailable("abajo"))  # type: ignore
        self.cluster.orchestrator_named("o1")
        self.clock.advance(0)
        reply_queue = self.cluster.executor.reply_queue
        self.assertEqual(len(self.cluster.broker.unacked), 1)
        self.store.get = get  # type: ignore[method-assign]
        self.clock.advance(ORPHAN_RETRY)
        self.assertEqual(self.record("a").estado, OK)
        self.assertEqual((self.cluster.broker.unacked,
                          len(self.cluster.broker.queues[reply_queue])), ({}, 0))

    def test_no_ack_covers_an_orphan_waiting_to_be_retried(self) -> None:
        """
        While an orphan reply waits for its retry, the replies of the
        orchestrator's own tasks are acknowledged one by one, never with a
        multiple ack that would cover the orphan's delivery too (and make
        its later reject an error that closes the channel).
        """
        self.accept_then_crash(["a"])
        self.clock.advance(1)
        get = self.store.get
        self.store.get = lambda *key: fail(StoreUnavailable("abajo"))  # type: ignore
        self.cluster.orchestrator_named("o1")
        self.clock.advance(0)
        [orphan] = self.cluster.broker.unacked
        self.store.get = get  # type: ignore[method-assign]
        proto, transport = self.cluster.client()
        proto.dataReceived(b'{"tarea_id": "n", "tipo": 1, "contenido": "hola"}\n')
        self.clock.advance(0)
        self.cluster.worker("w9")
        self.clock.advance(0)
        self.assertEqual([r["resultado"] for r in replies(transport)], ["HOLA"])
        self.assertEqual(list(self.cluster.broker.unacked), [orphan])
        self.clock.advance(ORPHAN_RETRY)
        self.assertEqual(self.record("a").estado, OK)
        self.assertEqual(self.cluster.broker.unacked, {})

    def test_an_outcome_not_written_is_not_acknowledged(self) -> None:
        """
        The orphan reply is acknowledged only once the store wrote its
        outcome: a write that fails leaves it unacknowledged, to be tried
        again.
        """
        self.accept_then_crash(["a"])
        self.clock.advance(1)
        flush = self.store.flush
        self.store.flush = lambda: fail(StoreUnavailable("abajo"))  # type: ignore
        self.cluster.orchestrator_named("o1")
        self.clock.advance(0)
        self.assertEqual(len(self.cluster.broker.unacked), 1)
        self.store.flush = flush  # type: ignore[method-assign]
        self.clock.advance(ORPHAN_RETRY)
        self.assertEqual(self.record("a").estado, OK)
        self.assertEqual(self.cluster.broker.unacked, {})

    def test_tasks_without_a_store_name_no_record(self) -> None:
        """
        An executor without a store (none, or one that dies with the
        process) sends no record key, even when its caller records the task:
        not a byte more than before.  With one, the key is the tarea_id.
        """
        cluster = Cluster(TaskRegistry(BUILTINS))
        cluster.executor.run(BUILTINS[0], "a", "", "t1")
        self.cluster.executor.run(BUILTINS[0], "a", "", "t1")
        cluster.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(cluster.broker.queues[TOPOLOGY.tasks][0].body,
                         b'{"v":1,"tipo":"uppercase","contenido":"a"}')
        self.assertEqual(self.cluster.broker.queues[TOPOLOGY.tasks][0].body,
                         b'{"v":1,"tipo":"uppercase","contenido":"a","tarea_id":"t1"}')


class AcceptedTests(SynchronousTestCase):
    """
    A background task (C{"esperar": false}) is answered C{aceptada} only once
    the broker confirmed it: a client told so may go away, the task is
    queued durably.
    """

    def setUp(self) -> None:
        self.cluster = Cluster(TaskRegistry(BUILTINS))
        self.proto, self.transport = self.cluster.client()

    def submit(self, tarea_id: str) -> None:
        self.proto.dataReceived(json.dumps({
            "tarea_id": tarea_id, "tipo": "uppercase", "contenido": "a", "esperar": False,
        }).encode() + b"\n")
        self.cluster.clock.advance(0)

    def test_aceptada_waits_for_the_confirmation(self) -> None:
        self.cluster.broker.hold_confirms = True
        self.submit("a")
        self.assertEqual(replies(self.transport), [])
        self.cluster.broker.release_confirms()
        self.assertEqual([r["estado"] for r in replies(self.transport)], ["aceptada"])
        self.cluster.worker("w1")
        self.cluster.clock.advance(0)
        self.assertEqual(replies(self.transport), [])  # its result is recorded, not sent

    def test_refused_by_the_broker_is_not_aceptada(self) -> None:
        """
        A task the broker refuses (its queue full) is answered the refusal,
        never C{aceptada}.
        """
        self.cluster.broker.max_length[self.cluster.topology.tasks] = 0
        self.submit("a")
        [reply] = replies(self.transport)
        self.assertEqual((reply["estado"], reply["codigo"]), ("error", "ocupado"))

    def test_connection_lost_before_the_confirmation(self) -> None:
        self.cluster.broker.hold_confirms = True
        self.submit("a")
        self.cluster.view.lose()
        [reply] = replies(self.transport)
        self.assertEqual(reply["codigo"], "broker_no_disponible")


class _AckRecorder:
    """
    The acknowledgements a channel was asked for, as C{(tag, multiple)}.
    """

    def __init__(self) -> None:
        self.acks: List[Tuple[int, bool]] = []

    def ack(self, tag: int, multiple: bool = False) -> None:
        self.acks.append((tag, multiple))


class AckBatchTests(SynchronousTestCase):
    """
    L{AckBatch} sends one multiple ack per reactor turn.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.batch = AckBatch(self.clock)
        self.channel = _AckRecorder()

    def test_one_ack_per_turn(self) -> None:
        """
        Deliveries acknowledged in one turn go out in the next as one
        multiple ack of the last tag; a later turn gets its own.
        """
        for tag in (1, 2, 3):
            self.batch.ack(self.channel, tag)  # type: ignore[arg-type]
        self.assertEqual(self.channel.acks, [])
        self.clock.advance(0)
        self.batch.ack(self.channel, 4)  # type: ignore[arg-type]
        self.clock.advance(0)
        self.assertEqual(self.channel.acks, [(3, True), (4, True)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_new_channel_flushes_the_old_one(self) -> None:
        """
        A delivery of another channel (after a reconnection) first sends
        what the previous channel had pending, to that channel: tags are
        per channel.
        """
        other = _AckRecorder()
        self.batch.ack(self.channel, 5)  # type: ignore[arg-type]
        self.batch.ack(other, 1)  # type: ignore[arg-type]
        self.clock.advance(0)
        self.assertEqual((self.channel.acks, other.acks), ([(5, True)], [(1, True)]))

    def test_flush(self) -> None:
        """
        C{flush} sends the pending ack at once and leaves no timer behind;
        with nothing pending it sends nothing.
        """
        self.batch.ack(self.channel, 2)  # type: ignore[arg-type]
        self.batch.flush()
        self.batch.flush()
        self.assertEqual((self.channel.acks, self.clock.getDelayedCalls()), ([(2, True)], []))


class _ConsumingRecorder(_AckRecorder):
    """
    A channel with one consumer the test delivers to, recording acks and
    rejections.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rejected: List[int] = []
        self.on_message: Any = None

    def consume(self, queue: str, on_message: Any) -> Deferred[str]:
        self.on_message = on_message
        d: Deferred[str] = Deferred()
        d.callback("ctag")
        return d

    def reject(self, tag: int, requeue: bool) -> None:
        self.rejected.append(tag)

    def deliver(self, *tags: int) -> None:
        for tag in tags:
            self.on_message(Delivery(tag, b"", None, None, None, False))


class OrderedAcksTests(SynchronousTestCase):
    """
    L{OrderedAcks} acknowledges several deliveries at once only up to the
    first one not settled.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.raw = _ConsumingRecorder()
        self.channel = OrderedAcks(self.raw, self.clock)  # type: ignore[arg-type]
        self.seen: List[int] = []
        self.channel.consume("q", lambda d: self.seen.append(d.tag))
        self.raw.deliver(1, 2, 3, 4)

    def test_in_order(self) -> None:
        """
        Deliveries acknowledged in one turn, in the order they came, go out
        as one multiple ack at the end of the turn; the consumer saw each.
        """
        for tag in (1, 2, 3):
            self.channel.ack(tag)
        self.assertEqual(self.raw.acks, [])
        self.clock.advance(0)
        self.assertEqual((self.seen, self.raw.acks), ([1, 2, 3, 4], [(3, True)]))

    def test_behind_an_unsettled_delivery(self) -> None:
        """
        Deliveries behind one still running are acknowledged one by one; once
        that one is acknowledged, a multiple ack covers it.
        """
        self.channel.ack(4)
        self.channel.ack(2)
        self.clock.advance(0)
        self.channel.ack(1)
        self.clock.advance(0)
        self.assertEqual(self.raw.acks, [(2, False), (4, False), (1, True)])
        self.channel.ack(3)
        self.clock.advance(0)
        self.assertEqual(self.raw.acks[-1], (3, True))

    def test_rejected(self) -> None:
        """
        A rejection goes out at once, and a later multiple ack may reach past
        it (the broker no longer counts it as unacknowledged).
        """
        self.channel.reject(2, requeue=True)
        self.assertEqual(self.raw.rejected, [2])
        self.channel.ack(3)
        self.channel.ack(1)
        self.clock.advance(0)
        self.assertEqual(self.raw.acks, [(3, True)])

    def test_flush(self) -> None:
        """
        C{flush} sends what is pending at once and leaves no timer; a
        caller's own multiple ack is refused.
        """
        self.channel.ack(1)
        self.channel.flush()
        self.assertEqual((self.raw.acks, self.clock.getDelayedCalls()), ([(1, True)], []))
        self.assertRaises(ValueError, self.channel.ack, 2, multiple=True)


class ReplyAckTests(SynchronousTestCase):
    """
    The orchestrator acknowledges its replies together, and only once it
    has handled them.
    """

    def setUp(self) -> None:
        self.cluster = Cluster(TaskRegistry(BUILTINS))
        self.cluster.worker("w1")

    def test_replies_of_one_turn_share_an_ack(self) -> None:
        """
        Replies handled in one reactor turn stay unacknowledged until its
        end, then one multiple ack settles them all.
        """
        cluster = Cluster(TaskRegistry(BUILTINS))  # no worker: the replies come by hand
        broker, reply_queue = cluster.broker, cluster.executor.reply_queue
        ds = []
        for text in "abc":  # one reactor turn each: three task messages
            ds.append(cluster.executor.run(BUILTINS[0], text))
            cluster.clock.advance(0)
        tasks = list(broker.queues[TOPOLOGY.tasks])
        self.assertEqual(len(tasks), 3)
        channel = cluster.view.channel
        assert channel is not None
        for text, message in zip("ABC", tasks):
            channel.publish(reply_queue, messages.encode_result(text, "w1/0"),
                            message.correlation_id or "")
        self.assertEqual([self.successResultOf(d)[0] for d in ds],  # type: ignore[arg-type]
                         ["A", "B", "C"])
        replies = [tag for tag, (q, _, _) in broker.unacked.items() if q == reply_queue]
        self.assertEqual(len(replies), 3)
        cluster.clock.advance(0)
        self.assertEqual(broker.unacked, {})
        self.assertEqual(sorted(set(replies) & set(broker.acked)), sorted(replies))

    def test_lost_before_the_ack(self) -> None:
        """
        A reply handled but not yet acknowledged when the connection drops
        is delivered again after the reconnection and dropped: the client
        got one answer.
        """
        cluster = Cluster(TaskRegistry(BUILTINS))  # no worker: the reply comes by hand
        d = cluster.executor.run(BUILTINS[0], "a")
        cluster.clock.advance(0)
        [task] = cluster.broker.queues[TOPOLOGY.tasks]
        reply_queue = cluster.executor.reply_queue
        channel = cluster.view.channel
        assert channel is not None
        channel.publish(reply_queue, messages.encode_result("A", "w1/0"),
                        task.correlation_id or "")
        self.assertEqual(self.successResultOf(d), ("A", "w1/0"))  # type: ignore[arg-type]
        cluster.view.lose()
        self.assertEqual(len(cluster.broker.queues[reply_queue]), 1)
        cluster.view.connect()
        cluster.clock.advance(0)
        self.assertEqual((cluster.broker.unacked, len(cluster.broker.queues[reply_queue])),
                         ({}, 0))
        self.assertEqual(cluster.executor._pending, {})


class WorkerTests(SynchronousTestCase):
    """
    The worker's side: unknown types, acknowledgement after the reply, dead
    letters, stop.
    """

    def setUp(self) -> None:
        self.cluster = Cluster(TaskRegistry(BUILTINS))

    def test_unknown_type_is_answered(self) -> None:
        """
        A worker without a task type answers with tipo_desconocido.
        """
        self.cluster.worker("w1", registry=TaskRegistry(BUILTINS[1:]))
        d = self.cluster.executor.run(BUILTINS[0], "a")
        self.cluster.clock.advance(0)
        self.failureResultOf(d, UnknownType)  # type: ignore[arg-type]

    def test_ack_waits_for_the_reply_confirmation(self) -> None:
        """
        The worker acknowledges a task only once the broker confirmed its
        reply; if it dies before, the task is delivered again.
        """
        self.cluster.broker.hold_confirms = True
        self.cluster.executor.run(BUILTINS[0], "a")
        self.cluster.clock.advance(0)
        self.cluster.broker.release_confirms()  # the task itself
        worker = self.cluster.worker("w1")
        self.cluster.clock.advance(0)  # the orchestrator acknowledges the reply
        self.assertEqual(len(self.cluster.broker.unacked), 1)
        worker.broker.lose()  # type: ignore[attr-defined]
        self.assertEqual(len(self.cluster.broker.queues[self.cluster.topology.tasks]), 1)

    def test_delivery_limit_answers_reintentos_agotados(self) -> None:
        """
        A task delivered more than the limit allows is dead-lettered and its
        client answered reintentos_agotados by a worker.
        """
        d = self.cluster.executor.run(BUILTINS[3], 5.0)
        self.cluster.clock.advance(0)
        for name in ("k1", "k2"):  # the first delivery and the one redelivery allowed
            dying = self.cluster.worker(name)
            self.assertEqual(len(dying.held), 1)
            dying.broker.lose()  # type: ignore[attr-defined]
        self.cluster.worker("w")
        self.cluster.clock.advance(0)
        self.failureResultOf(d, DeliveryLimit)  # type: ignore[arg-type]

    def test_stop_finishes_what_it_holds(self) -> None:
        """
        Stopping a worker stops its consumers, answers the task it holds and
        acknowledges it before the connection closes.
        """
        worker = self.cluster.worker("w1")
        d = self.cluster.executor.run(BUILTINS[3], 1.0)
        self.cluster.clock.advance(0)
        stopped = worker.stopService()
        self.assertNoResult(stopped)
        self.assertEqual(self.cluster.broker.consumers.keys() & set(worker._consumers), set())
        self.cluster.clock.advance(1)
        self.assertEqual(self.successResultOf(d)[0], "Esperé 1 segundo")  # type: ignore
        self.successResultOf(stopped)
        self.assertEqual(self.cluster.broker.unacked, {})


class _Publishes:
    """
    A channel that records what it publishes and confirms it with
    C{outcome}.
    """

    def __init__(self) -> None:
        self.sent: List[Tuple[str, bytes, str, Optional[str], Optional[float], bool]] = []
        self.outcome: Any = None

    def publish(self, routing_key: str, body: bytes, correlation_id: str,
                reply_to: Optional[str] = None, expiration: Optional[float] = None,
                persistent: bool = True, exchange: str = "") -> Deferred[None]:
        self.sent.append((routing_key, body, correlation_id, reply_to, expiration, persistent))
        return fail(self.outcome) if self.outcome is not None else succeed(None)


class BatcherTests(SynchronousTestCase):
    """
    L{Batcher} publishes what one reactor turn gives it, one batch per
    destination.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.channel: Optional[_Publishes] = _Publishes()
        self.batcher = Batcher(self.clock, lambda: self.channel,  # type: ignore[arg-type,return-value]
                               max_items=3, max_bytes=1000)

    def publish(self, routing_key: str, correlation_id: str, **kw: Any) -> Deferred[None]:
        return self.batcher.publish(routing_key, messages.encode_task("upper", correlation_id),
                                    correlation_id, **kw)

    def test_alone_it_goes_as_it_is(self) -> None:
        """
        A message alone in its turn goes out at the turn's end, unchanged.
        """
        assert self.channel is not None
        d = self.publish("q", "c1", reply_to="r", expiration=5.0)
        self.assertEqual(self.channel.sent, [])
        self.clock.advance(0)
        self.assertEqual(self.channel.sent, [
            ("q", messages.encode_task("upper", "c1"), "c1", "r", 5.0, True)])
        self.assertIsNone(self.successResultOf(d))

    def test_one_batch_per_destination(self) -> None:
        """
        Messages of one turn to one destination (queue, reply queue, expiry,
        persistence) go as one batch; the others apart.  Each one's Deferred
        fires with its batch's confirmation.
        """
        assert self.channel is not None
        ds = [self.publish("q", "c1"), self.publish("q", "c2"), self.publish("q2", "c3"),
              self.publish("q", "c4", persistent=False)]
        self.clock.advance(0)
        sent = {(key, persistent): (body, cid) for key, body, cid, _, _, persistent
                in self.channel.sent}
        self.assertEqual(len(self.channel.sent), 3)
        body, cid = sent[("q", True)]
        self.assertEqual([c for c, _ in messages.items_of(body, cid)[0]], ["c1", "c2"])
        self.assertEqual(sent[("q2", True)][1], "c3")
        self.assertEqual(sent[("q", False)][1], "c4")
        self.assertEqual([self.successResultOf(d) for d in ds], [None] * 4)

    def test_a_full_batch_goes_at_once(self) -> None:
        """
        A batch that reaches its count or its size goes out at once, without
        waiting for the end of the turn.
        """
        assert self.channel is not None
        for c in ("c1", "c2", "c3"):
            self.publish("q", c)
        self.assertEqual(len(self.channel.sent), 1)
        self.batcher.publish("q", b'{"v":1,"x":"' + b"y" * 1000 + b'"}', "big")
        self.assertEqual(len(self.channel.sent), 2)
        self.clock.advance(0)
        self.assertEqual(len(self.channel.sent), 2)

    def test_refused_fails_each(self) -> None:
        """
        A batch the broker refuses fails every message in it with the
        refusal; with no channel at all, with L{ChannelGone}.
        """
        assert self.channel is not None
        self.channel.outcome = Refused("q")
        ds = [self.publish("q", "c1"), self.publish("q", "c2")]
        self.clock.advance(0)
        for d in ds:
            self.failureResultOf(d, Refused)
        self.channel = None
        d = self.publish("q", "c3")
        self.batcher.flush()
        self.failureResultOf(d, ChannelGone)

    def test_a_publish_that_raises_fails_each(self) -> None:
        """
        A channel that raises as it is asked to publish (pika, on a channel
        closing) fails each message of the batch, and the batches after it
        still go.
        """
        assert self.channel is not None
        raising = _Publishes()
        raising.publish = lambda *a, **kw: 1 / 0  # type: ignore[method-assign]
        channels = [raising, self.channel]
        self.batcher = Batcher(self.clock, lambda: channels.pop(0),  # type: ignore[arg-type]
                               max_items=3, max_bytes=1000)
        ds = [self.publish("q", "c1"), self.publish("q", "c2"), self.publish("q2", "c3")]
        self.clock.advance(0)
        for d in ds[:2]:
            self.failureResultOf(d, ZeroDivisionError)
        self.assertIsNone(self.successResultOf(ds[2]))
        self.assertEqual([sent[2] for sent in self.channel.sent], ["c3"])


class BatchTests(SynchronousTestCase):
    """
    Tasks of one reactor turn travel as one batch: acknowledged once each of
    its tasks is answered, split when delivered again, its tasks cancelled
    and dead-lettered one by one.
    """

    def setUp(self) -> None:
        self.never: List[Deferred[Any]] = []
        registry = TaskRegistry(BUILTINS + (
            TaskType("nunca", 40, (), "d", self._never, ASYNC),))
        self.cluster = Cluster(registry)
        self.published: List[Tuple[str, bytes]] = []
        broker = self.cluster.broker
        publish = broker._publish

        def spy(exchange: str, routing_key: str, message: Any, channel: Any) -> Deferred[None]:
            if not exchange:
                self.published.append((routing_key, message.body))
            return publish(exchange, routing_key, message, channel)

        broker._publish = spy  # type: ignore[method-assign]

    def _never(self, clock: Any, arg: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.never.append(d)
        return d

    def batches(self, queue: str) -> List[int]:
        """
        @return: How many items each message published to C{queue} carried
            (0: a message of its own).
        """
        sizes = []
        for routing_key, body in self.published:
            if routing_key == queue:
                items, batch = messages.items_of(body, "")
                sizes.append(len(items) if batch else 0)
        return sizes

    def held_reverse(self) -> TaskRegistry:
        """
        @return: The built-in types for a worker whose C{reverse} never ends
            by itself (as one that hangs, or kills its process, would):
            inline for the orchestrator, which batches it.
        """
        return TaskRegistry(tuple(t for t in BUILTINS if t.name != "reverse") + (
            TaskType("reverse", 2, (), "d", self._never, ASYNC),))

    def test_inline_tasks_of_one_turn_travel_as_one_message(self) -> None:
        """
        Inline tasks of one turn go as one message, the others one to a
        message (the workers' prefetch spreads them); a worker answers the
        replies of one turn as one message.
        """
        run = self.cluster.executor.run
        ds = [run(BUILTINS[0], "a"), run(BUILTINS[3], 1.0), run(BUILTINS[1], "bc"),
              run(BUILTINS[3], 1.0)]
        self.cluster.clock.advance(0)
        self.assertEqual(sorted(self.batches(TOPOLOGY.tasks)), [0, 0, 2])
        self.cluster.worker("w1")
        self.cluster.clock.advance(0)
        self.assertEqual([self.successResultOf(d) for d in ds[::2]],  # type: ignore[arg-type]
                         [("A", "w1/0"), ("cb", "w1/0")])
        self.cluster.clock.advance(1)
        self.assertEqual([self.successResultOf(d)[0] for d in ds[1::2]],  # type: ignore
                         ["Esperé 1 segundo"] * 2)
        self.assertEqual(self.batches(self.cluster.executor.reply_queue), [2, 2])
        self.assertEqual(self.cluster.broker.unacked, {})

    def test_a_batch_is_acknowledged_once_each_task_is_answered(self) -> None:
        """
        A worker acknowledges a batch once the last of its tasks is
        answered.
        """
        run = self.cluster.executor.run
        ds = [run(BUILTINS[0], "a"), run(BUILTINS[1], "bc")]
        self.cluster.clock.advance(0)
        self.assertEqual(self.batches(TOPOLOGY.tasks), [2])
        self.cluster.worker("w1", registry=self.held_reverse())
        self.cluster.clock.advance(0)
        self.assertEqual(self.successResultOf(ds[0]), ("A", "w1/0"))  # type: ignore[arg-type]
        self.assertEqual(len(self.cluster.broker.unacked), 1)  # the batch: one task runs
        self.never[0].callback("cb")
        self.cluster.clock.advance(0)
        self.assertEqual(self.successResultOf(ds[1]), ("cb", "w1/0"))  # type: ignore[arg-type]
        self.assertEqual(self.cluster.broker.unacked, {})

    def test_a_batch_delivered_again_is_split(self) -> None:
        """
        A batch delivered again (its worker died) goes back to the queue as
        one message per task, and is acknowledged: the task that kills its
        workers is dead-lettered alone, and its batch-mate, answered before
        the first death, is answered once.
        """
        run = self.cluster.executor.run
        answered, poison = run(BUILTINS[0], "a"), run(BUILTINS[1], "bc")
        self.cluster.clock.advance(0)
        k1 = self.cluster.worker("k1", registry=self.held_reverse())
        self.cluster.clock.advance(0)
        self.assertEqual(self.successResultOf(answered), ("A", "k1/0"))  # type: ignore
        k1.broker.lose()  # type: ignore[attr-defined]
        k2 = self.cluster.worker("k2", registry=self.held_reverse())
        self.cluster.clock.advance(0)
        self.assertEqual(self.batches(TOPOLOGY.tasks), [2, 0, 0])
        self.assertEqual(len(k2.held), 1)
        k2.broker.lose()  # type: ignore[attr-defined]
        k3 = self.cluster.worker("k3", registry=self.held_reverse())  # its one redelivery
        self.cluster.clock.advance(0)
        self.assertEqual(len(k3.held), 1)
        k3.broker.lose()  # type: ignore[attr-defined]
        self.cluster.worker("w")
        self.cluster.clock.advance(0)
        self.failureResultOf(poison, DeliveryLimit)  # type: ignore[arg-type]
        self.assertEqual(self.cluster.broker.unacked, {})
        self.assertEqual(len(self.cluster.broker.queues[TOPOLOGY.tasks]), 0)

    def test_a_cancelled_task_of_a_batch_is_not_run(self) -> None:
        """
        A task given up on while its batch waited in the queue is dropped;
        its batch-mates run, and the batch is acknowledged.
        """
        worker = self.cluster.worker("w1", capacity=1)
        busy = self.cluster.executor.run(BUILTINS[3], 1.0)
        self.cluster.clock.advance(0)
        leaving, transport1 = self.cluster.client()
        staying, transport2 = self.cluster.client()
        leaving.dataReceived(b'{"tarea_id": "n", "tipo": "reverse", "contenido": "ab"}\n')
        staying.dataReceived(b'{"tarea_id": "b", "tipo": 1, "contenido": "b"}\n')
        self.cluster.clock.advance(0)
        self.assertEqual(self.batches(TOPOLOGY.tasks), [0, 2])
        leaving.connectionLost()
        ran: List[str] = []
        run = worker.executor.run
        worker.executor.run = lambda t, *a: ran.append(t.name) or run(t, *a)  # type: ignore
        self.cluster.clock.advance(1)
        self.assertEqual(self.successResultOf(busy)[0], "Esperé 1 segundo")  # type: ignore
        self.assertEqual(replies(transport2)[0]["resultado"], "B")
        self.assertEqual((ran, worker.held, self.cluster.broker.unacked),
                         (["uppercase"], {}, {}))

    def test_a_dead_lettered_batch_answers_each_task(self) -> None:
        """
        A batch dead-lettered whole (it came back too often to be split in
        time) answers each of its tasks reintentos_agotados.
        """
        run = self.cluster.executor.run
        ds = [run(BUILTINS[0], "a"), run(BUILTINS[0], "b")]
        self.cluster.clock.advance(0)
        broker = self.cluster.broker
        batch = broker.queues[TOPOLOGY.tasks].popleft()
        batch.headers = {DEATH_REASON: "delivery_limit"}
        broker.queues[TOPOLOGY.dead].append(batch)
        self.cluster.worker("w")
        self.cluster.clock.advance(0)
        for d in ds:
            self.failureResultOf(d, DeliveryLimit)  # type: ignore[arg-type]
        self.assertEqual(broker.unacked, {})

    def split_batch_at(
        self, worker_name: str, capacity: int = 8,
    ) -> Tuple[List[Deferred[Any]], WorkerService]:
        """
        Two inline tasks in one batch, delivered to a worker that holds its
        C{reverse} and loses its connection; C{worker_name} then gets the
        batch again (and so splits it).
        """
        run = self.cluster.executor.run
        ds = [run(BUILTINS[0], "a"), run(BUILTINS[1], "bc")]
        self.cluster.clock.advance(0)
        k1 = self.cluster.worker("k1", registry=self.held_reverse())
        self.cluster.clock.advance(0)
        k1.broker.lose()  # type: ignore[attr-defined]
        return ds, self.cluster.worker(worker_name, capacity=capacity)

    def test_a_task_the_full_queue_refuses_when_split_is_answered_ocupado(self) -> None:
        """
        Splitting a batch into a queue that is full: a task the queue takes
        goes back to it, one it refuses is answered ocupado, and the batch is
        acknowledged; nothing is delivered again.
        """
        broker = self.cluster.broker
        broker.max_length[TOPOLOGY.tasks] = 1  # the batch, back in the queue, fills it
        ds, _ = self.split_batch_at("w", capacity=1)
        self.cluster.clock.advance(0)
        self.assertEqual(self.successResultOf(ds[0]), ("A", "k1/0"))  # type: ignore[arg-type]
        self.failureResultOf(ds[1], Busy)  # type: ignore[arg-type]
        self.assertEqual((broker.unacked, len(broker.queues[TOPOLOGY.tasks])), ({}, 0))

    def test_a_stopping_worker_waits_for_its_split(self) -> None:
        """
        A worker stopped while the copies of a batch it split wait for the
        broker's confirmation acknowledges the batch before it closes: each
        task goes back to the queue once.
        """
        broker = self.cluster.broker
        broker.hold_confirms = True
        _, worker = self.split_batch_at("w", capacity=1)  # the copies stay in the queue
        stopped = worker.stopService()
        self.assertNoResult(stopped)
        broker.hold_confirms = False
        broker.release_confirms()
        self.cluster.clock.advance(0)
        self.successResultOf(stopped)
        self.assertEqual(broker.unacked, {})
        copies = [messages.items_of(m.body, m.correlation_id)
                  for m in broker.queues[TOPOLOGY.tasks]]
        self.assertEqual([(len(items), batch) for items, batch in copies], [(1, False)] * 2)

    def test_an_empty_batch_is_answered_and_acknowledged(self) -> None:
        """
        A batch with nothing in it (no orchestrator sends one) is answered
        error_interno and acknowledged, not left holding a prefetch slot.
        """
        self.cluster.worker("w1")
        channel = self.cluster.view.channel
        assert channel is not None
        channel.publish(TOPOLOGY.tasks, b'{"v":1,"lote":[]}', "lote.x",
                        reply_to=self.cluster.executor.reply_queue)
        self.cluster.clock.advance(0)
        self.assertEqual(self.cluster.broker.unacked, {})


class SharedAckTests(SynchronousTestCase):
    """
    L{SharedAck} acknowledges a batch once each part did, each part once.
    """

    def test_each_part_once(self) -> None:
        channel = _AckRecorder()
        shared = SharedAck(channel, 2)  # type: ignore[arg-type]
        first, second = shared.part(), shared.part()
        first.ack(7)
        first.ack(7)
        self.assertEqual(channel.acks, [])
        second.ack(7)
        self.assertEqual(channel.acks, [(7, False)])
