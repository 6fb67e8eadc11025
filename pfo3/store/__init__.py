"""
The results store: a record of each task's life, shared by connections and,
with a database, by orchestrators.

L{IStore} is the seam; the orchestrator holds one (or L{None}: recording
off) and never knows which.  Implementations:

  - L{MemoryStore} (C{memory:}, the default): bounded by count and age,
    nothing on disk; also the test double.
  - L{SQLStore} over C{twisted.enterprise.adbapi}: C{sqlite:PATH} (embedded)
    and C{postgresql://...} (shared by several orchestrators).

A record is keyed by C{(owner, tarea_id)}.  The I{owner} is the identity of
whoever submitted the task: the authenticated identity once authentication
exists, L{ANONYMOUS} until then.  Every lookup takes the owner, so one
identity never sees another's tasks (C{docs/store.md}).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python import usage
from zope.interface import Attribute, Interface

from pfo3.wire import ResultRef

#: The owner of every task while pfo3 has no authentication: all anonymous
#: clients share one namespace of C{tarea_id}s.  Authenticated identities
#: are never empty, so they can never collide with it.
ANONYMOUS = ""

# The states of a task, as recorded and as C{op: estado} reports them.
ACCEPTED = "aceptada"
RUNNING = "en_curso"
OK = "ok"
ERROR = "error"
TIMEOUT = "timeout"
ABANDONED = "abandonada"

#: States after which a task never changes again.
FINISHED = frozenset((OK, ERROR, TIMEOUT, ABANDONED))

#: Finished states whose recorded reply a durable resubmission gets (an
#: abandoned task runs again instead).
REPLAYABLE = frozenset((OK, ERROR, TIMEOUT))


class Record:
    """
    One task's life.  The orchestrator creates it when the task is accepted
    and updates it as the task runs and ends; each update is handed to
    L{IStore.record}.

    @ivar owner: Whose task it is (L{ANONYMOUS} without authentication).
    @ivar tarea_id: The client's identifier (or the generated one).
    @ivar tipo: The task type's canonical name.
    @ivar contenido: The task's input: the validated value in memory; in a
        database its JSON text, cut to L{pfo3.store._sql.MAX_CONTENIDO}
        characters (then C{contenido_truncado} is true).
    @ivar huella: A fingerprint of C{tipo} and C{contenido} for durable tasks
        (sent with C{esperar}); L{None} for plain ones.
    @ivar estado: One of L{ACCEPTED}, L{RUNNING}, L{OK}, L{ERROR},
        L{TIMEOUT}, L{ABANDONED}.
    @ivar resultado: What an C{ok} task returned: a
        L{pfo3.wire.ResultRef} when it was stored as an object (read back as
        one from every store).
    @ivar codigo: The error code of a task that did not end C{ok}.
    @ivar mensaje: Its error message.
    @ivar worker: Who ran it (as the reply says).
    @ivar peer: The submitter's address, for people reading the records.
    @ivar aceptada: When it was accepted (the clock's seconds).
    @ivar iniciada: When it started running.
    @ivar terminada: When it ended; L{None} while it runs.
    """

    __slots__ = (
        "owner", "tarea_id", "tipo", "contenido", "contenido_truncado", "huella", "estado",
        "resultado", "codigo", "mensaje", "worker", "peer", "aceptada", "iniciada",
        "terminada",
    )

    def __init__(
        self, owner: str, tarea_id: str, tipo: str, contenido: Any, estado: str,
        peer: str, aceptada: float, iniciada: Optional[float] = None,
        terminada: Optional[float] = None, resultado: Any = None, worker: Any = None,
        codigo: Optional[str] = None, mensaje: Optional[str] = None,
        huella: Optional[str] = None, contenido_truncado: bool = False,
    ) -> None:
        # Positional parameters, in this order, are the cheap way to build one
        # per task (the orchestrator passes them so).
        self.owner = owner
        self.tarea_id = tarea_id
        self.tipo = tipo
        self.contenido = contenido
        self.estado = estado
        self.peer = peer
        self.aceptada = aceptada
        self.iniciada = iniciada
        self.terminada = terminada
        self.resultado = resultado
        self.worker = worker
        self.codigo = codigo
        self.mensaje = mensaje
        self.huella = huella
        self.contenido_truncado = contenido_truncado

    @property
    def key(self) -> tuple[str, str]:
        return (self.owner, self.tarea_id)

    def describe(self) -> Dict[str, Any]:
        """
        @return: What C{op: estado} answers about this task (never its
            C{contenido} nor its owner).
        """
        out: Dict[str, Any] = {"estado": self.estado, "tipo": self.tipo}
        if self.estado == OK:
            if type(self.resultado) is ResultRef:
                out["resultado_ref"] = self.resultado
            else:
                out["resultado"] = self.resultado
        if self.codigo is not None:
            out["codigo"] = self.codigo
            out["mensaje"] = self.mensaje
        if self.worker is not None:
            out["worker"] = self.worker
        out["aceptada"] = self.aceptada
        out["iniciada"] = self.iniciada
        out["terminada"] = self.terminada
        return out

    def __repr__(self) -> str:
        return f"<Record {self.owner!r}/{self.tarea_id!r} {self.tipo} {self.estado}>"


#: Called by a store with the references of the result objects of the
#: records it forgets, so that those objects go with them
#: (L{IStore.on_forget}).
ForgetObjects = Callable[[List[str]], object]


def objects_of(resultado: Any) -> List[str]:
    """
    @param resultado: A record's result.
    @return: The references of the objects that belong to a task's record
        alone, deleted with it: its result's, when it was stored as an
        object.  Not its content's (C{contenido_ref}): an upload may serve
        any number of tasks, so uploads go by age
        (L{pfo3.blobs.options.Retention}), never with one record.
    """
    if type(resultado) is ResultRef:
        return [resultado["ref"]]
    return []


def done_record(
    owner: str, tarea_id: str, tipo: str, contenido: Any, resultado: Any, worker: Any,
    peer: str, when: float, huella: Optional[str],
) -> Record:
    """
    @return: The record of a task that ended C{ok} the moment it was
        accepted (what L{IStore.record_done} records).
    """
    return Record(owner, tarea_id, tipo, contenido, OK, peer, when, when, when, resultado,
                  worker, None, None, huella)


class IStore(Interface):
    """
    Records each task's life, looks one up, purges old ones.

    Writing never blocks and never fails for the caller: a store that cannot
    write (a database down, a full queue) counts what it could not write in
    C{dropped} and logs it.
    """

    max_age: float = Attribute("Seconds a finished record is kept (purged after).")
    dropped: int = Attribute("Record updates that could not be written and were given up.")
    pending: int = Attribute("Record updates waiting to be written.")
    on_forget: Optional[ForgetObjects] = Attribute(
        "Called with the result objects' references of the records the store forgets (purged by "
        "age or, in memory, by its bound); L{None}: nobody to tell.  The orchestrator "
        "sets it to delete those objects when it has object storage.")

    def start() -> Deferred[None]:  # noqa: N805
        """
        Get ready (create or upgrade the schema) and start the periodic purge
        and writes.  Never fails: a database that cannot be reached is
        retried and logged.
        """

    def record(record: Record) -> None:  # noqa: N805
        """
        Record the current state of C{record} (a newer state of the same
        C{(owner, tarea_id)} replaces the older).  Returns at once.
        """

    def record_done(
        owner: str,  # noqa: N805
        tarea_id: str, tipo: str, contenido: Any, resultado: Any, worker: Any,
        peer: str, when: float, huella: Optional[str],
    ) -> None:
        """
        Record a task that ended C{ok} the moment it was accepted: the same
        as L{record} of its L{Record} (accepted, started and ended at
        C{when}), which a store may build only when asked for it.  Returns
        at once.
        """

    def get(owner: str, tarea_id: str) -> Deferred[Optional[Record]]:  # noqa: N805
        """
        @return: A Deferred of the latest record of C{owner}'s task
            C{tarea_id} (updates not yet written included), or of L{None}.
            It fails (L{pfo3.errors.StoreUnavailable}) when the store cannot
            answer in time.
        """

    def purge(before: float) -> Deferred[int]:  # noqa: N805
        """
        Forget the tasks that ended (or, never ended, were accepted) before
        C{before}, and hand the references of the objects they held to
        C{on_forget}.

        @return: A Deferred of how many were forgotten (when known).
        """

    def flush() -> Deferred[None]:  # noqa: N805
        """
        @return: A Deferred firing once every update recorded so far was
            written, or failing if an attempt to write them failed (they are
            queued again, or dropped if the database refused them).
        """

    def stop() -> Deferred[None]:  # noqa: N805
        """
        Stop the periodic work, write what is pending and release the
        database.  The caller bounds how long it waits.
        """


#: Default retention of finished records, in seconds (one day).
DEFAULT_MAX_AGE = 86_400.0

#: Default bound of the memory store, in records.
DEFAULT_MAX_RECORDS = 100_000


def from_url(
    url: str, clock: IReactorTime, max_age: float = DEFAULT_MAX_AGE,
    max_records: int = DEFAULT_MAX_RECORDS, reactor: Any = None,
) -> Optional[IStore]:
    """
    The store a C{--store} URL names.

    @param url: C{memory:}, C{sqlite:PATH}, C{postgresql://user@host:port/db}
        (also C{postgres://}) or C{none}.
    @param clock: Drives purges and batched writes.
    @param reactor: The reactor a database's thread pool reports to (the
        global one by default).
    @return: The store, or L{None} for C{none} (recording off).
    @raise usage.UsageError: for a URL it does not understand (without
        touching any database).
    """
    scheme, sep, rest = url.partition(":")
    scheme = scheme.strip().lower()
    if scheme == "none" and not rest:
        return None
    if scheme == "memory" and sep and not rest:
        from pfo3.store._memory import MemoryStore

        return MemoryStore(clock, max_age=max_age, max_records=max_records)
    if scheme == "sqlite" and rest:
        from pfo3.store._sql import SQLITE, SQLStore

        return SQLStore(SQLITE, rest, clock, max_age=max_age, reactor=reactor)
    if scheme in ("postgresql", "postgres") and rest.startswith("//"):
        from pfo3.store._sql import POSTGRESQL, SQLStore

        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise usage.UsageError(
                "--store postgresql:// needs psycopg: pip install 'pfo3[postgresql]'")
        return SQLStore(POSTGRESQL, url, clock, max_age=max_age, reactor=reactor)
    raise usage.UsageError(
        f"invalid --store {url!r}: use memory:, sqlite:PATH, "
        "postgresql://user@host:port/db or none")


from pfo3.store._memory import MemoryStore  # noqa: E402
from pfo3.store._sql import SQLStore  # noqa: E402

__all__ = [
    "ABANDONED", "ACCEPTED", "ANONYMOUS", "ERROR", "FINISHED", "OK", "REPLAYABLE", "RUNNING",
    "TIMEOUT", "ForgetObjects", "IStore", "MemoryStore", "Record", "SQLStore", "done_record",
    "from_url", "objects_of",
]
