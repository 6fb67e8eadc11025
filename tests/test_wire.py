"""
Tests for L{pfo3.wire}: decoding requests and encoding replies.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Dict, List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pfo3 import wire
from pfo3.errors import ERROR_CODES, InvalidJSON, Pfo3Error
from pfo3.tasks import SLEEP, UPPERCASE, WORD_COUNT, default_registry

REGISTRY = default_registry(entry_points=False)

#: (request line, expected error code): every bad input the decoder refuses.
BAD_LINES = [
    (b"nope", "json_invalido"),
    (b'{"tipo": "1", "contenido": "x"', "json_invalido"),
    (b"[" * 100_000 + b"]" * 100_000, "json_invalido"),
    (b"\xff\xfe{}", "utf8_invalido"),
    (b"[1, 2]", "no_es_objeto"),
    (b'"hola"', "no_es_objeto"),
    (b"null", "no_es_objeto"),
    (b'{"contenido": "hola"}', "tipo_faltante"),
    (b'{"tipo": null, "contenido": "hola"}', "tipo_faltante"),
    (b'{"tipo": "no-such", "contenido": "hola"}', "tipo_desconocido"),
    (b'{"tipo": 99, "contenido": "hola"}', "tipo_desconocido"),
    (b'{"tipo": true, "contenido": "hola"}', "tipo_desconocido"),
    (b'{"tipo": 1.0, "contenido": "hola"}', "tipo_desconocido"),
    (b'{"tipo": ["uppercase"], "contenido": "hola"}', "tipo_desconocido"),
    (b'{"tipo": {"a": 1}, "contenido": "hola"}', "tipo_desconocido"),
    (b'{"tipo": "uppercase"}', "contenido_faltante"),
    (b'{"tipo": "uppercase", "contenido": 5}', "contenido_invalido"),
    (b'{"tipo": "reverse", "contenido": null}', "contenido_invalido"),
    (b'{"tipo": "word_count", "contenido": ["a"]}', "contenido_invalido"),
    (b'{"tipo": "sleep"}', "contenido_faltante"),
    (b'{"tipo": "sleep", "contenido": "abc"}', "contenido_invalido"),
    (b'{"tipo": "sleep", "contenido": -1}', "contenido_invalido"),
    (b'{"tipo": "sleep", "contenido": "-0.5"}', "contenido_invalido"),
    (b'{"tipo": "sleep", "contenido": NaN}', "json_invalido"),
    (b'{"tipo": "sleep", "contenido": "nan"}', "contenido_invalido"),
    (b'{"tipo": "sleep", "contenido": Infinity}', "json_invalido"),
    (b'{"tipo": "sleep", "contenido": -Infinity}', "json_invalido"),
    (b"NaN", "json_invalido"),
    (b'{"tipo": "sleep", "contenido": "1_0"}', "contenido_invalido"),
    (b'{"tipo": "sleep", "contenido": "\\u0661"}', "contenido_invalido"),
    (b'{"tipo": "sleep", "contenido": "1e3"}', "contenido_invalido"),
    (b'{"tipo": "sleep", "contenido": "0x10"}', "contenido_invalido"),
    (b'{"tipo": "sleep", "contenido": ""}', "contenido_invalido"),
    (b'{"tipo": "sleep", "contenido": ' + b"1" * 5000 + b"}", "json_invalido"),
    (b'{"tipo": "sleep", "contenido": "inf"}', "contenido_invalido"),
    (b'{"tipo": "sleep", "contenido": 1e999}', "contenido_invalido"),
    (b'{"tipo": "sleep", "contenido": true}', "contenido_invalido"),
    (b'{"tipo": "sleep", "contenido": [1]}', "contenido_invalido"),
    (b'{"tarea_id": 7, "tipo": "1", "contenido": "x"}', "tarea_id_invalido"),
    (b'{"tarea_id": "", "tipo": "1", "contenido": "x"}', "tarea_id_invalido"),
    (b'{"tarea_id": "' + b"x" * 257 + b'", "tipo": "1", "contenido": "x"}', "tarea_id_invalido"),
    (b'{"op": "reboot"}', "op_desconocida"),
    (b'{"op": ["ping"]}', "op_desconocida"),
]


@pytest.mark.parametrize(
    "line,codigo", BAD_LINES, ids=[c + ":" + repr(b[:30]) for b, c in BAD_LINES]
)
def test_bad_input_raises_its_code(line: bytes, codigo: str) -> None:
    """
    Each malformed request raises the documented error class for its code,
    with a non-empty Spanish message.
    """
    with pytest.raises(Pfo3Error) as info:
        wire.decode_request(line, REGISTRY)
    assert info.value.codigo == codigo
    assert type(info.value) is ERROR_CODES[codigo]
    assert info.value.mensaje


def test_error_keeps_the_clients_tarea_id() -> None:
    """
    Once the request's tarea_id is known, a validation error carries it.
    """
    with pytest.raises(Pfo3Error) as info:
        wire.decode_request(b'{"tarea_id": "t9", "tipo": "zzz", "contenido": 1}', REGISTRY)
    assert info.value.tarea_id == "t9"


def test_error_of_request_without_id_carries_generated_id() -> None:
    """
    A task request without tarea_id that fails validation is still answered
    with a (generated) tarea_id, so pipelining clients see which line failed.
    """
    with pytest.raises(Pfo3Error) as info:
        wire.decode_request(b'{"tipo": "zzz"}', REGISTRY)
    tarea_id = info.value.tarea_id
    assert tarea_id is not None
    assert str(uuid.UUID(tarea_id)) == tarea_id


def test_seed_request_decodes() -> None:
    """
    The seed client's request decodes to the task type and content it named.
    """
    req = wire.decode_request(
        b'{"tarea_id": "4cbc8d09", "tipo": "uppercase", "contenido": "hola mundo"}', REGISTRY
    )
    assert isinstance(req, wire.TaskRequest)
    assert (req.tarea_id, req.tasktype, req.arg) == ("4cbc8d09", UPPERCASE, "hola mundo")


def test_missing_tarea_id_gets_a_uuid() -> None:
    """
    A request without tarea_id gets a fresh UUID.
    """
    a = wire.decode_request(b'{"tipo": 1, "contenido": "x"}', REGISTRY)
    b = wire.decode_request(b'{"tipo": 1, "contenido": "x"}', REGISTRY)
    assert isinstance(a, wire.TaskRequest) and isinstance(b, wire.TaskRequest)
    assert str(uuid.UUID(a.tarea_id)) == a.tarea_id
    assert a.tarea_id != b.tarea_id


ALIASES = [
    ("1", "uppercase"), (1, "uppercase"), ("uppercase", "uppercase"), ("mayus", "uppercase"),
    ("mayusculas", "uppercase"), ("upper", "uppercase"), ("  UPPER  ", "uppercase"),
    ("2", "reverse"), (2, "reverse"), ("reverse", "reverse"), ("reversa", "reverse"),
    ("invertir", "reverse"), ("Invertir", "reverse"),
    ("3", "word_count"), (3, "word_count"), ("word_count", "word_count"),
    ("contar", "word_count"), ("palabras", "word_count"), (" 3 ", "word_count"),
    ("4", "sleep"), (4, "sleep"), ("sleep", "sleep"), ("espera", "sleep"), ("DELAY", "sleep"),
]


@pytest.mark.parametrize("tipo,name", ALIASES)
def test_seed_codes_and_aliases(tipo: Any, name: str) -> None:
    """
    Every code and alias the seed accepted (trimmed, any case, integer or
    string code) names the same task type.
    """
    contenido = "1" if name == "sleep" else "hola"
    line = json.dumps({"tipo": tipo, "contenido": contenido}).encode()
    req = wire.decode_request(line, REGISTRY)
    assert isinstance(req, wire.TaskRequest)
    assert req.tasktype.name == name


@pytest.mark.parametrize("contenido,seconds", [(1, 1.0), ("2.5", 2.5), (0, 0.0), (" 3 ", 3.0)])
def test_sleep_accepts_numbers_and_numeric_strings(contenido: Any, seconds: float) -> None:
    """
    sleep takes a number or a numeric string of seconds.
    """
    req = wire.decode_request(json.dumps({"tipo": 4, "contenido": contenido}).encode(), REGISTRY)
    assert isinstance(req, wire.TaskRequest)
    assert req.tasktype is SLEEP and req.arg == seconds


def test_control_requests() -> None:
    """
    A request with "op" is a control request, never a task, and keeps an
    optional tarea_id.
    """
    ping = wire.decode_request(b'{"op": "ping"}', REGISTRY)
    assert isinstance(ping, wire.ControlRequest) and ping.op == "ping" and ping.tarea_id is None
    tipos = wire.decode_request(b'{"op": "tipos", "tarea_id": "m", "tipo": 1}', REGISTRY)
    assert isinstance(tipos, wire.ControlRequest) and (tipos.op, tipos.tarea_id) == ("tipos", "m")


def _reference(reply: Dict[str, Any]) -> bytes:
    return (json.dumps(reply, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(resultado=json_values, tarea_id=st.text(min_size=1), worker=st.integers(0, 64) | st.text())
def test_encode_ok_matches_json_dumps(resultado: Any, tarea_id: str, worker: Any) -> None:
    """
    The templated success line is exactly what json.dumps writes, for any
    JSON result, identifier (including lone surrogates) and worker.
    """
    line = wire.encode_ok(tarea_id, resultado, worker)
    reply = {"estado": "ok", "resultado": resultado, "tarea_id": tarea_id, "worker": worker}
    assert line == _reference(reply)
    line.decode("utf-8")
    assert json.loads(line) == reply


@given(mensaje=st.text(), tarea_id=st.none() | st.text(min_size=1))
def test_encode_error_matches_json_dumps(mensaje: str, tarea_id: Any) -> None:
    """
    The templated error line is exactly what json.dumps writes.
    """
    from pfo3.errors import InvalidJSON

    line = wire.encode_error(InvalidJSON(mensaje), tarea_id)
    assert line == _reference(
        {"estado": "error", "mensaje": mensaje, "codigo": "json_invalido", "tarea_id": tarea_id}
    )


def test_lone_surrogate_round_trips_as_valid_utf8() -> None:
    """
    A lone surrogate sent as a JSON escape comes back as the same escape in
    a reply that is valid UTF-8.
    """
    req = wire.decode_request(b'{"tarea_id": "s", "tipo": 2, "contenido": "a\\ud800b"}', REGISTRY)
    assert isinstance(req, wire.TaskRequest)
    line = wire.encode_ok(req.tarea_id, req.tasktype.run(req.arg), 0)
    line.decode("utf-8")
    assert json.loads(line)["resultado"] == "b\ud800a"


def test_result_that_is_not_json_fails_loudly() -> None:
    """
    A result JSON cannot carry (NaN, a set) raises an internal error, whose
    cause says why, instead of writing invalid JSON.
    """
    from pfo3.errors import InternalError

    with pytest.raises(InternalError) as nan:
        wire.encode_ok("t", float("nan"), 0)
    assert isinstance(nan.value.__cause__, ValueError)
    with pytest.raises(InternalError) as unknown:
        wire.encode_ok("t", {1, 2}, 0)
    assert isinstance(unknown.value.__cause__, TypeError)


def test_client_helpers_round_trip() -> None:
    """
    encode_request and encode_operation produce lines the server decodes to
    the same request; decode_reply refuses non-objects.
    """
    req = wire.decode_request(wire.encode_request("contar", "a b", "id1").rstrip(b"\n"), REGISTRY)
    assert isinstance(req, wire.TaskRequest)
    assert (req.tarea_id, req.tasktype, req.arg) == ("id1", WORD_COUNT, "a b")
    op = wire.decode_request(wire.encode_operation("ping", "p").rstrip(b"\n"), REGISTRY)
    assert isinstance(op, wire.ControlRequest) and (op.op, op.tarea_id) == ("ping", "p")
    assert wire.encode_request(3) == b'{"tipo": 3}\n'
    assert wire.decode_reply(b'{"estado": "ok"}\n') == {"estado": "ok"}
    with pytest.raises(ValueError):
        wire.decode_reply(b"[1]")


json_texts = st.builds(
    lambda v, pre, post: pre + json.dumps(v) + post,
    json_values, st.sampled_from(["", " ", "\t"]), st.sampled_from(["", " ", "x", "}"]),
) | st.text(max_size=20)


@given(text=json_texts)
def test_fast_parse_agrees_with_json_loads(text: str) -> None:
    """
    The decoder's fast path returns what json.loads returns, raises the
    same error message for what json.loads refuses, and refuses NaN and
    Infinity, which json.loads accepts and standard JSON does not.
    """
    constants: List[str] = []
    try:
        expected = json.loads(text, parse_constant=lambda c: constants.append(c))
    except ValueError as e:
        if constants:  # refused at the constant, before the later error
            with pytest.raises(InvalidJSON):
                wire._parse(text)
        else:
            with pytest.raises(ValueError) as info:
                wire._parse(text)
            assert str(info.value) == str(e)
    else:
        if constants:
            with pytest.raises(InvalidJSON):
                wire._parse(text)
        else:
            assert repr(wire._parse(text)) == repr(expected)


def test_every_error_code_is_documented() -> None:
    """
    docs/protocol.md's table of error codes lists every code the server can
    send, and no code it cannot.
    """
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = text.split("### Error codes", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", section, re.MULTILINE))
    assert documented == set(ERROR_CODES)


# --- the line limit on replies -------------------------------------------------


def _task_reply(resultado: Any, tarea_id: str = "t") -> wire.TaskResult:
    return wire.TaskResult(tarea_id, resultado, 1)


@pytest.mark.parametrize("resultado", [
    # 1855 bytes of "ΐ" (2 bytes each), upper-cased: three letters of 2
    # bytes each, 5464 bytes in the line.
    ("ΐ" * (1855 // 2)).upper(),
    # 1700 newlines: 1700 bytes of result, 3400 bytes escaped.
    "\n" * 1700,
    # A control character takes six bytes escaped.
    "\x01" * 400,
    ["\n"] * 400,
])
def test_reply_line_longer_than_the_limit_is_refused(resultado: Any) -> None:
    """
    A task's reply whose encoded line passes C{max_line} bytes raises
    C{resultado_demasiado_grande}, naming the line's size and the limit,
    whatever the result's own size: the check is on the line, after JSON
    escaping.
    """
    from pfo3.errors import ResultTooLarge

    line = wire.encode_reply(_task_reply(resultado))  # no limit: written
    assert len(line) - 1 > 2000
    with pytest.raises(ResultTooLarge) as e:
        wire.encode_reply(_task_reply(resultado), 2000)
    assert e.value.codigo == "resultado_demasiado_grande"
    assert e.value.tarea_id == "t"
    assert f"{len(line) - 1} bytes" in e.value.mensaje
    assert "2000" in e.value.mensaje and '"refs": true' in e.value.mensaje
    error_line = wire.encode_error(e.value)
    assert len(error_line) < 2000
    assert json.loads(error_line)["codigo"] == "resultado_demasiado_grande"


def test_reply_line_up_to_the_limit_is_written() -> None:
    """
    A reply line of exactly C{max_line} bytes (its C{\\n} not counted) is
    written; one byte more is refused.
    """
    from pfo3.errors import ResultTooLarge

    base = len(wire.encode_reply(_task_reply(""))) - 1
    exact = wire.encode_reply(_task_reply("x" * 100), base + 100)
    assert len(exact) == base + 101 and json.loads(exact)["resultado"] == "x" * 100
    with pytest.raises(ResultTooLarge):
        wire.encode_reply(_task_reply("x" * 101), base + 100)


def test_result_reference_lines_are_checked_too() -> None:
    """
    A C{resultado_ref} reply is held to the same limit (a presigned URL can
    be long); control replies, the server's own, are not.
    """
    from pfo3.errors import ResultTooLarge

    ref = wire.ResultRef(ref="r" + "0" * 32, bytes=10, sha256="0" * 64,
                         url="http://s3.test/" + "q" * 3000, expira=1.0)
    with pytest.raises(ResultTooLarge):
        wire.encode_reply(_task_reply(ref), 2000)
    assert "resultado_ref" in json.loads(wire.encode_reply(_task_reply(ref), 4000))
    control = wire.encode_reply(wire.ControlResult("c", "x" * 3000), 2000)
    assert json.loads(control)["resultado"] == "x" * 3000
