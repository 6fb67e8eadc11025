"""
The plain asyncio server: what the obvious asyncio server for pfo3's
protocol costs (C{"asyncio, plain"} in the report), kept for context beside
the floor (C{benchmarks/asyncio_floor.py}), which uses every trick pfo3 does.

One L{asyncio.Protocol} per connection splits each chunk into lines (with
pfo3's own L{pfo3.framing.LineSplitter}), decodes each with C{json.loads},
computes the task inline, builds a dict per reply and writes it with
C{json.dumps}, all the replies of the chunk with one C{write}; the garbage
collector runs on Python's defaults.  No validation, no limits, no
backpressure, no bookkeeping.  A sleep is a C{call_later}, so the same task
mixes run against it.

    python benchmarks/asyncio_floor_plain.py --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
from typing import Any, Callable, Dict, List, Optional


def _framing() -> Any:
    """
    Load C{pfo3/framing.py} by itself, without the C{pfo3} package: its
    C{__init__} imports Twisted, and the collector would walk those twenty
    thousand objects in every full collection of this process (measured: a
    tenth more CPU per task).
    """
    package = importlib.util.find_spec("pfo3")
    assert package is not None and package.submodule_search_locations
    path = os.path.join(list(package.submodule_search_locations)[0], "framing.py")
    spec = importlib.util.spec_from_file_location("_pfo3_framing", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LineSplitter = _framing().LineSplitter

_dumps = json.JSONEncoder(ensure_ascii=False).encode
_loads = json.loads


def _count(text: Any) -> int:
    return len(str(text).split())


def _upper(text: Any) -> str:
    return str(text).upper()


def _reverse(text: Any) -> str:
    return str(text)[::-1]


TASKS: Dict[Any, Callable[[Any], Any]] = {}
for _keys, _func in (
    (("uppercase", "1", 1), _upper),
    (("reverse", "2", 2), _reverse),
    (("word_count", "3", 3), _count),
):
    for _key in _keys:
        TASKS[_key] = _func
SLEEPS = ("sleep", "4", 4)


class FloorProtocol(asyncio.Protocol):
    """
    JSON lines in, JSON lines out, nothing else.
    """

    def __init__(self) -> None:
        self.feed = LineSplitter().feed
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        lines = self.feed(data)
        out: List[str] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                req = _loads(line)
                if "op" in req:
                    out.append('{"estado": "ok", "resultado": "pong"}\n')
                    continue
                tipo = req.get("tipo")
                func = TASKS.get(tipo)
                if func is None and tipo in SLEEPS:
                    asyncio.get_running_loop().call_later(
                        float(req.get("contenido", 0)), self._slept, req)
                    continue
                assert func is not None
                reply = {"estado": "ok", "resultado": func(req.get("contenido")),
                         "tarea_id": req.get("tarea_id"), "worker": 0}
            except Exception as e:
                reply = {"estado": "error", "mensaje": str(e), "codigo": "error",
                         "tarea_id": None}
            out.append(_dumps(reply) + "\n")
        if out and self.transport is not None:
            self.transport.write("".join(out).encode())

    def _slept(self, req: Dict[str, Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            reply = {"estado": "ok", "resultado": f"Esperé {req.get('contenido')} segundos",
                     "tarea_id": req.get("tarea_id"), "worker": 0}
            self.transport.write((_dumps(reply) + "\n").encode())


async def serve(host: str, port: int) -> None:
    """
    Serve until cancelled.
    """
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FloorProtocol, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    """
    Command line: C{--host}, C{--port}.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
