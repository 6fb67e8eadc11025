"""
Typed errors of pfo3.

Every failure that reaches a client is one of these exceptions, carried as a
L{Failure} until the wire, where L{pfo3.wire.encode_error} turns it into an
error line.  Each class has a stable machine-readable C{codigo}; the human text
(C{mensaje}) is Spanish, like the rest of the protocol.  The list of codes is
part of the documented protocol (C{docs/protocol.md}): never rename one.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Type


class Pfo3Error(Exception):
    """
    Base of every error that pfo3 reports to a client.

    @ivar mensaje: Human-readable explanation (Spanish).
    @ivar tarea_id: The task's identifier when it is known, else L{None}.
    """

    codigo: ClassVar[str] = "error"

    def __init__(self, mensaje: str, tarea_id: Optional[str] = None) -> None:
        super().__init__(mensaje)
        self.mensaje = mensaje
        self.tarea_id = tarea_id


#: Longest piece of a client's input echoed back in an error message.
MAX_ECHO = 60


def echo(value: Any) -> str:
    """
    A client's value as an error message quotes it: its C{repr}, cut short
    so that a reply never grows with the input.
    """
    if isinstance(value, str) and len(value) > MAX_ECHO:
        return repr(value[:MAX_ECHO]) + "…"
    text = repr(value)
    return text if len(text) <= 2 * MAX_ECHO else text[: 2 * MAX_ECHO] + "…"


# --- framing and decoding -------------------------------------------------


class LineTooLong(Pfo3Error):
    """A line exceeded the configured maximum length."""

    codigo = "linea_demasiado_larga"


class InvalidUTF8(Pfo3Error):
    """A line is not valid UTF-8."""

    codigo = "utf8_invalido"


class InvalidJSON(Pfo3Error):
    """A line is not valid JSON."""

    codigo = "json_invalido"


class NotAnObject(Pfo3Error):
    """A line is valid JSON but not a JSON object."""

    codigo = "no_es_objeto"


# --- request validation ---------------------------------------------------


class InvalidTaskId(Pfo3Error):
    """C{tarea_id} is present but not a short non-empty string."""

    codigo = "tarea_id_invalido"


class DuplicateTaskId(Pfo3Error):
    """A task with the same C{tarea_id} is still in flight on this connection."""

    codigo = "tarea_id_duplicado"


class MissingType(Pfo3Error):
    """The request has no C{tipo}."""

    codigo = "tipo_faltante"


class UnknownType(Pfo3Error):
    """C{tipo} names no registered task type (or has the wrong JSON type)."""

    codigo = "tipo_desconocido"


class MissingContent(Pfo3Error):
    """The task type needs C{contenido} and the request has none."""

    codigo = "contenido_faltante"


class InvalidContent(Pfo3Error):
    """C{contenido} has the wrong type or value for its task type."""

    codigo = "contenido_invalido"


class ExceedsTimeout(Pfo3Error):
    """The task declares it would run longer than the task timeout."""

    codigo = "excede_timeout"


class UnknownOperation(Pfo3Error):
    """A control request names an unknown C{op}."""

    codigo = "op_desconocida"


class InvalidWait(Pfo3Error):
    """C{esperar} is present but neither C{true} nor C{false}."""

    codigo = "esperar_invalido"


# --- the results store ----------------------------------------------------


class TaskNotFound(Pfo3Error):
    """
    C{op: estado} names a C{tarea_id} of which the store (and this server)
    knows nothing: never submitted by this owner, not recorded, or purged.
    """

    codigo = "tarea_desconocida"


class TaskIdInUse(Pfo3Error):
    """
    A durable task (one sent with C{esperar}) reuses the C{tarea_id} of an
    earlier durable task of the same owner with a different C{tipo} or
    C{contenido}.
    """

    codigo = "tarea_id_en_uso"


class StoreUnavailable(Pfo3Error):
    """The results store did not answer a lookup in time (or failed)."""

    codigo = "almacen_no_disponible"


# --- authentication and abuse limits ---------------------------------------


class MissingToken(Pfo3Error):
    """
    The server checks tokens and this request came with none: send
    C{{"op": "auth", "token": ...}} first, or a C{token} field.
    """

    codigo = "token_faltante"


class InvalidToken(Pfo3Error):
    """
    The token's signature, algorithm, issuer, audience or claims are not
    what the server accepts (or it is not a JWT at all).
    """

    codigo = "token_invalido"


class ExpiredToken(Pfo3Error):
    """The token expired (C{exp}); get a new one."""

    codigo = "token_expirado"


class Forbidden(Pfo3Error):
    """The identity's token does not allow this task type (claim C{tipos})."""

    codigo = "prohibido"


class RateLimited(Pfo3Error):
    """The identity started more tasks per second than it may; retry later."""

    codigo = "tasa_excedida"


class TooManyConnections(Pfo3Error):
    """
    The server holds as many connections as it allows, in all or from this
    address (or unauthenticated ones); it closes this one.
    """

    codigo = "demasiadas_conexiones"


# --- execution and policy -------------------------------------------------


class TaskTimeout(Pfo3Error):
    """The task did not finish within the task timeout; it was cancelled."""

    codigo = "timeout"


class Busy(Pfo3Error):
    """The server holds as many tasks as it allows; try again later."""

    codigo = "ocupado"


class BufferFull(Busy):
    """
    The unfinished lines of all connections already hold as many bytes as
    the server allows (C{--max-buffered}); the line was refused, try again
    later.  A kind of L{Busy}.
    """

    codigo = "buffer_lleno"


class ShuttingDown(Pfo3Error):
    """The server is shutting down and accepts no new tasks."""

    codigo = "apagando"


class BrokerUnavailable(Pfo3Error):
    """
    Distributed mode: the broker is not reachable (or did not confirm the
    task), so the task was not queued.  Retry in a moment.
    """

    codigo = "broker_no_disponible"


class DeliveryLimit(Pfo3Error):
    """
    Distributed mode: the task was delivered to workers as many times as
    allowed without finishing (each one stopped while running it), so it was
    set aside instead of being tried again.
    """

    codigo = "reintentos_agotados"


class TaskFailed(Pfo3Error):
    """
    A task refused its input or failed in a way it chose to explain.

    Task functions raise this to send C{mensaje} to the client.  Any other
    exception is an internal error: its traceback goes to the log and the
    client only learns that something went wrong.
    """

    codigo = "tarea_fallida"


class InternalError(Pfo3Error):
    """An unexpected exception inside pfo3 or a task function."""

    codigo = "error_interno"


# --- object storage (large contents and results, pfo3/blobs) ---------------


class BlobsDisabled(Pfo3Error):
    """
    The request needs object storage (C{op: subir}, C{contenido_ref}) and
    this server runs without C{--blobs}.
    """

    codigo = "blobs_desactivado"


class UnknownRef(Pfo3Error):
    """
    A reference names no object in the storage (never uploaded, deleted, or
    not a reference this server hands out).
    """

    codigo = "ref_desconocida"


class InvalidUpload(Pfo3Error):
    """C{op: subir} came without a valid C{bytes} (a size within the limit)."""

    codigo = "subida_invalida"


class PresignUnsupported(Pfo3Error):
    """
    The object storage cannot hand out presigned URLs (C{memory:} and
    C{file:} cannot); use an S3-compatible storage for uploads.
    """

    codigo = "urls_no_soportadas"


class ResultTooLarge(Pfo3Error):
    """
    The result is longer than the line limit and the request did not say it
    understands result references (C{"refs": true}).
    """

    codigo = "resultado_demasiado_grande"


class BlobStoreUnavailable(Pfo3Error):
    """
    The object storage did not answer (down, unreachable, timed out) or
    failed; the task did not run or its result was not stored.
    """

    codigo = "almacen_objetos_no_disponible"


class BlobAccessDenied(BlobStoreUnavailable):
    """
    The object storage refused the server's credentials (wrong keys, a bad
    signature, no permission): a configuration error of the server.
    """

    codigo = "almacen_objetos_denegado"


class BlobBucketMissing(BlobStoreUnavailable):
    """The object storage has no bucket of the configured name."""

    codigo = "almacen_objetos_sin_cubo"


def _all_codes() -> Dict[str, Type[Pfo3Error]]:
    found: Dict[str, Type[Pfo3Error]] = {}
    pending = list(Pfo3Error.__subclasses__())
    while pending:
        cls = pending.pop()
        found[cls.codigo] = cls
        pending.extend(cls.__subclasses__())
    return found


#: Every error code of the protocol, mapped to its exception class.
ERROR_CODES: Dict[str, Type[Pfo3Error]] = _all_codes()


def error_from_reply(reply: Dict[str, Any]) -> Pfo3Error:
    """
    Rebuild the typed exception of an error reply (for clients).

    @param reply: A decoded reply whose C{estado} is C{"error"}.
    @return: An instance of the class registered for its C{codigo}, or of
        L{Pfo3Error} itself for a code this version does not know.
    """
    codigo = str(reply.get("codigo", "error"))
    cls = ERROR_CODES.get(codigo, Pfo3Error)
    exc = cls(str(reply.get("mensaje", "")), reply.get("tarea_id"))
    if cls is Pfo3Error:
        exc.codigo = codigo  # type: ignore[misc]
    return exc


def error_reply(error: Pfo3Error) -> Dict[str, Any]:
    """
    The inverse of L{error_from_reply}: the decoded error reply that carries
    C{error}.
    """
    return {
        "estado": "error", "mensaje": error.mensaje, "codigo": error.codigo,
        "tarea_id": error.tarea_id,
    }
