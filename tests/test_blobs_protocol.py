"""
Large contents and results through object storage, as clients see them
(C{docs/protocol.md}, "Large contents and results"): C{op: subir},
C{contenido_ref}, C{"refs": true} and C{resultado_ref}, on a server with the
memory storage and a fake clock, then in distributed mode on the in-memory
broker, where only references travel and the orchestrator never reads an
object.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Tuple

from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pfo3 import blobs, wire
from pfo3.amqp import messages
from pfo3.amqp.executor import AMQPExecutor
from pfo3.amqp.topology import Topology
from pfo3.amqp.worker import WorkerService
from pfo3.blobs import MemoryBlobs, Presigned
from pfo3.blobs.executor import BlobExecutor
from pfo3.blobs.requests import BlobPolicy
from pfo3.errors import BlobStoreUnavailable
from pfo3.executor import LocalExecutor
from pfo3.orchestrator import Orchestrator
from pfo3.protocol import TaskFactory
from pfo3.tasks import default_registry
from pfo3.testing import FakeReactor, MemoryBroker, SynchronousThreadPool


class PresigningBlobs(MemoryBlobs):
    """
    The memory storage, with made-up presigned URLs (as S3 would give).
    """

    def presign_put(self, ref: str, expires: float) -> Deferred[Presigned]:
        return Deferred.fromCoroutine(self._p(ref, expires, "PUT"))

    def presign_get(self, ref: str, expires: float) -> Deferred[Presigned]:
        return Deferred.fromCoroutine(self._p(ref, expires, "GET"))

    async def _p(self, ref: str, expires: float, method: str) -> Presigned:
        return Presigned(f"http://s3.test/{ref}?{method}", 1000.0 + expires, method)


class DownBlobs(MemoryBlobs):
    """
    A storage that does not answer.
    """

    def stat(self, ref: str) -> Deferred[Any]:
        return fail(BlobStoreUnavailable("El almacén de objetos no responde."))

    def presign_put(self, ref: str, expires: float) -> Deferred[Presigned]:
        return fail(BlobStoreUnavailable("El almacén de objetos no responde."))


def connect(factory: TaskFactory) -> Tuple[Any, StringTransport]:
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def send(proto: Any, **request: Any) -> None:
    proto.dataReceived(json.dumps(request).encode() + b"\n")


def replies(transport: StringTransport) -> List[Dict[str, Any]]:
    data = transport.value()
    transport.clear()
    return [json.loads(line) for line in data.splitlines()]


def server(store: Any = None, threshold: int = 100, max_line: int = 1 << 20,
           enabled: bool = True) -> TaskFactory:
    clock = FakeReactor()
    registry = default_registry(entry_points=False)
    policy = BlobPolicy(store if store is not None else PresigningBlobs(),
                        threshold=threshold, max_line=max_line, max_bytes=10_000_000)
    executor: Any = LocalExecutor(clock, SynchronousThreadPool())
    if enabled:
        executor = BlobExecutor(executor, policy)
    orch = Orchestrator(registry, executor, clock, blobs=policy if enabled else None)
    return TaskFactory(orch, max_line)


class UploadTests(SynchronousTestCase):
    """
    C{{"op": "subir", "bytes": N}}.
    """

    def test_answers_a_reference_and_a_presigned_put(self) -> None:
        """
        It answers a fresh upload reference, the presigned PUT URL of that
        object and when the URL expires.
        """
        proto, t = connect(server())
        send(proto, op="subir", bytes=1234, tarea_id="s")
        [reply] = replies(t)
        assert reply["estado"] == "ok" and reply["tarea_id"] == "s"
        res = reply["resultado"]
        blobs.check_ref(res["ref"])
        assert res["ref"].startswith("u")
        assert res["url"] == f"http://s3.test/{res['ref']}?PUT"
        assert res["expira"] == 1000.0 + 3600 and res["metodo"] == "PUT"

    def test_refused_without_blobs(self) -> None:
        """
        Without C{--blobs}, C{subir} is C{blobs_desactivado}.
        """
        proto, t = connect(server(enabled=False))
        send(proto, op="subir", bytes=10)
        assert replies(t)[0]["codigo"] == "blobs_desactivado"

    def test_bad_sizes(self) -> None:
        """
        C{bytes} missing, not a positive integer, or past C{--blob-max-bytes}
        is C{subida_invalida}.
        """
        proto, t = connect(server())
        for size in (None, 0, -1, "5", 1.5, 10_000_001):
            send(proto, op="subir", bytes=size)
            assert replies(t)[0]["codigo"] == "subida_invalida", size

    def test_storages_without_urls_say_so(self) -> None:
        """
        With C{memory:} (no presigned URLs) it is C{urls_no_soportadas}; with
        a storage that does not answer, C{almacen_objetos_no_disponible},
        and the server keeps serving.
        """
        proto, t = connect(server(MemoryBlobs()))
        send(proto, op="subir", bytes=10, tarea_id="m")
        assert replies(t)[0]["codigo"] == "urls_no_soportadas"
        proto, t = connect(server(DownBlobs()))
        send(proto, op="subir", bytes=10, tarea_id="d")
        send(proto, tipo="uppercase", contenido="sigo", tarea_id="u")
        got = {r["tarea_id"]: r for r in replies(t)}
        assert got["d"]["codigo"] == "almacen_objetos_no_disponible"
        assert got["u"]["resultado"] == "SIGO"


class RefTaskTests(SynchronousTestCase):
    """
    Tasks with C{contenido_ref} and C{"refs": true}.
    """

    def setUp(self) -> None:
        self.store = PresigningBlobs()
        self.factory = server(self.store, threshold=100, max_line=2000)
        self.proto, self.t = connect(self.factory)

    def upload(self, text: str) -> str:
        ref = blobs.new_ref()
        self.store.put(ref, text.encode("utf-8"))
        return ref

    def test_content_from_an_object(self) -> None:
        """
        A task with C{contenido_ref} runs on the object's text, validated
        by its type, and its short result comes inline.
        """
        ref = self.upload("uno dos tres " * 10)
        send(self.proto, tipo="word_count", contenido_ref=ref, tarea_id="w")
        assert replies(self.t) == [
            {"estado": "ok", "resultado": 30, "tarea_id": "w", "worker": 0}]

    def test_large_result_as_a_reference(self) -> None:
        """
        With C{"refs": true}, a result longer than the threshold is stored
        as an object and the reply carries C{resultado_ref} (reference,
        bytes, SHA-256, presigned GET URL) instead of C{resultado}.
        """
        text = "abc" * 500
        ref = self.upload(text)
        send(self.proto, tipo="uppercase", contenido_ref=ref, refs=True, tarea_id="u")
        [reply] = replies(self.t)
        assert "resultado" not in reply and reply["estado"] == "ok"
        out = reply["resultado_ref"]
        expected = text.upper().encode()
        assert out["bytes"] == len(expected)
        assert out["sha256"] == hashlib.sha256(expected).hexdigest()
        assert out["url"] == f"http://s3.test/{out['ref']}?GET"
        assert self.store.objects[out["ref"]][0] == expected

    def test_inline_content_with_refs(self) -> None:
        """
        C{"refs": true} works with inline content too; a short result stays
        inline.
        """
        send(self.proto, tipo="reverse", contenido="x" * 200 + "y", refs=True, tarea_id="a")
        send(self.proto, tipo="reverse", contenido="hola", refs=True, tarea_id="b")
        got = {r["tarea_id"]: r for r in replies(self.t)}
        assert "resultado_ref" in got["a"]
        assert got["b"]["resultado"] == "aloh"

    def test_seed_clients_get_inline_up_to_the_line_limit(self) -> None:
        """
        Without C{refs}, a result past the threshold still comes inline up
        to the line limit; past it the reply is C{resultado_demasiado_grande}.
        """
        send(self.proto, tipo="uppercase", contenido_ref=self.upload("a" * 500), tarea_id="m")
        send(self.proto, tipo="uppercase", contenido_ref=self.upload("a" * 5000),
             tarea_id="l")
        got = {r["tarea_id"]: r for r in replies(self.t)}
        assert got["m"]["resultado"] == "A" * 500
        assert got["l"]["codigo"] == "resultado_demasiado_grande"

    def test_unknown_and_forged_references(self) -> None:
        """
        A reference never uploaded, or not one the server hands out, is
        C{ref_desconocida}.
        """
        for ref in (blobs.new_ref(), "../etc/passwd", 5):
            send(self.proto, tipo="uppercase", contenido_ref=ref, tarea_id="r")
            assert replies(self.t)[0]["codigo"] == "ref_desconocida", ref

    def test_object_content_is_validated(self) -> None:
        """
        The object's text goes through the type's validator (a C{sleep} of
        text that is not a number is C{contenido_invalido}), and bytes that
        are not UTF-8 are refused the same way.
        """
        send(self.proto, tipo="sleep", contenido_ref=self.upload("nada"), tarea_id="s")
        ref = blobs.new_ref()
        self.store.put(ref, b"\xff\xfe")
        send(self.proto, tipo="uppercase", contenido_ref=ref, tarea_id="u")
        got = {r["tarea_id"]: r for r in replies(self.t)}
        assert got["s"]["codigo"] == "contenido_invalido"
        assert got["u"]["codigo"] == "contenido_invalido"

    def test_both_content_and_reference(self) -> None:
        """
        A request with both C{contenido} and C{contenido_ref}, or a C{refs}
        that is not a boolean, is C{contenido_invalido}.
        """
        send(self.proto, tipo="uppercase", contenido="a", contenido_ref=blobs.new_ref())
        send(self.proto, tipo="uppercase", contenido="a", refs="yes")
        assert [r["codigo"] for r in replies(self.t)] == ["contenido_invalido"] * 2

    def test_refused_without_blobs(self) -> None:
        """
        Without C{--blobs}, C{contenido_ref} is C{blobs_desactivado}, while
        C{"refs": true} is harmless (results stay inline).
        """
        proto, t = connect(server(enabled=False))
        send(proto, tipo="uppercase", contenido_ref=blobs.new_ref(), tarea_id="r")
        send(proto, tipo="uppercase", contenido="x" * 300, refs=True, tarea_id="i")
        got = {r["tarea_id"]: r for r in replies(t)}
        assert got["r"]["codigo"] == "blobs_desactivado"
        assert got["i"]["resultado"] == "X" * 300

    def test_storage_down(self) -> None:
        """
        A storage that does not answer makes the task
        C{almacen_objetos_no_disponible}; the server keeps serving.
        """
        proto, t = connect(server(DownBlobs()))
        send(proto, tipo="uppercase", contenido_ref=blobs.new_ref(), tarea_id="r")
        send(proto, tipo="uppercase", contenido="ok", tarea_id="p")
        got = {r["tarea_id"]: r for r in replies(t)}
        assert got["r"]["codigo"] == "almacen_objetos_no_disponible"
        assert got["p"]["resultado"] == "OK"

    def test_sleep_declared_too_long_inline(self) -> None:
        """
        An inline C{sleep} sent with C{refs} is still refused at once when
        it declares the timeout or more.
        """
        send(self.proto, tipo="sleep", contenido=99, refs=True, tarea_id="z")
        assert replies(self.t)[0]["codigo"] == "excede_timeout"


class NoReads(MemoryBlobs):
    """
    The orchestrator's view of the shared storage in distributed mode: any
    read fails the test.
    """

    def __init__(self, shared: MemoryBlobs) -> None:
        super().__init__()
        self.objects = shared.objects

    def get(self, ref: str) -> Deferred[bytes]:
        raise AssertionError("the orchestrator read an object")

    def stat(self, ref: str) -> Deferred[Any]:
        raise AssertionError("the orchestrator read an object")

    get_into = get  # type: ignore[assignment]


class DistributedTests(SynchronousTestCase):
    """
    In distributed mode only references travel through the broker; the
    worker reads contents and writes results.
    """

    def test_only_references_travel(self) -> None:
        """
        A task with C{contenido_ref} and C{refs} reaches the worker as a
        message with the reference and no content, the worker reads the
        object, stores the large result, and the client gets
        C{resultado_ref}; the orchestrator reads no object.
        """
        topology = Topology("b", delivery_limit=1)
        clock = FakeReactor()
        broker = MemoryBroker(topology)
        shared = PresigningBlobs()
        holder: List[Any] = []
        view = broker.view(lambda raw, ch: holder[0].setup(raw, ch))
        executor = AMQPExecutor(view, topology, "o1", 10)  # type: ignore[arg-type]
        holder.append(executor)
        registry = default_registry(entry_points=False)
        orch = Orchestrator(registry, executor, clock,
                            blobs=BlobPolicy(NoReads(shared), threshold=100))
        factory = TaskFactory(orch)
        executor.start()
        bodies: List[bytes] = []
        original = messages.task_of

        def spy(task: Any) -> Any:
            bodies.append(messages.encode_item(task))
            return original(task)

        self.patch(messages, "task_of", spy)
        wholder: List[Any] = []
        wview = broker.view(lambda raw, ch: wholder[0].setup(raw, ch), prefetch=4)
        worker = WorkerService(
            clock, "amqp://unused", topology, registry,
            BlobExecutor(LocalExecutor(clock, SynchronousThreadPool()),
                         BlobPolicy(shared, threshold=100)),
            "w1", capacity=4, timeout=20, broker=wview)  # type: ignore[arg-type]
        wholder.append(worker)
        worker.startService()
        text = "hola mundo " * 1000
        ref = blobs.new_ref()
        shared.put(ref, text.encode())
        proto, t = connect(factory)
        send(proto, tipo="uppercase", contenido_ref=ref, refs=True, tarea_id="d")
        send(proto, tipo="word_count", contenido_ref=ref, tarea_id="c")
        for _ in range(5):
            clock.advance(0)
        got = {r["tarea_id"]: r for r in replies(t)}
        assert got["c"]["resultado"] == 2000
        out = got["d"]["resultado_ref"]
        assert shared.objects[out["ref"]][0] == text.upper().encode()
        assert got["d"]["worker"] == "w1/0"
        assert bodies and all(len(b) < 200 and b"hola" not in b for b in bodies)
        assert json.loads(bodies[0])["contenido_ref"] == ref


class MessageTests(SynchronousTestCase):
    """
    The broker messages of reference tasks and results.
    """

    def test_round_trip(self) -> None:
        """
        A L{wire.RefArg} task and a L{wire.ResultRef} reply survive encoding
        and decoding with their types.
        """
        arg = wire.RefArg(contenido_ref=blobs.new_ref(), refs=True)
        tipo, back, who, _ = messages.decode_task(messages.encode_task("uppercase", arg, "ana"))
        assert (tipo, back, who, type(back)) == ("uppercase", arg, "ana", wire.RefArg)
        out = wire.ResultRef(ref="r", bytes=3, sha256="x", url=None, expira=None)
        res, worker = messages.decode_reply(messages.encode_result(out, "w/1"))  # type: ignore
        assert (res, type(res), worker) == (out, wire.ResultRef, "w/1")
