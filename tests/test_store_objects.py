"""
Records that hold objects (C{docs/blobs.md}): on every store (memory,
SQLite, a real PostgreSQL) a result stored as an object reads back as a
L{pfo3.wire.ResultRef}, a replay answers C{resultado_ref} as the first reply
did, and forgetting a record (by age, or by the memory store's bound) hands
its objects' references to C{on_forget}, which the orchestrator points at
the object storage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from pfo3 import blobs, wire
from pfo3.blobs.executor import BlobExecutor
from pfo3.blobs.requests import BlobPolicy
from pfo3.executor import LocalExecutor
from pfo3.orchestrator import Orchestrator, replay
from pfo3.store import ANONYMOUS, IStore, MemoryStore, Record, SQLStore
from pfo3.store._sql import SQLITE
from pfo3.tasks import default_registry
from pfo3.testing import SynchronousThreadPool

from .pgdb import Database, pg_database  # noqa: F401
from .test_blobs_protocol import PresigningBlobs
from .test_store import _POSTGRESQL, _SQLITE, Make, _builder, _sleep, clocked, rec  # noqa: F401


@pytest.fixture(params=["memory", _SQLITE, _POSTGRESQL])
def make(request: Any, tmp_path: Path) -> Iterator[Make]:
    """
    Builds stores of one kind (L{tests.test_store}'s fixture of that name).
    """
    yield from _builder(request, tmp_path)


UPLOAD = "u" + "1" * 32
RESULT = "r" + "2" * 32


def result_ref(ref: str = RESULT, url: Any = "http://s3.test/old?GET") -> wire.ResultRef:
    return wire.ResultRef(ref=ref, bytes=5, sha256="ab" * 32, url=url, expira=10.0)


def with_objects(tarea_id: str, terminada: float = 12.5, content: str = UPLOAD,
                 result: str = RESULT) -> Record:
    return Record(
        ANONYMOUS, tarea_id, "uppercase", wire.RefArg(contenido_ref=content, refs=True), "ok",
        "127.0.0.1:5", 10.0, iniciada=10.25, terminada=terminada,
        resultado=result_ref(result), worker=0)


@pytest_twisted.inlineCallbacks
def test_result_reference_reads_back_as_one(make: Make) -> Any:
    """
    A record whose result is a L{wire.ResultRef} reads back as one, before
    and after it is written; C{op: estado} shows it as C{resultado_ref};
    replaying it writes the same C{resultado_ref} line as the first reply,
    while a dict result that merely looks like one stays a C{resultado}.
    """
    store = make()
    yield store.start()
    store.record(with_objects("o"))
    store.record(rec("d", resultado=dict(result_ref())))
    first = wire.encode_reply(wire.TaskResult("o", result_ref(), 0))
    for _ in range(2):
        found = yield store.get(ANONYMOUS, "o")
        assert type(found.resultado) is wire.ResultRef
        assert found.resultado == result_ref()
        assert found.describe()["resultado_ref"] == result_ref()
        assert "resultado" not in found.describe()
        again = replay(found)
        assert isinstance(again, wire.TaskResult)
        assert wire.encode_reply(again) == first
        plain = yield store.get(ANONYMOUS, "d")
        assert type(plain.resultado) is dict
        assert "resultado" in json.loads(wire.encode_reply(replay(plain)))
        yield store.flush()
    yield store.stop()


@pytest_twisted.inlineCallbacks
def test_purge_hands_over_the_objects_of_forgotten_records(make: Make) -> Any:
    """
    Purging by age gives C{on_forget} the result objects of the records it
    deleted, and only theirs: not those of records kept, nor anything for
    records without objects, nor uploads (which other tasks may use).
    """
    store = make()
    forgotten: List[List[str]] = []
    store.on_forget = forgotten.append
    yield store.start()
    store.record(with_objects("old"))
    store.record(rec("plain"))
    young = "u" + "3" * 32, "r" + "4" * 32
    store.record(with_objects("young", terminada=50.0, content=young[0], result=young[1]))
    yield store.flush()
    n = yield store.purge(20.0)
    assert n == 2
    assert forgotten == [[RESULT]]
    assert (yield store.get(ANONYMOUS, "young")) is not None
    yield store.purge(20.0)
    assert len(forgotten) == 1
    yield store.purge(60.0)
    assert forgotten[1] == [young[1]]
    yield store.stop()


def test_memory_bound_hands_over_the_objects_of_evicted_records() -> None:
    """
    The memory store's bound forgets whole generations: the objects of the
    records it drops go to C{on_forget}, those of a task recorded again in
    the newer generation do not.
    """
    store = MemoryStore(reactor, max_records=4)  # type: ignore[arg-type]
    forgotten: List[str] = []
    store.on_forget = forgotten.extend
    refs = [("u%032x" % i, "r%032x" % i) for i in range(4)]
    store.record(with_objects("a", content=refs[0][0], result=refs[0][1]))
    store.record(with_objects("b", content=refs[1][0], result=refs[1][1]))  # turn: a, b old
    store.record(with_objects("b", content=refs[1][0], result=refs[1][1]))  # b again, young
    store.record(with_objects("c", content=refs[2][0], result=refs[2][1]))  # turn: a goes
    assert forgotten == [refs[0][1]]
    assert store.evicted == 2


@pytest_twisted.inlineCallbacks
def test_orchestrator_deletes_objects_with_records_and_replays_refs(
        clocked: Tuple[IStore, Clock]) -> Any:  # noqa: F811
    """
    On every store, through the orchestrator: a durable task with
    C{contenido_ref} and C{"refs": true} answers C{resultado_ref}; its
    resubmission replays C{resultado_ref} (not C{resultado}) with a freshly
    presigned URL; once the retention purges its record, its result object
    is deleted, and neither its upload (other tasks may use it: uploads go
    by age) nor an unrelated object is.
    """
    store, clock = clocked
    yield store.start()
    storage = PresigningBlobs()
    policy = BlobPolicy(storage, threshold=10)
    registry = default_registry(entry_points=False)
    executor = BlobExecutor(LocalExecutor(reactor, SynchronousThreadPool()), policy)
    orch = Orchestrator(registry, executor, reactor, store=store, blobs=policy)
    upload = blobs.new_ref()
    other = blobs.new_ref()
    yield storage.put(upload, b"hola mundo " * 10)
    yield storage.put(other, b"otro")
    line = json.dumps({"tarea_id": "big", "tipo": "uppercase", "contenido_ref": upload,
                       "refs": True, "esperar": True}).encode()
    first = yield maybeDeferred(orch.session().handle, wire.decode_request(line, registry))
    out = json.loads(wire.encode_reply(first))
    ref = out["resultado_ref"]["ref"]
    assert storage.objects[ref][0] == b"HOLA MUNDO " * 10
    yield store.flush()
    urls: List[str] = []
    storage.presign_get = lambda r, s: maybeDeferred(  # type: ignore[method-assign]
        lambda: urls.append(r) or blobs.Presigned(f"http://s3.test/{r}?fresh", 5e9, "GET"))
    again = yield maybeDeferred(orch.session().handle, wire.decode_request(line, registry))
    replayed = json.loads(wire.encode_reply(again))
    assert "resultado" not in replayed
    assert replayed["resultado_ref"]["url"] == f"http://s3.test/{ref}?fresh"
    assert replayed["resultado_ref"]["expira"] == 5e9
    assert {k: v for k, v in replayed["resultado_ref"].items() if k not in ("url", "expira")} \
        == {k: v for k, v in out["resultado_ref"].items() if k not in ("url", "expira")}
    assert urls == [ref] and orch.completed == 1
    clock.advance(time.time() + 100 + 11)
    for _ in range(50):
        if ref not in storage.objects:
            break
        yield _sleep(0.05)
    assert ref not in storage.objects
    assert upload in storage.objects and other in storage.objects
    yield store.stop()


@pytest_twisted.inlineCallbacks
def test_sqlite_database_of_schema_1_is_upgraded(tmp_path: Path) -> Any:
    """
    A SQLite database written by the previous schema (version 1) is
    upgraded in place: its records still read, and new ones keep their
    result references and objects.
    """
    import sqlite3

    from pfo3.store._sql import MIGRATIONS

    path = str(tmp_path / "v1.db")
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("CREATE TABLE pfo3_schema_version (version INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO pfo3_schema_version VALUES (1)")
    conn.execute("INSERT INTO pfo3_tareas (owner, tarea_id, tipo, contenido, estado, resultado,"
                 " aceptada, terminada) VALUES ('', 'viejo', 'uppercase', '\"a\"', 'ok',"
                 " '\"A\"', 1.0, 2.0)")
    conn.commit()
    conn.close()
    store = SQLStore(SQLITE, path, Clock(), reactor=reactor)
    forgotten: List[str] = []
    store.on_forget = forgotten.extend
    yield store.start()
    old = yield store.get(ANONYMOUS, "viejo")
    assert (old.estado, old.resultado) == ("ok", "A")
    store.record(with_objects("nuevo"))
    yield store.flush()
    new = yield store.get(ANONYMOUS, "nuevo")
    assert new.resultado == result_ref() and type(new.resultado) is wire.ResultRef
    assert (yield store.purge(20.0)) == 2
    assert forgotten == [RESULT]
    yield store.stop()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM pfo3_schema_version ORDER BY version"
                        ).fetchall() == [(1,), (2,)]
    conn.close()
