"""
Property tests (hypothesis) of the wire layer, the server protocol and the
client's line parsing: whatever bytes arrive, each side answers with a
request, a reply or a typed protocol error, and never lets another
exception escape.  C{tests/test_wire.py} holds the properties of the reply
templates against L{json.dumps}; these extend them to every input.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pfo3 import wire
from pfo3.client import ClientError, TaskClient
from pfo3.errors import ERROR_CODES, Pfo3Error, error_from_reply
from pfo3.tasks import default_registry
from pfo3.testing import FakeReactor, make_server

REGISTRY = default_registry(entry_points=False)

FIELDS = ["tarea_id", "tipo", "contenido", "esperar", "op"]

#: Any JSON value, small.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=8,
)

#: Values that a fuzzer puts in a request's fields: the right ones, the
#: wrong types, huge numbers, lone surrogates.
field_values = st.one_of(
    json_values,
    st.sampled_from(["1", "2", "3", "4", 1, 2, 3, 4, "uppercase", "reverse", "word_count",
                     "sleep", "mayus", " SLEEP ", "ping", "tipos", "estado", True, False,
                     "0.001", "1e3", "-0", 0, -1, 10**30, 1e308, -1e308, "\ud800", "a\udfffb"]),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
)

#: Request objects with any subset of the protocol's fields, and more.
requests = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=6), field_values, max_size=6)


def _line(obj: Dict[str, Any]) -> bytes:
    """
    A request as a client may write it: JSON, ASCII or not; a lone surrogate
    written as its escape.
    """
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace")


def _mutate(line: bytes, data: st.DataObject) -> bytes:
    """
    Flip, insert, delete or truncate a few bytes of a line.
    """
    buf = bytearray(line)
    for _ in range(data.draw(st.integers(0, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if not buf:
            break
        at = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[at] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del buf[at]
        else:
            del buf[at:]
    return bytes(buf).replace(b"\n", b" ")


def _nested(depth: int, opener: bytes, closer: bytes) -> bytes:
    return b'{"tipo": "1", "contenido": ' + opener * depth + closer * depth + b"}"


def _decode_or_typed_error(line: bytes) -> Optional[wire.Request]:
    """
    Decode a line; a L{Pfo3Error} must be a registered code, and the error
    line written from it must be valid UTF-8 JSON carrying that code.
    """
    try:
        return wire.decode_request(line, REGISTRY)
    except Pfo3Error as e:
        assert ERROR_CODES[e.codigo] is type(e)
        assert e.mensaje
        reply = json.loads(wire.encode_error(e).decode("utf-8"))
        assert reply == {"estado": "error", "mensaje": e.mensaje, "codigo": e.codigo,
                         "tarea_id": e.tarea_id}
        return None


@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_request_or_a_typed_error(line: bytes) -> None:
    """
    Any bytes at all decode to a request or raise a registered
    L{Pfo3Error} whose error line is valid JSON; never another exception.
    """
    _decode_or_typed_error(line)


@given(requests)
def test_any_object_decodes_to_a_valid_request_or_a_typed_error(obj: Dict[str, Any]) -> None:
    """
    Any JSON object, with the protocol's fields holding any values (wrong
    types, huge numbers, lone surrogates), decodes to a request whose
    fields obey the protocol, or raises a registered L{Pfo3Error}; a task
    error names the task's id.
    """
    req = _decode_or_typed_error(_line(obj))
    if isinstance(req, wire.TaskRequest):
        assert type(req.tarea_id) is str and 1 <= len(req.tarea_id) <= wire.MAX_TASK_ID
        assert req.esperar in (None, True, False)
        assert "op" not in obj
        if "tarea_id" in obj and obj["tarea_id"] is not None:
            assert req.tarea_id == obj["tarea_id"]
    elif isinstance(req, wire.ControlRequest):
        assert req.op in wire.OPERATIONS and req.op == obj["op"]
        assert req.op != "estado" or req.tarea_id is not None


@given(requests, st.data())
def test_mutated_requests_decode_or_fail_typed(obj: Dict[str, Any], data: st.DataObject) -> None:
    """
    A request line with bytes flipped, inserted, deleted or cut off (so
    invalid UTF-8 and broken JSON) decodes or raises a registered
    L{Pfo3Error}.
    """
    _decode_or_typed_error(_mutate(_line(obj), data))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200_000), st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
def test_deep_nesting_is_a_typed_error_or_a_request(
    depth: int, brackets: Any
) -> None:
    """
    Arrays or objects nested to any depth, closed or not, never escape as a
    RecursionError: they are a request (then refused by its type) or
    C{json_invalido}.
    """
    opener, closer = brackets
    _decode_or_typed_error(_nested(depth, opener, closer))
    _decode_or_typed_error(_nested(depth, opener, b""))


#: A reply's C{tarea_id}: any text, lone surrogates included.
tarea_ids = st.text(min_size=1, max_size=40)


@given(resultado=json_values, tarea_id=tarea_ids, worker=st.integers(0, 64) | st.text())
def test_task_result_round_trips(resultado: Any, tarea_id: str, worker: Any) -> None:
    """
    A task's success reply, encoded and decoded as a client does, gives
    back its result, id and worker.
    """
    line = wire.encode_reply(wire.TaskResult(tarea_id, resultado, worker))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert wire.decode_reply(line) == {
        "estado": "ok", "resultado": resultado, "tarea_id": tarea_id, "worker": worker}


@given(resultado=json_values, tarea_id=st.none() | tarea_ids)
def test_control_result_round_trips(resultado: Any, tarea_id: Optional[str]) -> None:
    """
    A control reply round trips; it names its id only when there is one.
    """
    line = wire.encode_reply(wire.ControlResult(tarea_id, resultado))
    assert line.count(b"\n") == 1
    expected: Dict[str, Any] = {"estado": "ok", "resultado": resultado}
    if tarea_id is not None:
        expected["tarea_id"] = tarea_id
    assert wire.decode_reply(line) == expected


@given(tarea_id=tarea_ids)
def test_accepted_round_trips(tarea_id: str) -> None:
    """
    The reply C{aceptada} round trips with its id.
    """
    line = wire.encode_reply(wire.AcceptedResult(tarea_id))
    assert wire.decode_reply(line) == {"estado": "aceptada", "tarea_id": tarea_id}


@given(codigo=st.sampled_from(sorted(ERROR_CODES)), mensaje=st.text(min_size=1),
       tarea_id=st.none() | tarea_ids)
def test_every_error_round_trips_to_its_class(
    codigo: str, mensaje: str, tarea_id: Optional[str]
) -> None:
    """
    Every error code, encoded and decoded as a client does, is rebuilt as
    an instance of its own class with the same message and id.
    """
    line = wire.encode_error(ERROR_CODES[codigo](mensaje, tarea_id))
    line.decode("utf-8")
    error = error_from_reply(wire.decode_reply(line))
    assert type(error) is ERROR_CODES[codigo]
    assert (error.codigo, error.mensaje, error.tarea_id) == (codigo, mensaje, tarea_id)


@given(tipo=st.sampled_from(["uppercase", "reverse", "word_count", 1, 2, 3, "mayus"]),
       contenido=st.text(), tarea_id=tarea_ids, esperar=st.none() | st.booleans())
def test_client_request_round_trips(
    tipo: Any, contenido: str, tarea_id: str, esperar: Optional[bool]
) -> None:
    """
    Every text task the client helpers encode decodes, on the server, to
    the same id, content and C{esperar}.
    """
    line = wire.encode_request(tipo, contenido, tarea_id, esperar)
    req = wire.decode_request(line.rstrip(b"\n"), REGISTRY)
    assert isinstance(req, wire.TaskRequest)
    assert (req.tarea_id, req.arg, req.esperar) == (tarea_id, contenido, esperar)


# -- object storage (docs/blobs.md) and tokens -----------------------------------

#: References as the server hands them out.
server_refs = st.builds(lambda k, h: k + h, st.sampled_from(["u", "r"]),
                        st.text(alphabet="0123456789abcdef", min_size=32, max_size=32))

#: Texts that JSON gives back as they were (no surrogate, paired or not).
plain_texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1)

#: References as the server hands them out, and ones it does not.
refs_ = st.one_of(
    server_refs,
    st.sampled_from(["", "u", "../etc/passwd", "u" + "0" * 31, "x" * 33]),
    field_values,
)

#: Requests that involve object storage or a token: C{op: subir} with
#: C{bytes}, tasks with C{contenido_ref} and C{refs}, and any of the
#: protocol's fields beside them, right or wrong.
blob_requests = st.one_of(
    st.fixed_dictionaries(
        {"op": st.just("subir")},
        optional={"bytes": st.integers(-5, 2**64) | field_values, "tarea_id": field_values,
                  "token": field_values}),
    st.fixed_dictionaries(
        {"tipo": st.sampled_from(["uppercase", "reverse", "word_count", "sleep", 1, 4])
         | field_values},
        optional={"contenido_ref": refs_, "refs": st.booleans() | field_values,
                  "contenido": field_values, "esperar": st.booleans() | field_values,
                  "tarea_id": field_values, "token": st.text(min_size=1) | field_values}),
    st.dictionaries(st.sampled_from(
        FIELDS + ["contenido_ref", "refs", "bytes", "token"]), field_values | refs_,
        max_size=7),
)


def _check_blob_request(obj: Dict[str, Any], req: Optional[wire.Request]) -> None:
    """
    What a request that decoded must hold, given the object it came from.
    """
    if req is None:
        return
    token = obj.get("token")
    assert req.token == token and (token is None or (type(token) is str and token))
    if isinstance(req, wire.UploadRequest):
        assert obj["op"] == "subir" and req.op == "subir"
        assert type(obj["bytes"]) is int and req.size == obj["bytes"] >= 1
    elif isinstance(req, wire.RefTaskRequest):
        assert "contenido_ref" in obj or "refs" in obj
        arg = req.arg
        assert isinstance(arg, wire.RefArg)
        if "contenido_ref" in obj:
            assert "contenido" not in obj and "contenido" not in arg
            assert type(obj["contenido_ref"]) is str and arg.ref == obj["contenido_ref"]
        else:
            assert arg.ref is None and "contenido" in arg
        assert arg.refs is (obj.get("refs") is True)
        assert obj.get("refs") in (None, True, False)
    elif isinstance(req, wire.TaskRequest):
        assert "contenido_ref" not in obj and "refs" not in obj


@given(blob_requests)
def test_object_storage_requests_decode_or_fail_typed(obj: Dict[str, Any]) -> None:
    """
    Any object with the object-storage fields (C{op: subir} and C{bytes},
    C{contenido_ref}, C{refs}) and a C{token}, holding any values, decodes
    to the request they describe, each field carried over as sent, or
    raises a registered L{Pfo3Error}.
    """
    _check_blob_request(obj, _decode_or_typed_error(_line(obj)))


@given(blob_requests, st.data())
def test_mutated_object_storage_requests_decode_or_fail_typed(
    obj: Dict[str, Any], data: st.DataObject
) -> None:
    """
    The same requests with bytes flipped, inserted, deleted or cut off
    decode or raise a registered L{Pfo3Error}, never another exception.
    """
    _decode_or_typed_error(_mutate(_line(obj), data))


@given(size=st.integers(1, 2**63), tarea_id=st.none() | tarea_ids,
       token=st.none() | st.text(min_size=1))
def test_upload_request_round_trips(size: int, tarea_id: Optional[str],
                                    token: Optional[str]) -> None:
    """
    C{{"op": "subir", "bytes": N}}, with any id and token, decodes to an
    upload of N bytes with them.
    """
    obj: Dict[str, Any] = {"op": "subir", "bytes": size}
    if tarea_id is not None:
        obj["tarea_id"] = tarea_id
    if token is not None:
        obj["token"] = token
    req = wire.decode_request(_line(obj), REGISTRY)
    assert isinstance(req, wire.UploadRequest)
    assert (req.size, req.tarea_id, req.token) == (size, tarea_id, token)


@given(ref=server_refs | plain_texts, refs=st.none() | st.booleans(),
       tarea_id=tarea_ids, esperar=st.none() | st.booleans(),
       token=st.none() | st.text(min_size=1))
def test_content_reference_round_trips(ref: str, refs: Optional[bool], tarea_id: str,
                                       esperar: Optional[bool], token: Optional[str]) -> None:
    """
    A task with C{contenido_ref} (any text: the shape is checked where the
    object is read) and C{refs} decodes to a reference task carrying them.
    """
    obj: Dict[str, Any] = {"tipo": "uppercase", "contenido_ref": ref, "tarea_id": tarea_id}
    for name, value in (("refs", refs), ("esperar", esperar), ("token", token)):
        if value is not None:
            obj[name] = value
    req = wire.decode_request(_line(obj), REGISTRY)
    assert isinstance(req, wire.RefTaskRequest)
    assert (req.tarea_id, req.arg.ref, req.arg.refs, req.esperar, req.token) == (
        tarea_id, ref, bool(refs), esperar, token)


@given(tarea_id=st.none() | tarea_ids, worker=st.integers(0, 64) | st.text(),
       ref=server_refs, size=st.integers(0, 2**63),
       sha256=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
       url=st.none() | st.text(), expira=st.none() | st.floats(0, 4e9))
def test_result_ref_round_trips(tarea_id: Optional[str], worker: Any, ref: Any, size: int,
                                sha256: str, url: Optional[str],
                                expira: Optional[float]) -> None:
    """
    A result stored as an object (C{resultado_ref}), encoded and decoded as
    a client does, gives back its reference, size, SHA-256, URL and
    expiry, its id and worker, on one valid UTF-8 line.
    """
    stored = wire.ResultRef(ref=ref, bytes=size, sha256=sha256, url=url, expira=expira)
    line = wire.encode_result_ref(tarea_id, stored, worker)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    line.decode("utf-8")
    assert wire.decode_reply(line) == {
        "estado": "ok", "resultado_ref": dict(stored), "tarea_id": tarea_id, "worker": worker}


# -- the server protocol, fed any bytes in any pieces --------------------------

stream_lines = st.one_of(
    requests.map(_line),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from([b"", b"   ", b"\r", b"\t\r", b'{"op": "ping"}\r', b"\xed\xa0\x80",
                     b'{"tipo": 4, "contenido": 0.5}', b'{"tipo": 1, "contenido": "x"}']),
)


def _complete_lines(stream: bytes) -> List[bytes]:
    """
    The lines of a stream that the server must answer: complete, not blank.
    """
    out = []
    for line in stream.split(b"\n")[:-1]:
        if line[-1:] == b"\r":
            line = line[:-1]
        if line and not line.isspace():
            out.append(line)
    return out


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(stream_lines, max_size=12), st.binary(max_size=10), st.data())
def test_server_answers_every_line_once_in_any_chunking(
    lines: List[bytes], tail: bytes, data: st.DataObject
) -> None:
    """
    The real server protocol, fed any lines cut into any pieces, writes one
    valid JSON reply per complete line that is not blank (blank lines get
    none, a partial last line none yet), each a success, C{aceptada} or a
    registered error code; the connection stays open.
    """
    stream = b"\n".join(lines) + (b"\n" if lines else b"") + tail.replace(b"\n", b"")
    reactor = FakeReactor()
    factory = make_server(reactor=reactor, timeout=5.0)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    start = 0
    for cut in [*cuts, len(stream)]:
        proto.dataReceived(stream[start:cut])
        start = cut
    reactor.advance(10)
    reactor.advance(10)
    out = transport.value()
    assert out == b"" or out.endswith(b"\n")
    replies = [json.loads(x.decode("utf-8")) for x in out.splitlines()]
    assert len(replies) == len(_complete_lines(stream))
    for reply in replies:
        assert reply["estado"] in ("ok", "aceptada", "error")
        if reply["estado"] == "error":
            assert reply["codigo"] in ERROR_CODES
            assert reply["codigo"] != "error_interno", reply
    assert not transport.disconnecting


# -- the client's line parsing ---------------------------------------------------


def _client_with_pending(ids: List[str]) -> Any:
    client = TaskClient(Clock())
    transport = StringTransport()
    client.makeConnection(transport)
    outcomes: Dict[str, List[Any]] = {}
    for tarea_id in ids:
        d: Deferred[Any] = client.submit("uppercase", "x", tarea_id=tarea_id)
        box: List[Any] = []
        d.addBoth(box.append)
        outcomes[tarea_id] = box
    return client, transport, outcomes


reply_lines = st.one_of(
    st.binary(max_size=60),
    st.builds(lambda o: json.dumps(o).encode(), st.dictionaries(
        st.sampled_from(["estado", "tarea_id", "codigo", "mensaje", "resultado", "worker"]),
        field_values | st.sampled_from(["ok", "error", "aceptada", "a", "b"]), max_size=6)),
)


@given(st.lists(reply_lines, max_size=8), st.data())
def test_client_survives_any_line_from_the_server(
    lines: List[bytes], data: st.DataObject
) -> None:
    """
    Whatever lines a server sends, in whatever pieces, the client raises
    nothing: each pending request is still pending, answered, or failed
    with a typed error (L{Pfo3Error} or L{ClientError}); a line that is not
    a JSON object makes it close the connection.
    """
    client, transport, outcomes = _client_with_pending(["a", "b"])
    stream = b"\n".join(x.replace(b"\n", b"") for x in lines) + b"\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    start = 0
    for cut in [*cuts, len(stream)]:
        client.dataReceived(stream[start:cut])
        start = cut
    for box in outcomes.values():
        assert len(box) <= 1
        if box and isinstance(box[0], Failure):
            assert isinstance(box[0].value, (Pfo3Error, ClientError)), box[0]
            box[0].trap(Pfo3Error, ClientError)
        elif box:
            assert box[0]["estado"] == "ok"


@given(st.permutations(["a", "b", "c", "d"]), st.data())
def test_client_matches_replies_in_any_order_and_chunking(
    order: List[str], data: st.DataObject
) -> None:
    """
    Replies in any order, cut into any pieces (a byte at a time included),
    each fire their own request once: successes with their result, errors
    with the typed error of their code.
    """
    client, transport, outcomes = _client_with_pending(["a", "b", "c", "d"])
    stream = b"".join(
        wire.encode_error(ERROR_CODES["timeout"]("t", i)) if i == "c"
        else wire.encode_ok(i, i.upper(), 1) for i in order)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=len(stream))))
    start = 0
    for cut in [*cuts, len(stream)]:
        client.dataReceived(stream[start:cut])
        start = cut
    assert client.pending == 0
    for tarea_id, box in outcomes.items():
        assert len(box) == 1
        if tarea_id == "c":
            assert isinstance(box[0], Failure) and box[0].value.codigo == "timeout"
            box[0].trap(Pfo3Error)
        else:
            assert box[0]["resultado"] == tarea_id.upper()
    assert not transport.disconnecting
