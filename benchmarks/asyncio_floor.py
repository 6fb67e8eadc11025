"""
The floor: the cheapest Python server known for pfo3's protocol, on asyncio.

A floor is what pfo3's features are measured against, so it takes every
trick pfo3 takes, and any other that is cheaper and still answers every
line with a correct JSON reply:

  - B{one write per read}: the replies to the lines of a chunk leave in one
    C{transport.write}, and are encoded to UTF-8 once, together (pfo3
    encodes each reply, then joins them);
  - B{reads from the heap}: C{recv()} asks for at most 64 KiB, as Twisted
    does, rather than asyncio's 256 KiB, which the allocator maps and
    unmaps on every read;
  - B{one decode per read}: the complete lines of a chunk are decoded from
    UTF-8 at once and split as text; only a chunk that is not valid UTF-8
    is decoded line by line, to answer the bad lines alone;
  - B{the same JSON}: the standard library's, as pfo3 has it: the scanner
    alone on a line that is exactly one JSON value (pfo3's C{wire._parse}),
    and replies written into fixed templates with the C encoder of JSON
    strings (pfo3's C{wire.encode_reply}), never C{json.dumps};
  - B{the same garbage collector settings}: once set up, C{gc.freeze()} and
    a youngest-generation threshold of 10,000 allocations, as
    C{twistd pfo3} does on its default C{--gc-threshold};
  - B{a fast path for the expected request}: a line whose object has a
    C{tarea_id} text, a C{tipo} that is a name or code as sent and a text
    C{contenido} is answered straight from a dict of the three text tasks;
    anything else takes the slow path, which validates like pfo3 does and
    answers with pfo3's error codes (C{json_invalido}, C{utf8_invalido},
    C{no_es_objeto}, C{tarea_id_invalido}, C{tipo_faltante},
    C{tipo_desconocido}, C{contenido_faltante}, C{contenido_invalido},
    C{excede_timeout}, C{op_desconocida}), so the fast path's shortcuts never
    change an answer.

It runs on asyncio's own event loop, as pfo3 runs on Twisted's own reactor:
both are Python over C{epoll}.  A loop written in C (uvloop) would be the
floor of another comparison, one in which pfo3 would run on it too.

What it leaves out is what pfo3 adds: limits (line length, tasks in flight,
buffers, connections), backpressure, timeouts, statistics, the results
store, authentication and the other control operations (only C{ping} is
answered).  A sleep is a C{call_later}, so the same task mixes run against
it.  It imports neither Twisted nor pfo3: their tens of thousands of objects
would be frozen out of the collector's reach all the same, but this keeps
the process as small as it can be.

    python benchmarks/asyncio_floor.py --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import math
import re
from json.encoder import encode_basestring as _quote
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

#: The collector's youngest-generation threshold set at start: the default
#: of C{twistd pfo3 --gc-threshold} (the tests check they agree).
DEFAULT_GC_THRESHOLD = 10_000
#: Bytes asked of C{recv()} at a time, as Twisted's C{bufferSize}.
READ_SIZE = 64 * 1024
#: Longest C{tarea_id}, as pfo3's C{wire.MAX_TASK_ID}.
MAX_TASK_ID = 256
#: A sleep must be shorter than this, as on pfo3's default C{--timeout}.
TIMEOUT = 30.0


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")


_decoder = json.JSONDecoder(parse_constant=_refuse_constant)
_decode = _decoder.decode
_scan: Callable[[str, int], Tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


_OK = '{"estado": "ok", "resultado": %s, "tarea_id": %s, "worker": 0}\n'
_ERROR = '{"estado": "error", "mensaje": %s, "codigo": %s, "tarea_id": %s}\n'
_PONG = '{"estado": "ok", "resultado": "pong"}\n'
_PONG_ID = '{"estado": "ok", "resultado": "pong", "tarea_id": %s}\n'


def _upper(text: str) -> str:
    return _quote(text.upper())


def _reverse(text: str) -> str:
    return _quote(text[::-1])


def _word_count(text: str) -> str:
    return int.__repr__(len(text.split()))


#: Each text task by every text a request may name it with, as sent (the
#: slow path trims and lower-cases, and takes integer codes: C{True} and
#: C{1.0} are equal to C{1} as keys, and must not be taken for it): its
#: function returns the result already written as JSON.
TASKS: Dict[str, Callable[[str], str]] = {}
SLEEP = "sleep"
_NAMES: Dict[Union[str, int], str] = {}
for _name, _code, _aliases, _func in (
    ("uppercase", 1, ("mayus", "mayusculas", "upper"), _upper),
    ("reverse", 2, ("reversa", "invertir"), _reverse),
    ("word_count", 3, ("contar", "palabras"), _word_count),
    (SLEEP, 4, ("espera", "delay"), None),
):
    for _key in (_name, _code, str(_code), *_aliases):
        _NAMES[_key] = _name
        if _func is not None and type(_key) is str:
            TASKS[_key] = _func

#: A sleep's seconds written as text, as pfo3's C{tasks.plain_decimal}.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)


def _error(mensaje: str, codigo: str, tarea_id: Optional[str]) -> str:
    return _ERROR % (_quote(mensaje), _quote(codigo),
                     "null" if tarea_id is None else _quote(tarea_id))


def _seconds(contenido: Any) -> Optional[float]:
    """
    @return: A sleep's seconds (a JSON number or a text holding a plain
        decimal), or L{None} when C{contenido} is not one, or not finite and
        not negative.
    """
    if type(contenido) is str:
        text = contenido.strip(" \t")
        if not _DECIMAL.fullmatch(text):
            return None
        seconds = float(text)
    elif type(contenido) in (int, float):
        seconds = float(contenido)
    else:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class FloorProtocol(asyncio.Protocol):
    """
    JSON lines in, JSON lines out: a fast path for the expected request and
    a validating slow path for everything else.
    """

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.pending = bytearray()
        self.ids = itertools.count(1)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # asyncio reads up to 256 KiB at a time: a buffer that large is
        # mapped, shrunk and unmapped by the allocator (mmap, mremap, munmap)
        # on every read.  Twisted reads up to 64 KiB, from the heap.
        if hasattr(transport, "max_size"):
            transport.max_size = READ_SIZE

    def data_received(self, data: bytes) -> None:
        end = data.rfind(b"\n")
        if end < 0:
            self.pending += data
            return
        if self.pending:
            self.pending += data[:end]
            head = bytes(self.pending)
            self.pending = bytearray(data[end + 1:])
        else:
            head = data[:end]
            if end + 1 < len(data):
                self.pending += data[end + 1:]
        out: List[str] = []
        try:
            lines = head.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            self._bad_chunk(head, out)
        else:
            scan = _scan
            tasks = TASKS
            for line in lines:
                try:
                    obj, stop = scan(line, 0)
                    tarea_id = obj["tarea_id"]
                    func = tasks[obj["tipo"]]
                    contenido = obj["contenido"]
                    if (
                        stop != len(line) or type(tarea_id) is not str
                        or type(contenido) is not str or "op" in obj or not tarea_id
                        or len(tarea_id) > MAX_TASK_ID
                    ):
                        raise ValueError
                    out.append(_OK % (func(contenido), _quote(tarea_id)))
                except Exception:
                    out.append(self._slow(line))
        if out and self.transport is not None:
            self.transport.write("".join(out).encode("utf-8", "backslashreplace"))

    def _bad_chunk(self, head: bytes, out: List[str]) -> None:
        """
        A chunk that is not all UTF-8: each line decoded by itself.
        """
        for raw in head.split(b"\n"):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                out.append(_error(f"La línea no es UTF-8 válido (byte {e.start}).",
                                  "utf8_invalido", None))
            else:
                out.append(self._slow(line))

    def _slow(self, line: str) -> str:
        """
        Validate one line as pfo3 does.

        @return: Its reply line, or C{""} for a blank line or a sleep (whose
            reply is written when it ends).
        """
        if not line.strip():
            return ""
        try:
            obj = _decode(line)
        except (ValueError, RecursionError):
            return _error("JSON inválido.", "json_invalido", None)
        if type(obj) is not dict:
            return _error("La solicitud debe ser un objeto JSON ({...}).", "no_es_objeto", None)
        tarea_id = obj.get("tarea_id")
        if tarea_id is not None and (
            type(tarea_id) is not str or not tarea_id or len(tarea_id) > MAX_TASK_ID
        ):
            return _error(f"'tarea_id' debe ser un texto de 1 a {MAX_TASK_ID} caracteres.",
                          "tarea_id_invalido", None)
        if "op" in obj:
            if obj["op"] == "ping":
                return _PONG if tarea_id is None else _PONG_ID % _quote(tarea_id)
            return _error("Operación desconocida.", "op_desconocida", tarea_id)
        if tarea_id is None:
            tarea_id = f"floor-{id(self):x}-{next(self.ids)}"
        tipo = obj.get("tipo")
        if tipo is None:
            return _error("Falta el campo 'tipo'.", "tipo_faltante", tarea_id)
        key = tipo.strip().lower() if type(tipo) is str else tipo if type(tipo) is int else None
        name = _NAMES.get(key) if key is not None else None
        if name is None:
            return _error("Tipo de tarea desconocido.", "tipo_desconocido", tarea_id)
        if "contenido" not in obj:
            return _error("Falta el campo 'contenido'.", "contenido_faltante", tarea_id)
        contenido = obj["contenido"]
        if name == SLEEP:
            seconds = _seconds(contenido)
            if seconds is None:
                return _error("'contenido' debe ser un número de segundos.",
                              "contenido_invalido", tarea_id)
            if seconds >= TIMEOUT:
                return _error(f"La espera debe ser menor que {TIMEOUT:g} segundos.",
                              "excede_timeout", tarea_id)
            asyncio.get_running_loop().call_later(seconds, self._slept, seconds, tarea_id)
            return ""
        if type(contenido) is not str:
            return _error("'contenido' debe ser un texto.", "contenido_invalido", tarea_id)
        return _OK % (TASKS[name](contenido), _quote(tarea_id))

    def _slept(self, seconds: float, tarea_id: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            unit = "segundo" if seconds == 1 else "segundos"
            line = _OK % (_quote(f"Esperé {seconds:g} {unit}"), _quote(tarea_id))
            self.transport.write(line.encode("utf-8", "backslashreplace"))


async def serve(host: str, port: int, gc_threshold: int = DEFAULT_GC_THRESHOLD) -> None:
    """
    Serve until cancelled; once listening, tune the collector as pfo3 does.
    """
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FloorProtocol, host, port, backlog=4096)
    if gc_threshold > 0:
        gc.collect()
        gc.freeze()
        gc.set_threshold(gc_threshold, *gc.get_threshold()[1:])
    async with server:
        await server.serve_forever()


def main() -> None:
    """
    Command line: C{--host}, C{--port}, C{--gc-threshold}.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--gc-threshold", type=int, default=DEFAULT_GC_THRESHOLD,
                        help="as twistd pfo3's (0: leave the collector alone)")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port, args.gc_threshold))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
