"""
The wire protocol: bytes to requests, replies to bytes.

Pure functions, no Twisted: a line (without its delimiter) becomes a
L{TaskRequest} or a L{ControlRequest}, or raises a L{pfo3.errors.Pfo3Error}
whose C{codigo} the client receives; replies become one JSON line each.
C{docs/protocol.md} is the human version of this module.

Replies are UTF-8 JSON, so Spanish text reads as such in C{nc}.  They are
written with L{json.encoder.encode_basestring} into fixed templates rather
than through L{json.dumps}: the text is what C{json.dumps(reply,
ensure_ascii=False)} gives (the tests check it), at a fifth of the cost.  A
lone surrogate (which JSON input may carry as C{"\\ud800"}) cannot be UTF-8;
encoding with C{backslashreplace} writes it back as the same C{\\uXXXX}
escape, so every reply is
valid UTF-8 and valid JSON.
"""

from __future__ import annotations

import json
import uuid
from json.encoder import encode_basestring as _quote
from typing import Any, Callable, Dict, Optional, Tuple, Union

from pfo3.errors import (
    InternalError,
    InvalidJSON,
    InvalidTaskId,
    InvalidToken,
    InvalidUTF8,
    InvalidWait,
    MissingToken,
    MissingType,
    NotAnObject,
    Pfo3Error,
    ResultTooLarge,
    UnknownOperation,
    echo,
)
from pfo3.tasks import MISSING, TaskRegistry, TaskType

#: Longest C{tarea_id} accepted, in characters.
MAX_TASK_ID = 256

#: L{encode_reply}'s C{max_line} when the caller gives none: 1 GiB less a
#: byte, more than any client takes in one line (and, as an integer of one
#: machine digit, compared on the interpreter's fast path).
NO_LIMIT = (1 << 30) - 1

#: Control operations a request may name in its C{op} field.
OPERATIONS = ("ping", "tipos", "estado", "auth", "stats", "subir")

def _no_constant(name: str) -> Any:
    raise InvalidJSON(f"JSON inválido: {name} no es un valor de JSON estándar.")


#: Python's JSON decoder accepts C{NaN}, C{Infinity} and C{-Infinity};
#: standard JSON does not, and neither does pfo3.
_decoder = json.JSONDecoder(parse_constant=_no_constant)
_decode = _decoder.decode
_scan: Callable[[str, int], Tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


def _parse(text: str) -> Any:
    """
    L{json.loads} for a whole line, with a fast path for the common case of
    a line that is exactly one JSON value: the scanner alone, without the
    two whitespace regular expressions that C{decode} runs around it.  Any
    other line (leading or trailing blanks, errors) takes C{decode}, which
    gives the same result or the same error message as C{json.loads}.
    """
    try:
        obj, end = _scan(text, 0)
    except (StopIteration, ValueError, RecursionError):
        return _decode(text)
    if end != len(text):
        return _decode(text)
    return obj


_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


class TaskRequest:
    """
    A validated task request.

    @ivar tarea_id: The client's identifier, or a new UUID when it sent none.
    @ivar tasktype: The L{TaskType} that C{tipo} named.
    @ivar arg: C{contenido} as the task type's validator returned it.
    @ivar esperar: L{None} for a plain task (the seed's kind); C{True} or
        C{False} for a durable one (C{docs/protocol.md}, "Results store"):
        C{False} asks for the reply C{aceptada} at once.
    @ivar token: The bearer token sent with this request, if any.
    """

    __slots__ = ("tarea_id", "tasktype", "arg", "esperar", "token")

    def __init__(
        self, tarea_id: str, tasktype: TaskType, arg: Any, esperar: Optional[bool] = None,
        token: Optional[str] = None,
    ) -> None:
        self.tarea_id = tarea_id
        self.tasktype = tasktype
        self.arg = arg
        self.esperar = esperar
        self.token = token

    def __repr__(self) -> str:
        return f"TaskRequest({self.tarea_id!r}, {self.tasktype.name!r}, {self.arg!r})"


class ControlRequest:
    """
    A control request: C{{"op": ...}}.  A seed request never has C{op}.

    @ivar op: One of L{OPERATIONS}.
    @ivar tarea_id: Echoed in the reply when the client sent one.
    @ivar token: The bearer token sent with this request, if any.
    """

    __slots__ = ("op", "tarea_id", "token")

    def __init__(self, op: str, tarea_id: Optional[str], token: Optional[str] = None) -> None:
        self.op = op
        self.tarea_id = tarea_id
        self.token = token

    def __repr__(self) -> str:
        return f"ControlRequest({self.op!r}, {self.tarea_id!r})"


Request = Union[TaskRequest, ControlRequest]


class TaskResult:
    """
    The reply to a task that succeeded.

    @ivar resultado: What the task returned (JSON-serialisable).
    @ivar worker: Who ran it, as the client sees it.
    """

    __slots__ = ("tarea_id", "resultado", "worker")

    def __init__(self, tarea_id: str, resultado: Any, worker: Any) -> None:
        self.tarea_id = tarea_id
        self.resultado = resultado
        self.worker = worker

    def __repr__(self) -> str:
        return f"TaskResult({self.tarea_id!r}, {self.resultado!r}, {self.worker!r})"


class ControlResult:
    """
    The reply to a control request.
    """

    __slots__ = ("tarea_id", "resultado")

    def __init__(self, tarea_id: Optional[str], resultado: Any) -> None:
        self.tarea_id = tarea_id
        self.resultado = resultado

    def __repr__(self) -> str:
        return f"ControlResult({self.tarea_id!r}, {self.resultado!r})"


class StateResult(ControlResult):
    """
    The reply to C{op: estado}: a task's recorded state, which holds its
    result, so its line is held to the same limit as the task's own reply.
    """

    __slots__ = ()


class AcceptedResult:
    """
    The reply to a task sent with C{"esperar": false}: accepted, running in
    the background; C{op: estado} tells how it ended.
    """

    __slots__ = ("tarea_id",)

    def __init__(self, tarea_id: str) -> None:
        self.tarea_id = tarea_id

    def __repr__(self) -> str:
        return f"AcceptedResult({self.tarea_id!r})"


#: A successful reply.  Errors travel as L{Pfo3Error} exceptions until
#: L{encode_error} writes them.
Reply = Union[TaskResult, ControlResult, AcceptedResult]


_SPANISH = {
    "Expecting value": "se esperaba un valor",
    "Expecting property name enclosed in double quotes":
        "se esperaba un nombre de campo entre comillas dobles",
    "Expecting ':' delimiter": "se esperaba ':'",
    "Expecting ',' delimiter": "se esperaba ','",
    "Unterminated string starting at": "texto sin cerrar",
    "Invalid control character at": "carácter de control dentro de un texto",
    "Invalid \\escape": "secuencia de escape inválida",
    "Invalid \\uXXXX escape": "secuencia \\uXXXX inválida",
    "Extra data": "hay datos después del objeto",
}


def _spanish(msg: str) -> str:
    """
    The Spanish for one of L{json}'s error messages.
    """
    return _SPANISH.get(msg, "sintaxis incorrecta")


def decode_request(line: bytes, registry: TaskRegistry) -> Request:
    """
    Decode and validate one request line.

    @param line: The line's bytes, without the delimiter (a trailing C{\\r}
        is tolerated).  Blank lines are the framing layer's business.
    @param registry: The task types to resolve C{tipo} against.
    @raise Pfo3Error: the error to reply with; its C{tarea_id} is set as
        soon as the request's identifier is known.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidUTF8(f"La línea no es UTF-8 válido (byte {e.start}).")
    try:
        obj = _parse(text)
    except json.JSONDecodeError as e:
        raise InvalidJSON(f"JSON inválido: {_spanish(e.msg)} (columna {e.colno}).")
    except ValueError:
        # int() refuses integers of more than sys.get_int_max_str_digits()
        # digits (4300 by default) with a ValueError of its own.
        raise InvalidJSON("JSON inválido: un número entero tiene demasiadas cifras.")
    except RecursionError:
        raise InvalidJSON("JSON inválido: anidamiento demasiado profundo.")
    if type(obj) is not dict:
        raise NotAnObject("La solicitud debe ser un objeto JSON ({...}).")

    tarea_id = obj.get("tarea_id")
    if tarea_id is not None and (
        type(tarea_id) is not str or not tarea_id or len(tarea_id) > MAX_TASK_ID
    ):
        raise InvalidTaskId(
            f"'tarea_id' debe ser un texto de 1 a {MAX_TASK_ID} caracteres."
        )

    token = obj.get("token")
    if token is not None and (type(token) is not str or not token):
        raise InvalidToken("Token inválido: 'token' debe ser un texto.", tarea_id)

    if "op" in obj:
        op = obj["op"]
        if op not in OPERATIONS or type(op) is not str:
            raise UnknownOperation(
                f"Operación desconocida: {echo(op)}. Operaciones válidas: "
                + ", ".join(OPERATIONS) + ".",
                tarea_id,
            )
        if op == "estado" and tarea_id is None:
            raise InvalidTaskId("La operación 'estado' necesita 'tarea_id'.")
        if op == "auth" and token is None:
            raise MissingToken("La operación 'auth' necesita 'token'.", tarea_id)
        if op == "subir":
            return _upload_request(obj, tarea_id, token)
        return ControlRequest(op, tarea_id, token)

    if tarea_id is None:
        tarea_id = str(uuid.uuid4())
    try:
        tipo = obj.get("tipo", MISSING)
        if tipo is MISSING or tipo is None:
            raise MissingType("Falta el campo 'tipo'.")
        tasktype = registry.lookup(tipo)
        if "contenido_ref" in obj or "refs" in obj:
            return _ref_task_request(obj, tarea_id, tasktype, token)
        arg = tasktype.validate(obj.get("contenido", MISSING))
        esperar = obj.get("esperar")
        if esperar is not None and type(esperar) is not bool:
            raise InvalidWait("'esperar' debe ser true o false.")
    except Pfo3Error as e:
        e.tarea_id = tarea_id
        raise
    except Exception as e:
        # A task type's validator failed in a way it did not mean to: the
        # server's fault, not the request's.  The caller logs the cause.
        raise InternalError("Error interno al validar la tarea.", tarea_id) from e
    return TaskRequest(tarea_id, tasktype, arg, esperar, token)


def encode_reply(reply: Reply, max_line: int = NO_LIMIT) -> bytes:
    """
    @param max_line: The longest task reply line allowed, in bytes, not
        counting its C{\\n} (the server's C{--max-line}); a task's reply
        longer than this is refused with L{ResultTooLarge} rather than
        written, so that no client gets a line longer than it may read.
        Control replies are the server's own and are not checked, but for
        C{op: estado}'s (L{StateResult}), which carries a task's result.
    @return: The line of a successful reply; a task's is
        C{{"estado": "ok", "resultado": ..., "tarea_id": ..., "worker": ...}},
        as the seed wrote it.
    @raise InternalError: if the result cannot be written as JSON (the
        offending exception is its C{__cause__}).
    @raise ResultTooLarge: if a task's line is longer than C{max_line}.
    """
    try:
        if type(reply) is TaskResult:
            # The task's line is written here rather than in a function of
            # its own: this runs once per task.
            resultado = reply.resultado
            if type(resultado) is str:
                res = _quote(resultado)
            elif type(resultado) is int:
                res = int.__repr__(resultado)
            elif type(resultado) is ResultRef:
                return _within(encode_result_ref(reply.tarea_id, resultado, reply.worker),
                               max_line, reply.tarea_id)
            else:
                res = _dumps(resultado)
            tarea_id = reply.tarea_id
            tid = "null" if tarea_id is None else _quote(tarea_id)
            worker = reply.worker
            w = int.__repr__(worker) if type(worker) is int else _dumps(worker)
            line = (
                '{"estado": "ok", "resultado": %s, "tarea_id": %s, "worker": %s}\n'
                % (res, tid, w)
            ).encode("utf-8", "backslashreplace")
            # The one check of a reply's length: on the line itself,
            # whatever escaping made of the result (a "\n" takes two bytes,
            # a control character six).  A line of usual size costs this
            # one comparison.
            if len(line) > max_line:
                return _within(line, max_line, tarea_id)
            return line
        if type(reply) is AcceptedResult:
            return encode_accepted(reply.tarea_id)
        if type(reply) is StateResult:
            return _within(encode_control(reply.tarea_id, reply.resultado), max_line,
                           reply.tarea_id)
        return encode_control(reply.tarea_id, reply.resultado)  # type: ignore[union-attr]
    except Pfo3Error:
        raise
    except Exception as e:
        raise InternalError(
            "Error interno: el resultado no se puede enviar como JSON.", reply.tarea_id
        ) from e


def _within(line: bytes, max_line: int, tarea_id: Optional[str]) -> bytes:
    """
    @return: C{line}, if it is not longer than C{max_line} without its
        C{\\n}.
    @raise ResultTooLarge: otherwise.
    """
    if len(line) - 1 > max_line:
        raise result_too_large(len(line) - 1, max_line, tarea_id)
    return line


def result_too_large(size: int, max_line: int, tarea_id: Optional[str]) -> ResultTooLarge:
    """
    @param size: The reply line's length (or a length it would surely
        exceed), in bytes.
    @return: The error that replaces a reply longer than C{max_line}.
    """
    return ResultTooLarge(
        f"El resultado no cabe en una línea: la respuesta ocuparía {size} bytes y el límite "
        f"es {max_line} (--max-line). Envíe la tarea con \"refs\": true a un servidor con "
        "almacén de objetos (--blobs) para recibirlo como referencia (resultado_ref).",
        tarea_id)


def encode_ok(tarea_id: Optional[str], resultado: Any, worker: Any) -> bytes:
    """
    @return: The success line of a task (see L{encode_reply}).
    @raise InternalError: as L{encode_reply}.
    """
    return encode_reply(TaskResult(tarea_id, resultado, worker))  # type: ignore[arg-type]


def encode_accepted(tarea_id: str) -> bytes:
    """
    @return: The line C{{"estado": "aceptada", "tarea_id": ...}}.
    """
    return ('{"estado": "aceptada", "tarea_id": %s}\n' % _quote(tarea_id)).encode(
        "utf-8", "backslashreplace")


def encode_control(tarea_id: Optional[str], resultado: Any) -> bytes:
    """
    @return: The success line of a control request (no C{worker}).
    """
    reply: Dict[str, Any] = {"estado": "ok", "resultado": resultado}
    if tarea_id is not None:
        reply["tarea_id"] = tarea_id
    return (_dumps(reply) + "\n").encode("utf-8", "backslashreplace")


def encode_error(error: Pfo3Error, tarea_id: Optional[str] = None) -> bytes:
    """
    @param error: What went wrong.
    @param tarea_id: The task's identifier, when the error does not carry it.
    @return: The error line C{{"estado": "error", "mensaje": ...,
        "codigo": ..., "tarea_id": ...}}.
    """
    tid = error.tarea_id if error.tarea_id is not None else tarea_id
    return (
        '{"estado": "error", "mensaje": %s, "codigo": %s, "tarea_id": %s}\n'
        % (_quote(error.mensaje), _quote(error.codigo), "null" if tid is None else _quote(tid))
    ).encode("utf-8", "backslashreplace")


def decode_reply(line: Union[bytes, str]) -> Dict[str, Any]:
    """
    Decode one reply line (for clients).

    @raise ValueError: if it is not a JSON object.
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8")
    obj = _decode(line)
    if type(obj) is not dict:
        raise ValueError(f"reply is not a JSON object: {line!r}")
    return obj


def encode_request(
    tipo: Union[str, int], contenido: Any = MISSING, tarea_id: Optional[str] = None,
    esperar: Optional[bool] = None, token: Optional[str] = None,
) -> bytes:
    """
    Encode a task request line (for clients).

    @param contenido: The task's input; leave it out (L{MISSING}) to send a
        request without C{contenido}.
    @param esperar: Send a durable task (L{None}, the default: a plain one).
    @param token: A bearer token for this request alone.
    """
    req: Dict[str, Any] = {}
    if tarea_id is not None:
        req["tarea_id"] = tarea_id
    req["tipo"] = tipo
    if contenido is not MISSING:
        req["contenido"] = contenido
    if esperar is not None:
        req["esperar"] = esperar
    if token is not None:
        req["token"] = token
    return (_dumps(req) + "\n").encode("utf-8", "backslashreplace")


def encode_operation(
    op: str, tarea_id: Optional[str] = None, token: Optional[str] = None
) -> bytes:
    """
    Encode a control request line (for clients).

    @param token: A bearer token (C{op: auth} needs one).
    """
    req: Dict[str, Any] = {"op": op}
    if tarea_id is not None:
        req["tarea_id"] = tarea_id
    if token is not None:
        req["token"] = token
    return (_dumps(req) + "\n").encode("utf-8", "backslashreplace")


# --- large contents and results through object storage (docs/blobs.md) -------


class RefArg(Dict[str, Any]):
    """
    The C{arg} of a task that involves object storage: its content is an
    object (C{contenido_ref}), or its client understands result references
    (C{"refs": true}), or both.  The executor side resolves it
    (L{pfo3.blobs.executor.BlobExecutor}); only the reference travels to a
    worker.  A dict, so that it is recorded and fingerprinted as JSON:
    C{{"contenido_ref": REF}} or C{{"contenido": VALUE}}, plus C{"refs"}.
    """

    @property
    def ref(self) -> Optional[str]:
        """The content's reference, or L{None} when the content is inline."""
        return self.get("contenido_ref")

    @property
    def inline(self) -> Any:
        """The validated inline content (when there is no reference)."""
        return self.get("contenido", MISSING)

    @property
    def refs(self) -> bool:
        """Whether the client understands C{resultado_ref}."""
        return bool(self.get("refs", False))


class ResultRef(Dict[str, Any]):
    """
    A result stored as an object: C{{"ref", "bytes", "sha256", "url",
    "expira"}}.  A reply carries it as C{resultado_ref} instead of
    C{resultado}.
    """


class RefTaskRequest(TaskRequest):
    """
    A task request with C{contenido_ref} or C{refs}: the orchestrator checks
    that object storage is on, then runs it as a L{TaskRequest} whose
    C{arg} is a L{RefArg}.
    """

    __slots__ = ()


class UploadRequest(ControlRequest):
    """
    C{{"op": "subir", "bytes": N}}: a client asks where to upload N bytes.

    @ivar size: N.
    """

    __slots__ = ("size",)

    def __init__(self, size: int, tarea_id: Optional[str], token: Optional[str]) -> None:
        super().__init__("subir", tarea_id, token)
        self.size = size


def _upload_request(obj: Dict[str, Any], tarea_id: Optional[str],
                    token: Optional[str]) -> UploadRequest:
    from pfo3.errors import InvalidUpload

    size = obj.get("bytes")
    if type(size) is not int or size < 1:
        raise InvalidUpload("La operación 'subir' necesita 'bytes': el tamaño (un entero "
                            "positivo) de lo que se subirá.", tarea_id)
    return UploadRequest(size, tarea_id, token)


def _ref_task_request(obj: Dict[str, Any], tarea_id: str, tasktype: TaskType,
                      token: Optional[str]) -> RefTaskRequest:
    from pfo3.errors import InvalidContent, UnknownRef

    arg = RefArg()
    refs = obj.get("refs")
    if refs is not None:
        if type(refs) is not bool:
            raise InvalidContent("'refs' debe ser true o false.")
        arg["refs"] = refs
    if "contenido_ref" in obj:
        ref = obj["contenido_ref"]
        if "contenido" in obj:
            raise InvalidContent("Envíe 'contenido' o 'contenido_ref', no los dos.")
        if type(ref) is not str or not ref:
            raise UnknownRef("'contenido_ref' debe ser una referencia que el servidor "
                             "entregó (op 'subir').")
        arg["contenido_ref"] = ref
    else:
        arg["contenido"] = tasktype.validate(obj.get("contenido", MISSING))
    esperar = obj.get("esperar")
    if esperar is not None and type(esperar) is not bool:
        raise InvalidWait("'esperar' debe ser true o false.")
    return RefTaskRequest(tarea_id, tasktype, arg, esperar, token)


def encode_result_ref(tarea_id: Optional[str], ref: ResultRef, worker: Any) -> bytes:
    """
    @return: The success line of a task whose result was stored as an
        object: C{{"estado": "ok", "resultado_ref": {...}, "tarea_id": ...,
        "worker": ...}}.
    """
    reply: Dict[str, Any] = {"estado": "ok", "resultado_ref": dict(ref),
                             "tarea_id": tarea_id, "worker": worker}
    return (_dumps(reply) + "\n").encode("utf-8", "backslashreplace")
