"""
The same tests of the L{IStore} contract against every store: memory,
SQLite and a real PostgreSQL (a database of its own, see L{tests.pgdb}).
They run on the real reactor: the SQL stores use adbapi's threads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock, deferLater
from zope.interface.verify import verifyObject

from pfo3 import wire
from pfo3.errors import StoreUnavailable
from pfo3.executor import LocalExecutor
from pfo3.orchestrator import Orchestrator
from pfo3.store import ANONYMOUS, IStore, MemoryStore, Record, SQLStore, from_url
from pfo3.store._sql import MAX_CONTENIDO, POSTGRESQL, SCHEMA_VERSION, SQLITE
from pfo3.tasks import default_registry
from pfo3.testing import SynchronousThreadPool

from .conftest import free_port
from .pgdb import Database, pg_database  # noqa: F401

Make = Callable[[], IStore]


_SQLITE = pytest.param("sqlite", marks=pytest.mark.integration)
_POSTGRESQL = pytest.param("postgresql", marks=pytest.mark.integration)


@pytest.fixture(params=["memory", _SQLITE, _POSTGRESQL])
def make(request: Any, tmp_path: Path) -> Iterator[Make]:
    """
    Builds stores of one kind; for the databases every store built shares
    the same database, so a second one sees what the first wrote.
    """
    yield from _builder(request, tmp_path)


@pytest.fixture(params=[_SQLITE, _POSTGRESQL])
def make_db(request: Any, tmp_path: Path) -> Iterator[Make]:
    """
    L{make}, for the stores that keep records in a database.
    """
    yield from _builder(request, tmp_path)


def _builder(request: Any, tmp_path: Path) -> Iterator[Make]:
    built: List[IStore] = []
    kind = request.param
    if kind == "memory":
        shared = MemoryStore(reactor)  # type: ignore[arg-type]

        def build() -> IStore:
            return shared
    elif kind == "sqlite":
        def build() -> IStore:
            store = from_url(f"sqlite:{tmp_path / 'store.db'}", reactor)  # type: ignore[arg-type]
            assert store is not None
            built.append(store)
            return store
    else:
        db: Database = request.getfixturevalue("pg_database")

        def build() -> IStore:
            store = from_url(db.url, reactor)  # type: ignore[arg-type]
            assert store is not None
            built.append(store)
            return store
    yield build
    for store in built:
        pool = getattr(store, "_pool", None)
        if pool is not None and pool.running:
            pool.close()


def rec(tarea_id: str, estado: str = "ok", owner: str = ANONYMOUS, **kw: Any) -> Record:
    kw.setdefault("resultado", "HOLA" if estado == "ok" else None)
    kw.setdefault("terminada", 12.5 if estado != "en_curso" else None)
    return Record(owner, tarea_id, "uppercase", "hola", estado, "127.0.0.1:5", 10.0,
                  iniciada=10.25, worker=0, **kw)


@pytest_twisted.inlineCallbacks
def test_provides_the_interface(make: Make) -> Any:
    """
    Every store provides L{IStore}, and starts.
    """
    store = make()
    yield store.start()
    assert verifyObject(IStore, store)
    yield store.stop()


@pytest_twisted.inlineCallbacks
def test_record_and_get(make: Make) -> Any:
    """
    A recorded task is found with every field; before and after it is
    written.
    """
    store = make()
    yield store.start()
    store.record(rec("a", resultado={"lista": [1, "dos"]}))
    found = yield store.get(ANONYMOUS, "a")
    yield store.flush()
    again = yield store.get(ANONYMOUS, "a")
    for r in (found, again):
        assert (r.tarea_id, r.tipo, r.estado, r.resultado, r.worker, r.peer) == (
            "a", "uppercase", "ok", {"lista": [1, "dos"]}, 0, "127.0.0.1:5")
        assert (r.aceptada, r.iniciada, r.terminada) == (10.0, 10.25, 12.5)
    assert (yield store.get(ANONYMOUS, "nada")) is None
    yield store.stop()


@pytest_twisted.inlineCallbacks
def test_newer_state_replaces(make: Make) -> Any:
    """
    A task recorded running and then finished reads finished, whether the
    two updates were written together or apart.
    """
    store = make()
    yield store.start()
    running = rec("r", "en_curso")
    store.record(running)
    yield store.flush()
    error = rec("r", "error", codigo="timeout", mensaje="tarde")
    store.record(error)
    yield store.flush()
    r = yield store.get(ANONYMOUS, "r")
    assert (r.estado, r.codigo, r.mensaje, r.terminada) == ("error", "timeout", "tarde", 12.5)
    yield store.stop()


@pytest_twisted.inlineCallbacks
def test_record_done(make: Make) -> Any:
    """
    A task recorded with C{record_done} reads as the full record of a task
    accepted, started and ended C{ok} at that moment, before and after it
    is written; a later C{record} of the same task replaces it, and so
    does a later C{record_done}.
    """
    store = make()
    yield store.start()
    store.record_done("ana", "d", "uppercase", "hola", "HOLA", 3, "10.0.0.1:7", 20.5, "h1")
    found = yield store.get("ana", "d")
    yield store.flush()
    again = yield store.get("ana", "d")
    for r in (found, again):
        assert (r.owner, r.tarea_id, r.tipo, r.estado, r.resultado, r.worker,
                r.peer, r.huella, r.codigo, r.mensaje) == (
            "ana", "d", "uppercase", "ok", "HOLA", 3, "10.0.0.1:7", "h1", None, None)
        assert (r.aceptada, r.iniciada, r.terminada) == (20.5, 20.5, 20.5)
    assert (yield store.get(ANONYMOUS, "d")) is None
    store.record(rec("d", "error", owner="ana", codigo="interno", mensaje="no"))
    yield store.flush()
    assert (yield store.get("ana", "d")).estado == "error"
    store.record_done("ana", "d", "reverse", "x", "x", 1, "-", 30.0, None)
    yield store.flush()
    r = yield store.get("ana", "d")
    assert (r.tipo, r.estado, r.terminada, r.huella) == ("reverse", "ok", 30.0, None)
    yield store.stop()


@pytest_twisted.inlineCallbacks
def test_owners_are_separate(make: Make) -> Any:
    """
    The same C{tarea_id} of two owners is two records; each owner reads
    only its own.
    """
    store = make()
    yield store.start()
    store.record(rec("x", owner="ana", resultado="A"))
    store.record(rec("x", owner="beto", resultado="B"))
    yield store.flush()
    assert (yield store.get("ana", "x")).resultado == "A"
    assert (yield store.get("beto", "x")).resultado == "B"
    assert (yield store.get(ANONYMOUS, "x")) is None
    yield store.stop()


@pytest_twisted.inlineCallbacks
def test_purge(make: Make) -> Any:
    """
    Purging forgets records that ended (or, unfinished, were accepted)
    before the given time, and no others.
    """
    store = make()
    yield store.start()
    store.record(rec("old", terminada=50.0))
    store.record(rec("new", terminada=150.0))
    store.record(rec("stuck", "en_curso"))  # accepted at 10
    store.record_done(ANONYMOUS, "done-old", "uppercase", "a", "A", 0, "-", 60.0, None)
    store.record_done(ANONYMOUS, "done-new", "uppercase", "b", "B", 0, "-", 160.0, None)
    yield store.flush()
    yield store.purge(100.0)
    for gone in ("old", "stuck", "done-old"):
        assert (yield store.get(ANONYMOUS, gone)) is None
    for kept in ("new", "done-new"):
        assert (yield store.get(ANONYMOUS, kept)) is not None
    yield store.stop()


@pytest_twisted.inlineCallbacks
def test_survives_a_restart(make_db: Make) -> Any:
    """
    A database store's records outlive the store: a new one on the same
    database reads them (the schema is upgraded idempotently).
    """
    make = make_db
    first = make()
    yield first.start()
    first.record(rec("p"))
    yield first.stop()
    second = make()
    yield second.start()
    assert (yield second.get(ANONYMOUS, "p")).resultado == "HOLA"
    yield second.stop()


@pytest_twisted.inlineCallbacks
def test_large_contenido_is_cut(make_db: Make) -> Any:
    """
    A database keeps at most L{MAX_CONTENIDO} characters of C{contenido},
    flagged as cut; the result is kept whole.
    """
    store = make_db()
    yield store.start()
    big = "x" * (3 * MAX_CONTENIDO)
    store.record(Record(ANONYMOUS, "big", "reverse", big, "ok", "-", 1.0, resultado=big,
                        terminada=2.0))
    yield store.flush()
    r = yield store.get(ANONYMOUS, "big")
    assert r.contenido_truncado and len(r.contenido) == MAX_CONTENIDO
    assert r.resultado == big
    yield store.stop()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_schema_versioned_and_idempotent(pg_database: Database) -> Any:  # noqa: F811
    """
    Two stores starting on one database leave one row per schema version.
    """
    a = from_url(pg_database.url, reactor)  # type: ignore[arg-type]
    b = from_url(pg_database.url, reactor)  # type: ignore[arg-type]
    assert a is not None and b is not None
    yield a.start()
    yield b.start()
    rows = pg_database.query("SELECT version FROM pfo3_schema_version ORDER BY version")
    assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    yield a.stop()
    yield b.stop()


# -- failure behaviour ----------------------------------------------------------


def _sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_nothing_listens(tmp_path: Path) -> Any:
    """
    A PostgreSQL store pointed where nothing listens starts, takes records
    without blocking, fails lookups with L{StoreUnavailable} and, at stop,
    counts what it could not write.
    """
    store = from_url(f"postgresql://postgres@127.0.0.1:{free_port()}/x", reactor)  # type: ignore[arg-type]
    assert isinstance(store, SQLStore)
    yield store.start()
    assert not store.ready
    for i in range(10):
        store.record(rec(f"t{i}"))
    assert store.pending == 10
    with pytest.raises(StoreUnavailable):
        yield store.get(ANONYMOUS, "otra")
    assert (yield store.get(ANONYMOUS, "t3")).resultado == "HOLA"  # still queued
    yield store.stop()
    assert store.dropped == 10 and store.failures >= 2


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_sqlite_on_a_read_only_path(tmp_path: Path) -> Any:
    """
    A SQLite store whose file cannot be created (a read-only place, even
    for root: C{/proc}) behaves the same: nothing raises, the loss is
    counted.
    """
    store = from_url("sqlite:/proc/pfo3-no-such-dir/store.db", reactor)  # type: ignore[arg-type]
    assert isinstance(store, SQLStore)
    yield store.start()
    store.record(rec("a"))
    yield store.stop()
    assert (store.ready, store.dropped) == (False, 1)


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_bounded_queue() -> Any:
    """
    Past C{max_pending} queued updates new ones are dropped and counted.
    """
    store = SQLStore(POSTGRESQL, f"postgresql://postgres@127.0.0.1:{free_port()}/x",
                     reactor, max_pending=5)  # type: ignore[arg-type]
    yield store.start()
    for i in range(8):
        store.record(rec(f"t{i}"))
    assert (store.pending, store.dropped) == (5, 3)
    yield store.stop()
    assert store.dropped == 8


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_database_goes_away_and_comes_back(pg_database: Database) -> Any:  # noqa: F811
    """
    The database refuses connections mid-run (its connections ended, new
    ones refused): updates queue up and are retried; once it is back every
    one is written, none lost.
    """
    store = SQLStore(POSTGRESQL, pg_database.url, reactor,  # type: ignore[arg-type]
                     max_retry_delay=0.3)
    yield store.start()
    store.record(rec("before"))
    yield store.flush()
    pg_database.refuse_connections()
    try:
        for i in range(20):
            store.record(rec(f"during{i}"))
        import psycopg

        # flush says the write failed; the updates stay queued.
        with pytest.raises(psycopg.Error):
            yield store.flush()
        assert store.failures >= 1 and store.pending == 20
    finally:
        pg_database.accept_connections()
    for _ in range(50):
        if store.pending == 0:
            break
        yield _sleep(0.1)
    assert store.pending == 0 and store.dropped == 0
    count = pg_database.query("SELECT count(*) FROM pfo3_tareas")
    assert count == [(21,)]
    yield store.stop()


@pytest_twisted.inlineCallbacks
def test_texts_no_database_can_hold(make: Make) -> Any:
    """
    A C{tarea_id} with a lone surrogate (JSON input may carry one) and a
    message with NUL are recorded and found again under the same id; they
    never make a batch fail.
    """
    store = make()
    yield store.start()
    odd = "id-\ud800-\x00"
    store.record(rec(odd, "error", codigo="tarea_fallida", mensaje="nul \x00 aquí",
                     resultado=None))
    store.record(rec("normal"))
    yield store.flush()
    found = yield store.get(ANONYMOUS, odd)
    assert found is not None and found.estado == "error"
    assert (yield store.get(ANONYMOUS, "normal")) is not None
    assert getattr(store, "dropped", 0) == 0
    yield store.stop()


def test_which_failures_are_retried() -> None:
    """
    A batch is retried when the database could not be reached or was busy,
    dropped when the database refuses its data.
    """
    import sqlite3

    from twisted.enterprise.adbapi import ConnectionLost

    from pfo3.store._sql import SQLITE

    assert SQLITE.transient(sqlite3.OperationalError("database is locked"))
    assert SQLITE.transient(ConnectionLost())
    assert not SQLITE.transient(sqlite3.IntegrityError("NOT NULL constraint failed"))
    assert SQLITE.transient(RuntimeError("anything else"))


@pytest.fixture(params=["memory", _SQLITE, _POSTGRESQL])
def clocked(request: Any, tmp_path: Path) -> Iterator[Tuple[IStore, Clock]]:
    """
    A store of each kind whose timers (batches, the periodic purge) run on
    a fake clock, with a retention of 100 s; its database work still runs
    on adbapi's threads and the real reactor.
    """
    clock = Clock()
    store: IStore
    if request.param == "memory":
        store = MemoryStore(clock, max_age=100)
    elif request.param == "sqlite":
        store = SQLStore(SQLITE, str(tmp_path / "s.db"), clock, max_age=100, reactor=reactor)
    else:
        db: Database = request.getfixturevalue("pg_database")
        store = SQLStore(POSTGRESQL, db.url, clock, max_age=100, reactor=reactor)
    yield store, clock
    pool = getattr(store, "_pool", None)
    if pool is not None and pool.running:
        pool.close()


@pytest_twisted.inlineCallbacks
def test_orchestrator_on_every_store(clocked: Tuple[IStore, Clock]) -> Any:
    """
    On every store: a background task is answered C{aceptada} and its end
    is read with C{op: estado} from another connection; resubmitting it
    replays the recorded reply without running it; the periodic purge
    forgets it once it is older than the retention.
    """
    store, clock = clocked
    yield store.start()
    registry = default_registry(entry_points=False)
    orch = Orchestrator(registry, LocalExecutor(reactor, SynchronousThreadPool()), reactor,
                        store=store)
    a = orch.session()
    request = wire.decode_request(
        b'{"tarea_id": "bg", "tipo": "sleep", "contenido": 0.05, "esperar": false}', registry)
    accepted = yield maybeDeferred(a.handle, request)
    assert isinstance(accepted, wire.AcceptedResult)
    a.close()
    yield _sleep(0.2)
    yield store.flush()
    b = orch.session()
    estado = yield maybeDeferred(
        b.handle, wire.decode_request(b'{"op": "estado", "tarea_id": "bg"}', registry))
    assert (estado.resultado["estado"], estado.resultado["resultado"]) == (
        "ok", "Esperé 0.05 segundos")
    before = orch.completed
    again = yield maybeDeferred(b.handle, wire.decode_request(
        b'{"tarea_id": "bg", "tipo": "sleep", "contenido": 0.05, "esperar": true}', registry))
    assert again.resultado == "Esperé 0.05 segundos" and orch.completed == before
    # The store's clock reads 0 and the task ended now (real time): move the
    # fake clock past the end plus the retention, then let the purge run.
    clock.advance(time.time() + 100 + 11)
    for _ in range(50):
        if (yield store.get(ANONYMOUS, "bg")) is None:
            break
        yield _sleep(0.05)
    assert (yield store.get(ANONYMOUS, "bg")) is None
    yield store.stop()


def test_memory_bound_keeps_the_newest_half() -> None:
    """
    The memory store never holds more than C{max_records} tasks, always
    holds at least the newest half of them, and counts what it forgot; a
    task recorded again (running, then ended) is held once.
    """
    store = MemoryStore(reactor, max_records=10)  # type: ignore[arg-type]
    for i in range(1, 101):
        if i % 3:
            store.record_done(ANONYMOUS, f"t{i}", "uppercase", "x", "X", 0, "-", float(i), None)
        else:
            store.record(rec(f"t{i}", "en_curso"))
            store.record(rec(f"t{i}", "ok"))
        assert len(store) <= 10
        newest = range(max(1, i - 4), i + 1)
        assert all(store.get(ANONYMOUS, f"t{n}").result is not None for n in newest), i
    assert 5 <= len(store) <= 10
    assert store.evicted >= 100 - 10
    assert store.get(ANONYMOUS, "t1").result is None

