"""
What travels between orchestrators and workers: JSON bodies naming the task
type, never pickles.  Pure functions, no Twisted, no AMQP client.

A task message's body is C{{"v": 1, "tipo": NAME, "contenido": ARG}}: the
canonical name of its type and its validated
C{contenido} (the worker validates it again with its own registry), plus
C{"identidad"} when an authenticated identity sent it (for the worker's
logs), and C{"tarea_id"} when the orchestrator records the task in its
store (C{docs/store.md}): C{identidad} and C{tarea_id} are then the
record's key.  Its
AMQP properties carry the rest: C{correlation_id} (a fresh id per task,
never the client's C{tarea_id}, which is only unique per connection),
C{reply_to} (the orchestrator's reply queue) and C{expiration} (when nobody
waits for it any more).

A reply's body is C{{"v": 1, "estado": "ok", "resultado": ..., "worker":
...}} or C{{"v": 1, "estado": "error", "codigo": ..., "mensaje": ...}}; its
C{correlation_id} is the task's.  A reply to a recorded task echoes its
C{"tarea_id"} (and C{"identidad"}, when not empty), so that an orchestrator
that is not waiting for it (the one that published the task died, and was
started again under the same name) can record its outcome in the shared
store (L{reply_key}).

With object storage (C{docs/blobs.md}) a task whose content is an object
carries C{"contenido_ref": REF} instead of C{contenido}, and C{"refs": true}
when its client understands result references; a result stored as an object
comes back as C{"resultado_ref": {...}} instead of C{resultado}.  Large
payloads never travel through the broker.

A batch (C{lote}) carries several tasks, or several replies, in one
message: C{{"v": 1, "lote": [ITEM, ...]}}, where each ITEM is the body of
one task (or reply) message with C{"id"} in front, the correlation id it
would have carried as a message of its own.  An orchestrator publishes the
tasks of one reactor turn as one batch, a worker the replies of one turn
to one orchestrator (C{docs/distributed.md}); a task or reply alone
travels as a message of its own, as above.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring as _quote
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from pfo3.errors import ERROR_CODES, Pfo3Error
from pfo3.wire import RefArg, ResultRef

VERSION = 1

Outcome = Tuple[Any, Any]

_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_decoder = json.JSONDecoder()
_scan: Callable[[str, int], Tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


def _value(obj: Any) -> str:
    """
    @return: C{obj} as JSON, as L{_dumps} writes it: a string straight
        through the encoder's own quoting function, anything else through
        L{_dumps}.
    """
    return _quote(obj) if type(obj) is str else _dumps(obj)


class BadMessage(ValueError):
    """
    A body that is not a message of this protocol.
    """


def _parse(body: bytes) -> Any:
    """
    L{json.loads} for a body, with a fast path for the bodies this module
    writes (UTF-8, one JSON value and nothing around it): the decoder's
    scanner alone.  Anything else takes L{json.loads}, which gives the same
    value or raises the same error.
    """
    try:
        text = body.decode("utf-8")
        obj, end = _scan(text, 0)
    except (UnicodeDecodeError, StopIteration, ValueError, RecursionError):
        return json.loads(body)
    if end != len(text):
        return json.loads(body)
    return obj


def _load(body: bytes) -> Dict[str, Any]:
    try:
        obj = _parse(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadMessage(f"not JSON: {e}") from None
    if type(obj) is not dict:
        raise BadMessage("not a JSON object")
    if obj.get("v") != VERSION:
        raise BadMessage(f"unknown message version {obj.get('v')!r}")
    return obj


#: What a message carries, each with the correlation id it answers to: the
#: body's object, or the L{BadMessage} it is instead.
Item = Tuple[str, Union[Dict[str, Any], BadMessage]]

_BATCH = b'{"v":%d,"lote":[' % VERSION


def encode_batch(items: Sequence[Tuple[str, bytes]]) -> bytes:
    """
    @param items: C{(correlation_id, body)} of the messages to carry, each
        body as this module wrote it (a JSON object).
    @return: One batch message carrying them all.
    """
    return _BATCH + b",".join(
        b'{"id":' + _quote(correlation_id).encode("ascii") + b"," + body[1:]
        for correlation_id, body in items) + b"]}"


def items_of(body: bytes, correlation_id: Optional[str]) -> Tuple[List[Item], bool]:
    """
    @return: What C{body} carries, and whether it is a batch: its items each
        under its own id; or else the body's one object (or L{BadMessage})
        under the message's C{correlation_id}.
    """
    try:
        obj = _load(body)
    except BadMessage as e:
        return [(correlation_id or "", e)], False
    lote = obj.get("lote")
    if lote is None:
        return [(correlation_id or "", obj)], False
    if type(lote) is not list or not lote:
        return [(correlation_id or "", BadMessage("'lote' is not a list of messages"))], False
    items: List[Item] = []
    for item in lote:
        if type(item) is not dict or type(item.get("id")) is not str:
            items.append(("", BadMessage("an item of a batch needs an 'id'")))
        elif item.get("v") != VERSION:
            items.append((item["id"], BadMessage(f"unknown message version {item.get('v')!r}")))
        else:
            items.append((item.pop("id"), item))
    return items, True


def encode_item(item: Dict[str, Any]) -> bytes:
    """
    @return: An item of a batch (its C{id} taken out) as a message of its
        own.
    """
    return _dumps(item).encode("utf-8", "backslashreplace")


def _key(identidad: str, tarea_id: Optional[str]) -> str:
    """
    @return: The end of a message naming a record's key: C{identidad} when
        not empty, C{tarea_id} when not L{None}, and the closing brace.
    """
    text = f',"identidad":{_quote(identidad)}' if identidad else ""
    if tarea_id is not None:
        text += f',"tarea_id":{_quote(tarea_id)}'
    return text + "}"


def encode_task(
    tipo: str, contenido: Any, identidad: str = "", tarea_id: Optional[str] = None,
) -> bytes:
    """
    @param tipo: The task type's canonical name.
    @param contenido: Its validated C{contenido} (JSON-serialisable).
    @param identidad: Who sent it (empty: anonymous).
    @param tarea_id: Its id in the orchestrator's store, when it is recorded
        there (L{None}: not recorded); with C{identidad}, the record's key.
    @raise ValueError: if C{contenido} is not JSON-serialisable.
    """
    if type(contenido) is RefArg:
        # Only the reference (or the inline content) and the client's
        # "refs" travel; the worker reads the object.
        task: Dict[str, Any] = {"v": VERSION, "tipo": tipo, **contenido}
        if identidad:
            task["identidad"] = identidad
        if tarea_id is not None:
            task["tarea_id"] = tarea_id
        return _dumps(task).encode("utf-8", "backslashreplace")
    # The same text as _dumps of the dict, written into a template.
    end = "}" if not identidad and tarea_id is None else _key(identidad, tarea_id)
    return (f'{{"v":{VERSION},"tipo":{_value(tipo)},"contenido":{_value(contenido)}{end}'
            ).encode("utf-8", "backslashreplace")


#: A task message, decoded: C{(tipo, contenido, identidad, tarea_id)}, where
#: C{tarea_id} is its id in its orchestrator's store, L{None} when it is not
#: recorded.  (A plain tuple: the worker unpacks one per task.)
Task = Tuple[str, Any, str, Optional[str]]


def decode_task(body: bytes) -> Task:
    """
    @return: C{(tipo, contenido, identidad, tarea_id)}.
    @raise BadMessage: if C{body} is not a task message.
    """
    return task_of(_load(body))


def task_of(obj: Union[Dict[str, Any], BadMessage]) -> Task:
    """
    L{decode_task} of an L{Item}'s object.
    """
    if isinstance(obj, BadMessage):
        raise obj
    tipo = obj.get("tipo")
    identidad = obj.get("identidad", "")
    tarea_id = obj.get("tarea_id")
    if type(tipo) is not str or type(identidad) is not str or (
        tarea_id is not None and type(tarea_id) is not str
    ):
        raise BadMessage("a task message needs 'tipo' and 'contenido'; 'identidad' and "
                         "'tarea_id', when there, are strings")
    if "contenido_ref" in obj or "refs" in obj:
        arg = RefArg((k, obj[k]) for k in ("contenido_ref", "contenido", "refs") if k in obj)
        if ("contenido_ref" in arg) == ("contenido" in arg):
            raise BadMessage("a task message needs one of 'contenido' and 'contenido_ref'")
        return tipo, arg, identidad, tarea_id
    if "contenido" not in obj:
        raise BadMessage("a task message needs 'tipo' and 'contenido'")
    return tipo, obj["contenido"], identidad, tarea_id


def encode_result(
    resultado: Any, worker: Any, identidad: str = "", tarea_id: Optional[str] = None,
) -> bytes:
    """
    @param identidad: The task's C{identidad}, echoed with C{tarea_id}.
    @param tarea_id: The task's C{tarea_id}: L{None} when it is not recorded.
    @return: The reply body of a task that succeeded.
    @raise ValueError: if C{resultado} is not JSON-serialisable.
    """
    if type(resultado) is ResultRef:
        reply: Dict[str, Any] = {"v": VERSION, "estado": "ok", "resultado_ref": resultado,
                                 "worker": worker}
        return _dumps(_echo(reply, identidad, tarea_id)).encode("utf-8", "backslashreplace")
    return (f'{{"v":{VERSION},"estado":"ok","resultado":{_value(resultado)},'
            f'"worker":{_value(worker)}{"}" if tarea_id is None else _key(identidad, tarea_id)}'
            ).encode("utf-8", "backslashreplace")


def encode_failure(
    error: Pfo3Error, identidad: str = "", tarea_id: Optional[str] = None,
) -> bytes:
    """
    @return: The reply body of a task that failed with C{error} (the task's
        key echoed as in L{encode_result}).
    """
    reply = {"v": VERSION, "estado": "error", "codigo": error.codigo, "mensaje": error.mensaje}
    return _dumps(_echo(reply, identidad, tarea_id)).encode("utf-8", "backslashreplace")


def _echo(reply: Dict[str, Any], identidad: str, tarea_id: Optional[str]) -> Dict[str, Any]:
    if tarea_id is not None:
        if identidad:
            reply["identidad"] = identidad
        reply["tarea_id"] = tarea_id
    return reply


def reply_key(body: bytes) -> Optional[Tuple[str, str]]:
    """
    @return: The store key C{(identidad, tarea_id)} a reply echoes, or
        L{None} when its task is not recorded (or the body is no reply).
    """
    try:
        return key_of(_load(body))
    except BadMessage:
        return None


def key_of(obj: Union[Dict[str, Any], BadMessage]) -> Optional[Tuple[str, str]]:
    """
    L{reply_key} of an L{Item}'s object.
    """
    if isinstance(obj, BadMessage):
        return None
    identidad, tarea_id = obj.get("identidad", ""), obj.get("tarea_id")
    if type(identidad) is not str or type(tarea_id) is not str:
        return None
    return identidad, tarea_id


def decode_reply(body: bytes) -> Union[Outcome, Pfo3Error]:
    """
    @return: C{(resultado, worker)}, or the typed error the task failed with
        (of the class registered for its code; L{Pfo3Error} itself for a code
        this version does not know).
    @raise BadMessage: if C{body} is not a reply message.
    """
    return reply_of(_load(body))


def reply_of(obj: Union[Dict[str, Any], BadMessage]) -> Union[Outcome, Pfo3Error]:
    """
    L{decode_reply} of an L{Item}'s object.
    """
    if isinstance(obj, BadMessage):
        raise obj
    estado = obj.get("estado")
    if estado == "ok" and "resultado" in obj:
        return obj["resultado"], obj.get("worker")
    if estado == "ok" and type(obj.get("resultado_ref")) is dict:
        return ResultRef(obj["resultado_ref"]), obj.get("worker")
    if estado == "error":
        codigo = str(obj.get("codigo", "error_interno"))
        cls = ERROR_CODES.get(codigo, Pfo3Error)
        error = cls(str(obj.get("mensaje", "")))
        if cls is Pfo3Error:
            error.codigo = codigo  # type: ignore[misc]
        return error
    raise BadMessage("a reply needs estado 'ok' with 'resultado', or 'error'")
