"""
The orchestrator's side of large payloads: C{op: subir}, and tasks sent
with C{contenido_ref} or C{"refs": true} (C{docs/blobs.md}).

The orchestrator hands these requests here (L{blob_request}); a task is
then checked and turned into an ordinary L{pfo3.wire.TaskRequest} whose
C{arg} is a L{pfo3.wire.RefArg}, and goes through the orchestrator's usual
policy (identity, limits, timeout, store).  Nothing here reads an object:
the executor side does (L{pfo3.blobs.executor.BlobExecutor}, in this process
or in a worker), so in distributed mode a large payload never passes
through the orchestrator.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, List, Union

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from pfo3 import blobs, wire
from pfo3.errors import BlobsDisabled, ExceedsTimeout, InvalidUpload, Pfo3Error

if TYPE_CHECKING:  # pragma: no cover
    from pfo3.orchestrator import Session

log = Logger(namespace="pfo3.blobs")

#: Default size past which a result is stored as an object (for clients that
#: sent C{"refs": true}).
DEFAULT_THRESHOLD = 256 * 1024

#: Default largest object a client may upload and a task may read.
DEFAULT_MAX_BYTES = 1 << 30

#: Default lifetime of a presigned URL, in seconds.
DEFAULT_URL_TTL = 3600.0


class BlobPolicy:
    """
    Object storage as a server uses it.

    @ivar store: The storage.
    @ivar threshold: Results longer than this (bytes, as JSON text) are
        stored as objects for clients that understand references.
    @ivar max_bytes: Largest upload announced with C{op: subir}, and largest
        object a task may read.
    @ivar url_ttl: Seconds a presigned URL works.
    @ivar max_line: The line limit: a result whose bytes alone are longer
        than this, for a client that does not understand references, is
        refused where it is made (C{resultado_demasiado_grande}); the reply
        line itself is checked where it is written (L{wire.encode_reply}).
    """

    def __init__(
        self, store: blobs.IBlobStore, threshold: int = DEFAULT_THRESHOLD,
        max_bytes: int = DEFAULT_MAX_BYTES, url_ttl: float = DEFAULT_URL_TTL,
        max_line: int = 1 << 20,
    ) -> None:
        self.store = store
        self.threshold = threshold
        self.max_bytes = max_bytes
        self.url_ttl = url_ttl
        self.max_line = max_line

    def forget(self, refs: List[str]) -> Deferred[None]:
        """
        Delete the objects of records the results store forgot
        (L{pfo3.store.IStore.on_forget}).  A deletion that fails is logged
        (and counted by the storage); that object is left to the age sweep
        of orphans (L{pfo3.blobs.options.Retention}).

        @return: A Deferred that fires once every deletion was tried.
        """
        store = self.store
        failed: List[str] = []

        def one(_: Any, ref: str) -> Deferred[None]:
            # One at a time: a purge of many records does not fill the
            # storage's I/O threads.
            d = store.delete(ref)
            d.addErrback(lambda f: failed.append(f.getErrorMessage()))
            return d

        def done(_: Any) -> None:
            if failed:
                log.warn("Object storage: {n} of the {total} objects of forgotten records "
                         "could not be deleted ({why}); the age sweep will try again",
                         n=len(failed), total=len(refs), why=failed[0])

        d: Deferred[Any] = succeed(None)
        for ref in refs:
            d.addCallback(one, ref)
        return d.addCallback(done)

    def refresh(self, result: wire.ResultRef) -> Deferred[wire.ResultRef]:
        """
        @return: A Deferred of C{result} with a fresh presigned GET URL (for
            a reply replayed from the results store, whose URL may have
            expired); C{result} itself when it has no URL (C{memory:},
            C{file:}) or when presigning fails (logged).
        """
        if result.get("url") is None:
            return succeed(result)
        d = self.store.presign_get(result["ref"], self.url_ttl)

        def fresh(presigned: blobs.Presigned) -> wire.ResultRef:
            out = wire.ResultRef(result)
            out["url"] = presigned.url
            out["expira"] = presigned.expira
            return out

        def stale(f: Failure) -> wire.ResultRef:
            log.warn("Object storage: could not presign {ref} again ({why}); replaying "
                     "the recorded URL", ref=result["ref"], why=f.getErrorMessage())
            return result

        return d.addCallbacks(fresh, stale)


def _disabled(tarea_id: Any) -> BlobsDisabled:
    return BlobsDisabled(
        "Este servidor no tiene almacén de objetos (--blobs): envíe el contenido en línea.",
        tarea_id)


def blob_request(session: Session, request: Any) -> Any:
    """
    Answer a request that involves object storage.

    @param request: A L{pfo3.wire.UploadRequest} or a
        L{pfo3.wire.RefTaskRequest}.
    @return: What L{pfo3.orchestrator.Session.handle} returns.
    @raise Pfo3Error: if it is refused.
    """
    if type(request) is wire.UploadRequest:
        return _upload(session, request)
    assert type(request) is wire.RefTaskRequest
    policy = session.orchestrator.blobs
    arg: wire.RefArg = request.arg
    tasktype = request.tasktype
    if policy is None:
        if arg.ref is not None:
            raise _disabled(request.tarea_id)
        # "refs": true on a server without storage: results stay inline.
        plain = wire.TaskRequest(request.tarea_id, tasktype, arg.inline, request.esperar,
                                 request.token)
        return session.handle(plain)
    if tasktype.duration is not None:
        # The declared duration of inline content is checked here, where the
        # orchestrator can; that of content in an object is not known before
        # a worker reads it (its timeout still applies).
        if arg.ref is None:
            duration = float(tasktype.duration(arg.inline))
            timeout = session.orchestrator.timeout
            if duration >= timeout:
                raise ExceedsTimeout(
                    f"La tarea duraría {duration:g} s; debe durar menos que el límite de "
                    f"{timeout:g} s.", request.tarea_id)
        tasktype = dataclasses.replace(tasktype, duration=None)
    task = wire.TaskRequest(request.tarea_id, tasktype, arg, request.esperar, request.token)
    return session.handle(task)


def _upload(session: Session, request: wire.UploadRequest) -> Union[Deferred[Any], Any]:
    """
    C{op: subir}: a fresh reference and a presigned PUT URL for it.
    """
    policy = session.orchestrator.blobs
    if policy is None:
        raise _disabled(request.tarea_id)
    if session._guarded or request.token is not None:
        session._identify(request)
    if request.size > policy.max_bytes:
        raise InvalidUpload(
            f"'bytes' ({request.size}) supera el máximo de {policy.max_bytes} bytes de este "
            "servidor.", request.tarea_id)
    ref = blobs.new_ref(blobs.UPLOAD)
    d = policy.store.presign_put(ref, policy.url_ttl)

    def answer(presigned: blobs.Presigned) -> wire.ControlResult:
        return wire.ControlResult(request.tarea_id, {
            "ref": ref, "url": presigned.url, "expira": presigned.expira,
            "metodo": presigned.method,
        })

    def failed(failure: Any) -> Any:
        error = failure.value
        if isinstance(error, Pfo3Error) and error.tarea_id is None:
            error.tarea_id = request.tarea_id
        return failure

    d.addCallbacks(answer, failed)
    if not d.called:
        session.inflight += 1
        d.addBoth(session._looked_up)
    return d
