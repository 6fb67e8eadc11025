"""
The SQL store: SQLite and PostgreSQL through one implementation over
C{twisted.enterprise.adbapi}, so database calls run on the pool's threads and
never block the reactor.

What differs between the two databases is one L{Dialect} each: the DB-API
module and how to connect, the parameter style, the statements run on a new
connection and the lock that serialises schema upgrades.  The statements
themselves are the same text (C{%s} placeholders, C{INSERT ... ON CONFLICT
DO UPDATE}, which both understand).

Writes are batched: L{SQLStore.record} only puts the record in a dict of
pending updates (a newer state of a task replaces an older one there); one
C{executemany} per batch writes them, one batch at a time, every
C{batch_interval} seconds or at once when the batch is large.  A batch that
fails goes back to the queue (behind any newer update of the same task) and
is retried with a growing delay.  The queue is bounded: past C{max_pending}
updates, new ones are dropped, counted in C{dropped} and logged.  Tasks never
wait for any of it.
"""

from __future__ import annotations

import json
import sys
import threading
from json.encoder import encode_basestring as _quote
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.enterprise import adbapi
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfo3.errors import StoreUnavailable
from pfo3.store import DEFAULT_MAX_AGE, ForgetObjects, IStore, Record, done_record, objects_of
from pfo3.store._memory import purge_interval
from pfo3.wire import ResultRef

log = Logger(namespace="pfo3.store")

#: The schema version this code writes; L{MIGRATIONS} brings any older one
#: up to it.
SCHEMA_VERSION = 2

#: Longest C{contenido} kept, as JSON text; a longer one is cut and flagged.
MAX_CONTENIDO = 4096

COLUMNS = (
    "owner", "tarea_id", "tipo", "contenido", "contenido_truncado", "huella", "estado",
    "resultado", "codigo", "mensaje", "worker", "peer", "aceptada", "iniciada", "terminada",
    "resultado_ref", "objetos",
)

#: Statements that take a schema from version N-1 to N, by N.  Each is
#: idempotent, so two orchestrators upgrading at once cannot break it.
MIGRATIONS: Dict[int, Sequence[str]] = {
    1: (
        "CREATE TABLE IF NOT EXISTS pfo3_tareas ("
        " owner TEXT NOT NULL,"
        " tarea_id TEXT NOT NULL,"
        " tipo TEXT NOT NULL,"
        " contenido TEXT,"
        " contenido_truncado INTEGER NOT NULL DEFAULT 0,"
        " huella TEXT,"
        " estado TEXT NOT NULL,"
        " resultado TEXT,"
        " codigo TEXT,"
        " mensaje TEXT,"
        " worker TEXT,"
        " peer TEXT,"
        " aceptada DOUBLE PRECISION NOT NULL,"
        " iniciada DOUBLE PRECISION,"
        " terminada DOUBLE PRECISION,"
        " PRIMARY KEY (owner, tarea_id))",
        "CREATE INDEX IF NOT EXISTS pfo3_tareas_fin"
        " ON pfo3_tareas (COALESCE(terminada, aceptada))",
    ),
    # A result stored as an object (its reference, size, SHA-256, URL) in
    # a column of its own, so that it reads back as one; and the references
    # of the objects that go with a record, so that purging it deletes them.
    2: (
        "ALTER TABLE pfo3_tareas ADD COLUMN IF NOT EXISTS resultado_ref TEXT",
        "ALTER TABLE pfo3_tareas ADD COLUMN IF NOT EXISTS objetos TEXT",
    ),
}

_UPSERT = (
    "INSERT INTO pfo3_tareas (" + ", ".join(COLUMNS) + ") VALUES ("
    + ", ".join(["%s"] * len(COLUMNS)) + ") ON CONFLICT (owner, tarea_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[2:])
)
_SELECT = (
    "SELECT " + ", ".join(COLUMNS) + " FROM pfo3_tareas WHERE owner = %s AND tarea_id = %s"
)
_PURGE = "DELETE FROM pfo3_tareas WHERE COALESCE(terminada, aceptada) < %s"
# Records that hold objects first, returning their references: one
# statement, so the references are exactly those of the records deleted.
_PURGE_OBJECTS = (
    "DELETE FROM pfo3_tareas WHERE COALESCE(terminada, aceptada) < %s"
    " AND objetos IS NOT NULL RETURNING objetos"
)


def _executemany(txn: Any, upsert: str, rows: List[Tuple[Any, ...]]) -> None:
    txn.executemany(upsert, rows)


_COLS = ", ".join(COLUMNS)
_PG_BATCH = (
    "CREATE TEMP TABLE IF NOT EXISTS pfo3_lote (LIKE pfo3_tareas) ON COMMIT DELETE ROWS",
    f"COPY pfo3_lote ({_COLS}) FROM STDIN",
    f"INSERT INTO pfo3_tareas ({_COLS}) SELECT {_COLS} FROM pfo3_lote"
    " ON CONFLICT (owner, tarea_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[2:]),
)


def _copy(txn: Any, upsert: str, rows: List[Tuple[Any, ...]]) -> None:
    # COPY into a temporary table, then one upsert from it: about a tenth
    # of the client CPU of an executemany (psycopg adapts each parameter
    # in Python; COPY rows are formatted in C).
    create, copy, insert = _PG_BATCH
    txn.execute(create)
    with txn.copy(copy) as out:
        for row in rows:
            out.write_row(row)
    txn.execute(insert)


class Dialect:
    """
    What one database does differently.

    @ivar name: For logs.
    @ivar module: The DB-API module adbapi imports.
    @ivar pool_args: C{(args, kwargs)} for L{adbapi.ConnectionPool}, from the
        target (a path or a URL).
    @ivar sql: Turns a statement written with C{%s} into this module's style.
    @ivar schema_lock: A statement that serialises schema upgrades between
        processes, or L{None}.
    @ivar write: C{write(txn, upsert, rows)} writes one batch.
    """

    def __init__(
        self, name: str, module: str,
        pool_args: Callable[[str], Tuple[Tuple[Any, ...], Dict[str, Any]]],
        sql: Callable[[str], str], schema_lock: Optional[str],
        write: Callable[[Any, str, List[Tuple[Any, ...]]], None] = _executemany,
    ) -> None:
        self.name = name
        self.module = module
        self.pool_args = pool_args
        self.sql = sql
        self.schema_lock = schema_lock
        self.write = write

    def migrate(self, txn: Any, statement: str) -> None:
        """
        Run one statement of L{MIGRATIONS}.
        """
        txn.execute(statement)

    def transient(self, error: BaseException) -> bool:
        """
        @return: Whether a failed batch is worth retrying: the database could
            not be reached or was busy, as opposed to refusing the data.
        """
        if isinstance(error, adbapi.ConnectionLost):
            return True
        module = sys.modules.get(self.module)
        if module is None:
            return True
        kinds = tuple(getattr(module, n) for n in ("OperationalError", "InterfaceError")
                      if hasattr(module, n))
        database_error = getattr(module, "DatabaseError", None)
        if database_error is not None and isinstance(error, database_error):
            return isinstance(error, kinds)
        return True


def _sqlite_open(conn: Any) -> None:
    # WAL: readers do not wait for the writer; NORMAL sync is durable
    # across a crash of the process (not of the machine) and much faster.
    # The default isolation level stays: adbapi commits and rolls back
    # itself, which autocommit mode would silently defeat.
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")


def _sqlite_args(path: str) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    return (path,), {
        "check_same_thread": False, "cp_min": 1, "cp_max": 1, "cp_openfun": _sqlite_open,
    }


def _pg_args(url: str) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    kwargs: Dict[str, Any] = {"cp_min": 1, "cp_max": 3, "cp_reconnect": True}
    if "connect_timeout" not in url:
        kwargs["connect_timeout"] = 5
    return (url,), kwargs


class _SQLiteDialect(Dialect):
    """
    SQLite has no C{ADD COLUMN IF NOT EXISTS}: the column is looked for
    first.
    """

    def migrate(self, txn: Any, statement: str) -> None:
        words = statement.split()
        if words[:2] == ["ALTER", "TABLE"] and words[3:8] == ["ADD", "COLUMN", "IF", "NOT",
                                                                "EXISTS"]:
            table, column = words[2], words[8]
            txn.execute(f"PRAGMA table_info({table})")
            if any(row[1] == column for row in txn.fetchall()):
                return
            statement = statement.replace(" IF NOT EXISTS", "", 1)
        txn.execute(statement)


SQLITE = _SQLiteDialect("sqlite", "sqlite3", _sqlite_args, lambda s: s.replace("%s", "?"),
                        None)
POSTGRESQL = Dialect(
    "postgresql", "psycopg", _pg_args, lambda s: s,
    # Any constant key: orchestrators sharing a database upgrade one at a time.
    "SELECT pg_advisory_xact_lock(7081633)",
    _copy,
)


def _clean(text: Optional[str]) -> Optional[str]:
    """
    @return: C{text} as a database can hold it: a lone surrogate (JSON input
        may carry one) becomes its C{\\uXXXX} escape and NUL becomes
        C{\\u0000}, so that no client's text can make a batch fail for ever.
    """
    if text is None:
        return None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    return text


def _json(value: Any) -> Optional[str]:
    if value is None:
        return None
    if type(value) is str:
        return _clean(_quote(value))
    if type(value) is int:
        return int.__repr__(value)
    try:
        return _clean(json.dumps(value, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError):
        return _clean(_quote(repr(value)))


def _row(r: Record) -> Tuple[Any, ...]:
    contenido = _json(r.contenido)
    truncado = r.contenido_truncado
    if contenido is not None and len(contenido) > MAX_CONTENIDO:
        contenido = contenido[:MAX_CONTENIDO]
        truncado = True
    resultado = r.resultado if r.estado == "ok" else None
    resultado_ref = None
    objetos = None
    if type(resultado) is ResultRef:
        resultado_ref, resultado = resultado, None
        objetos = " ".join(objects_of(resultado_ref))
    return (
        _clean(r.owner), _clean(r.tarea_id), _clean(r.tipo), contenido, int(truncado),
        r.huella, r.estado, _json(resultado), r.codigo,
        _clean(r.mensaje), _json(r.worker), _clean(r.peer), r.aceptada, r.iniciada,
        r.terminada, _json(resultado_ref), objetos,
    )


def _record(row: Sequence[Any]) -> Record:
    (owner, tarea_id, tipo, contenido, truncado, huella, estado, resultado, codigo,
     mensaje, worker, peer, aceptada, iniciada, terminada, resultado_ref, _) = row
    if resultado_ref is not None:
        resultado = ResultRef(json.loads(resultado_ref))
    elif resultado is not None:
        resultado = json.loads(resultado)
    return Record(
        owner, tarea_id, tipo, contenido, estado, peer, aceptada, huella=huella,
        resultado=resultado, codigo=codigo, mensaje=mensaje,
        worker=None if worker is None else json.loads(worker),
        iniciada=iniciada, terminada=terminada, contenido_truncado=bool(truncado),
    )


@implementer(IStore)
class SQLStore:
    """
    Records in a SQLite or PostgreSQL database (see the module's docstring).

    @ivar dropped: Updates given up (queue full, or still unwritten at stop).
    @ivar failures: Batches that failed since start (each is retried).
    @ivar written: Updates written since start.
    """

    on_forget: Optional[ForgetObjects] = None

    def __init__(
        self, dialect: Dialect, target: str, clock: IReactorTime, *,
        max_age: float = DEFAULT_MAX_AGE, reactor: Any = None,
        batch_interval: float = 0.02, batch_size: int = 2000, max_pending: int = 100_000,
        read_timeout: float = 2.0, max_reads: int = 1000, max_retry_delay: float = 30.0,
    ) -> None:
        """
        @param dialect: L{SQLITE} or L{POSTGRESQL}.
        @param target: The SQLite file's path, or the PostgreSQL URL.
        @param clock: Drives batches, retries, read timeouts and purges.
        @param reactor: The reactor adbapi's threads report to (the global
            one by default).
        @param batch_interval: Seconds updates wait to be written together.
        @param batch_size: A batch this large is written without waiting.
        @param max_pending: Updates queued (not yet written) past which new
            ones are dropped.
        @param read_timeout: Seconds a lookup may take before it fails with
            L{StoreUnavailable}.
        @param max_reads: Lookups outstanding past which new ones fail at
            once with L{StoreUnavailable}.
        """
        self.dialect = dialect
        self.target = target
        self.clock = clock
        self.max_age = max_age
        self.reactor = reactor
        self.batch_interval = batch_interval
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.read_timeout = read_timeout
        self.max_reads = max_reads
        self.max_retry_delay = max_retry_delay
        self.dropped = 0
        self.failures = 0
        self.written = 0
        self.ready = False
        self._pool: Optional[_Pool] = None
        self._pending: Dict[Tuple[str, str], Record] = {}
        self._writing: Optional[Dict[Tuple[str, str], Record]] = None
        self._timer: Optional[IDelayedCall] = None
        self._streak = 0
        self._reads = 0
        self._waiters: List[Deferred[None]] = []
        self._readers: List[Deferred[None]] = []
        self._purger: Optional[LoopingCall] = None
        self._stopping = False
        self._upsert = dialect.sql(_UPSERT)
        self._select = dialect.sql(_SELECT)
        self._purge = dialect.sql(_PURGE)
        self._purge_objects = dialect.sql(_PURGE_OBJECTS)

    def __repr__(self) -> str:
        return f"<SQLStore {self.dialect.name} {self.describe()}>"

    def describe(self) -> str:
        """
        @return: Where the records go, for logs (no password).
        """
        target = self.target
        if "@" in target and "://" in target:
            scheme, rest = target.split("://", 1)
            cred, host = rest.rsplit("@", 1)
            target = f"{scheme}://{cred.split(':', 1)[0]}@{host}"
        return target

    @property
    def pending(self) -> int:
        return len(self._pending) + (len(self._writing) if self._writing else 0)

    # -- life ------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        args, kwargs = self.dialect.pool_args(self.target)
        if self.reactor is not None:
            kwargs["cp_reactor"] = self.reactor
        self._pool = _Pool(self.dialect.module, *args, **kwargs)
        self._purger = LoopingCall(self._purge_old)
        self._purger.clock = self.clock
        self._purger.start(purge_interval(self.max_age), now=False)
        d = self.flush()  # creates or upgrades the schema first
        # A database that cannot be reached yet is not an error of the
        # start: the store logs it and tries again until it answers.
        return d.addErrback(lambda f: None)

    def stop(self) -> Deferred[None]:
        if self._purger is not None and self._purger.running:
            self._purger.stop()
        d = self.flush()

        def close(result: Any) -> Any:
            # Also when the flush fails or is given up on (the service's
            # deadline cancels it): the pool must be closed or abandoned.
            self._stopping = True
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            lost = len(self._pending)
            if lost:
                self.dropped += lost
                self._pending.clear()
                log.error(
                    "Results store {store}: {lost} record updates could not be written "
                    "({dropped} in all since start)",
                    store=self.describe(), lost=lost, dropped=self.dropped,
                )
            if self._pool is not None:
                if self._writing is None:
                    self._pool.close()
                else:
                    # A write is stuck (a database that does not answer):
                    # its thread cannot be interrupted, and joining it
                    # would keep the server from ever exiting.
                    log.error("Results store {store}: a write is still waiting for the "
                              "database; stopping without it", store=self.describe())
                    self._pool.abandon()
            if isinstance(result, Failure) and not result.check(CancelledError):
                return None  # the last write failed: logged, and counted above
            return result

        return d.addBoth(close)

    # -- writes ----------------------------------------------------------------

    def record(self, record: Record) -> None:
        pending = self._pending
        key = (record.owner, record.tarea_id)
        if key not in pending and len(pending) >= self.max_pending:
            self._drop(1)
            return
        pending[key] = record
        if self._timer is None and self._writing is None and not self._stopping:
            delay = 0.0 if len(pending) >= self.batch_size else self.batch_interval
            self._timer = self.clock.callLater(delay, self._attempt)

    def record_done(
        self, owner: str, tarea_id: str, tipo: str, contenido: Any, resultado: Any,
        worker: Any, peer: str, when: float, huella: Optional[str],
    ) -> None:
        self.record(done_record(owner, tarea_id, tipo, contenido, resultado, worker, peer,
                                when, huella))

    def _drop(self, n: int) -> None:
        before = self.dropped
        self.dropped += n
        # Log the first drop and then one per power of two, not every one.
        if before == 0 or (self.dropped & (self.dropped - 1)) == 0 or n > 1:
            log.warn(
                "Results store {store}: queue full ({max_pending} updates); "
                "{dropped} updates dropped since start",
                store=self.describe(), max_pending=self.max_pending, dropped=self.dropped,
            )

    def flush(self) -> Deferred[None]:
        if self._pool is None or (not self._pending and self._writing is None and self.ready):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        if self._writing is None:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._attempt()
        return d

    def _attempt(self) -> None:
        self._timer = None
        if self._writing is not None or self._pool is None:
            return
        if not self.ready:
            self._writing = {}
            d = self._pool.runInteraction(self._migrate)
            d.addCallbacks(self._migrated, self._failed)
            return
        if not self._pending:
            self._wake()
            return
        batch, self._pending = self._pending, {}
        self._writing = batch
        rows = [_row(r) for r in batch.values()]
        d = self._pool.runInteraction(self._write, rows)
        d.addCallbacks(self._written, self._failed)

    def _write(self, txn: Any, rows: List[Tuple[Any, ...]]) -> None:
        self.dialect.write(txn, self._upsert, rows)

    def _migrate(self, txn: Any) -> int:
        sql = self.dialect.sql
        if self.dialect.schema_lock:
            txn.execute(self.dialect.schema_lock)
        txn.execute("CREATE TABLE IF NOT EXISTS pfo3_schema_version ("
                    " version INTEGER PRIMARY KEY)")
        txn.execute("SELECT MAX(version) FROM pfo3_schema_version")
        current = txn.fetchall()[0][0] or 0
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database has schema version {current}, newer than this "
                f"pfo3's {SCHEMA_VERSION}")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                self.dialect.migrate(txn, statement)
            txn.execute(sql("INSERT INTO pfo3_schema_version (version) VALUES (%s)"),
                        (version,))
        return int(current)

    def _migrated(self, previous: int) -> None:
        self._writing = None
        self.ready = True
        readers, self._readers = self._readers, []
        for d in readers:
            d.callback(None)
        self._streak = 0
        if previous != SCHEMA_VERSION:
            log.info("Results store {store}: schema upgraded from version {old} to {new}",
                     store=self.describe(), old=previous, new=SCHEMA_VERSION)
        self._next()

    def _written(self, _: Any) -> None:
        assert self._writing is not None
        self.written += len(self._writing)
        self._writing = None
        if self._streak:
            log.info("Results store {store}: writing again after {n} failed attempts",
                     store=self.describe(), n=self._streak)
        self._streak = 0
        self._next()

    def _next(self) -> None:
        if self._waiters or len(self._pending) >= self.batch_size:
            self._attempt()
        elif self._pending and not self._stopping:
            self._timer = self.clock.callLater(self.batch_interval, self._attempt)
        else:
            self._wake()

    def _failed(self, failure: Failure) -> None:
        batch, self._writing = self._writing or {}, None
        self.failures += 1
        if self.ready and not self.dialect.transient(failure.value):
            # The database refuses this data: retrying would fail for ever
            # and hold up every later update.
            self._drop(len(batch))
            log.error(
                "Results store {store}: a batch of {n} updates was refused ({error}); "
                "dropped", store=self.describe(), n=len(batch),
                error=failure.getErrorMessage() or failure.type.__name__,
            )
            self._wake(failure)
            self._next()
            return
        self._streak += 1
        # Put the batch back behind anything newer, within the bound.
        pending = self._pending
        room = self.max_pending - len(pending)
        lost = 0
        for key, record in batch.items():
            if key in pending:
                continue
            if room <= 0:
                lost += 1
                continue
            pending[key] = record
            room -= 1
        if lost:
            self._drop(lost)
        delay = min(self.max_retry_delay, 0.25 * 2 ** min(self._streak, 10))
        log.warn(
            "Results store {store}: {what} failed ({error}); {pending} updates queued, "
            "retrying in {delay:g}s",
            store=self.describe(), what="writing" if self.ready else "creating the schema",
            error=failure.getErrorMessage() or failure.type.__name__,
            pending=len(pending), delay=delay,
        )
        self._wake(failure)
        readers, self._readers = self._readers, []
        for d in readers:
            d.errback(failure)
        if not self._stopping:
            self._timer = self.clock.callLater(delay, self._attempt)

    def _wake(self, failure: Optional[Failure] = None) -> None:
        """
        Answer the callers of L{flush}: the updates were written, or (with
        C{failure}) the attempt failed and they are queued again or dropped.
        """
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)

    # -- reads -----------------------------------------------------------------

    def get(self, owner: str, tarea_id: str) -> Deferred[Optional[Record]]:
        key = (owner, tarea_id)
        record = self._pending.get(key)
        if record is None and self._writing:
            record = self._writing.get(key)
        if record is not None:
            return succeed(record)
        pool = self._pool
        if pool is None or self._reads >= self.max_reads or (
            not self.ready and self._streak
        ):
            return _unavailable(tarea_id)
        self._reads += 1
        if self.ready:
            d: Deferred[Any] = pool.runQuery(self._select, (_clean(owner), _clean(tarea_id)))
        else:
            # Just started: read once the schema is there.
            d = Deferred()
            self._readers.append(d)
            d.addCallback(
                lambda _: pool.runQuery(self._select, (_clean(owner), _clean(tarea_id))))
        d.addTimeout(self.read_timeout, self.clock)

        def done(result: Any) -> Any:
            self._reads -= 1
            if isinstance(result, Failure):
                log.warn("Results store {store}: lookup failed ({error})",
                         store=self.describe(),
                         error=result.getErrorMessage() or result.type.__name__)
                return _unavailable(tarea_id)
            return _record(result[0]) if result else None

        return d.addBoth(done)

    def purge(self, before: float) -> Deferred[int]:
        if self._pool is None or not self.ready:
            return succeed(0)

        def delete(txn: Any) -> Tuple[int, List[str]]:
            txn.execute(self._purge_objects, (before,))
            held = txn.fetchall()
            refs = [ref for (objetos,) in held for ref in objetos.split()]
            txn.execute(self._purge, (before,))
            return len(held) + int(txn.rowcount or 0), refs

        def forget(result: Tuple[int, List[str]]) -> int:
            count, refs = result
            if refs and self.on_forget is not None:
                self.on_forget(refs)
            return count

        d: Deferred[int] = self._pool.runInteraction(delete).addCallback(forget)
        return d

    def _purge_old(self) -> Deferred[None]:
        d = self.purge(self.clock.seconds() - self.max_age)

        def report(result: Any) -> None:
            if isinstance(result, Failure):
                log.warn("Results store {store}: purge failed ({error})",
                         store=self.describe(), error=result.getErrorMessage())
            elif result:
                log.info("Results store {store}: purged {n} old records",
                         store=self.describe(), n=result)

        return d.addBoth(report)


def _unavailable(tarea_id: str) -> Deferred[Optional[Record]]:
    d: Deferred[Optional[Record]] = Deferred()
    d.errback(StoreUnavailable(
        "El almacén de resultados no responde; reintente más tarde.", tarea_id))
    return d


class _Connection(adbapi.Connection):
    """
    adbapi's connection, which does not try to roll back on a connection the
    driver already knows is broken (the server stopped or closed it): adbapi
    would log a traceback for the failed rollback of every such connection
    in the pool, for a failure the store reports once itself.
    """

    def rollback(self) -> None:
        if getattr(self._connection, "broken", False):  # psycopg's flag
            self._pool.disconnect(self._connection)
            return
        super().rollback()


class _Pool(adbapi.ConnectionPool):
    """
    adbapi's pool with daemon threads, and a way to stop without waiting
    for a thread stuck in the database.
    """

    connectionFactory = _Connection

    def start(self) -> None:
        # Before the pool starts its threads: a thread blocked on a silent
        # database must not keep the process alive once it stops.
        self.threadpool.threadFactory = _daemon_thread
        super().start()

    def abandon(self) -> None:
        """
        Stop taking work and forget the pool's threads and connections
        without joining them (their daemon threads end with the process).
        """
        if self.shutdownID:
            self._reactor.removeSystemEventTrigger(self.shutdownID)
            self.shutdownID = None
        if self.startID:
            self._reactor.removeSystemEventTrigger(self.startID)
            self.startID = None
        self.running = False


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    return threading.Thread(*args, daemon=True, **kwargs)
