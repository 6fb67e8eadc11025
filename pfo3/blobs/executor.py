"""
The executor side of large payloads: L{BlobExecutor} wraps the executor that
really runs tasks (a L{pfo3.executor.LocalExecutor}, in a server or in a
worker) and resolves object references around it.

A task whose C{arg} is a L{pfo3.wire.RefArg}:

  1. its content is read from the storage when it came as C{contenido_ref}
     (refused beyond the policy's C{max_bytes}), decoded as UTF-8 text and
     validated with its task type's own validator, as inline content would
     be;
  2. it runs on the wrapped executor;
  3. its result, when the client understands references and the result's
     JSON text is longer than the threshold, is stored as an object and
     replaced by a L{pfo3.wire.ResultRef} (reference, size, SHA-256 and a
     presigned GET URL when the storage makes them); a client that does not
     understand references gets it inline.  Whether that inline reply fits
     in a line is checked once, on the line itself, where it is written
     (L{pfo3.wire.encode_reply}); a result whose bytes alone pass the line
     limit is refused here already (C{resultado_demasiado_grande}), so that
     it never travels further.

Any other C{arg} goes straight to the wrapped executor: plain tasks pay one
call and one type check.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from zope.interface import implementer

from pfo3 import blobs, wire
from pfo3.blobs.requests import BlobPolicy
from pfo3.errors import (
    BlobsDisabled,
    InvalidContent,
    PresignUnsupported,
    UnknownRef,
)
from pfo3.executor import IExecutor, MaybeDeferredOutcome, Outcome
from pfo3.tasks import TaskType

_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


def result_bytes(resultado: Any) -> bytes:
    """
    @return: What a result stored as an object holds: the UTF-8 text of a
        text result, the JSON text of any other.
    """
    if type(resultado) is str:
        return resultado.encode("utf-8", "surrogatepass")
    return _dumps(resultado).encode("utf-8", "surrogatepass")


@implementer(IExecutor)
class BlobExecutor:
    """
    Resolves object references around another executor.

    @ivar policy: The storage and its limits; L{None} on a worker started
        without C{--blobs} (then content references are refused with
        C{blobs_desactivado}).
    """

    def __init__(self, inner: IExecutor, policy: Optional[BlobPolicy]) -> None:
        self.inner = inner
        self.policy = policy

    @property
    def workers(self) -> int:
        return int(self.inner.workers)

    @property
    def running(self) -> int:
        return int(self.inner.running)

    @property
    def abandoned(self) -> int:
        return int(self.inner.abandoned)

    def start(self) -> None:
        if self.policy is not None:
            self.policy.store.start()
        self.inner.start()

    def stop(self) -> Deferred[None]:
        d = self.inner.stop()
        if self.policy is not None:
            store = self.policy.store
            d.addBoth(lambda _: store.stop())
        return d

    def run(
        self, tasktype: TaskType, arg: Any, identity: str = "", tarea_id: Optional[str] = None,
        accepted: Optional[Callable[[], None]] = None,
    ) -> MaybeDeferredOutcome:
        if type(arg) is not wire.RefArg:
            return self.inner.run(tasktype, arg, identity, tarea_id, accepted)
        policy = self.policy
        ref = arg.ref
        if policy is None:
            if ref is not None:
                raise BlobsDisabled(
                    "Este worker no tiene almacén de objetos (--blobs) y la tarea llegó "
                    "con 'contenido_ref'.")
            return self.inner.run(tasktype, arg.inline, identity, tarea_id, accepted)
        if ref is None:
            d: Deferred[Any] = maybeDeferred(
                self.inner.run, tasktype, arg.inline, identity, tarea_id, accepted)
        else:
            d = self._content(tasktype, ref, policy)
            d.addCallback(
                lambda value: self.inner.run(tasktype, value, identity, tarea_id, accepted))
        return d.addCallback(self._result, arg.refs, policy)

    def _content(self, tasktype: TaskType, ref: str, policy: BlobPolicy) -> Deferred[Any]:
        """
        @return: A Deferred of the content the object C{ref} holds,
            validated by C{tasktype}.
        """
        store = policy.store
        blobs.check_ref(ref)
        d = store.stat(ref)

        def read(info: Optional[blobs.BlobInfo]) -> Deferred[bytes]:
            if info is None:
                raise UnknownRef(f"No hay ningún objeto con la referencia {ref!r}: súbalo "
                                 "primero con la URL de 'subir'.")
            if info.size > policy.max_bytes:
                raise InvalidContent(
                    f"El objeto {ref!r} tiene {info.size} bytes; el máximo es "
                    f"{policy.max_bytes}.")
            return store.get(ref)

        def validate(data: bytes) -> Any:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidContent(
                    f"El objeto {ref!r} no es texto UTF-8 válido (byte {e.start}).")
            del data
            return tasktype.validate(text)

        return d.addCallback(read).addCallback(validate)

    def _result(self, outcome: Outcome, refs: bool, policy: BlobPolicy) -> Any:
        """
        Store a large result as an object for a client that understands
        references; refuse one too long for a line for one that does not.
        """
        resultado, worker = outcome
        if type(resultado) is int or resultado is None or type(resultado) is bool:
            return outcome
        if type(resultado) is str and len(resultado) * 4 <= policy.threshold:
            return outcome  # short for sure, even as UTF-8 JSON
        data = result_bytes(resultado)
        if not refs:
            if len(data) > policy.max_line:
                # The reply line would be longer still: refused here rather
                # than carried (through the broker, from a worker) to the
                # line check that would refuse it (pfo3.wire.encode_reply).
                raise wire.result_too_large(len(data), policy.max_line, None)
            return outcome
        if len(data) <= policy.threshold:
            return outcome
        store = policy.store
        ref = blobs.new_ref(blobs.RESULT)
        d = store.put(ref, data)
        del data

        def presign(info: blobs.BlobInfo) -> Deferred[Any]:
            p = store.presign_get(ref, policy.url_ttl)

            def answer(presigned: Any) -> Outcome:
                out = wire.ResultRef(ref=ref, bytes=info.size, sha256=info.sha256,
                                     url=None, expira=None)
                if isinstance(presigned, blobs.Presigned):
                    out["url"] = presigned.url
                    out["expira"] = presigned.expira
                return out, worker

            def no_urls(f: Failure) -> Any:
                f.trap(PresignUnsupported)
                return None

            return p.addErrback(no_urls).addCallback(answer)

        return d.addCallback(presign)
