"""
What splitting lines costs: one long line in small pieces, and the common case.

Part 1 runs the server's own C{TaskProtocol.dataReceived} (over a
C{StringTransport}, no sockets) on a request line of about 1 MB, delivered in
one chunk and in 200-byte chunks, and prints the CPU time of each and their
ratio.  It only uses pfo3's public testing helpers, so the same script measures
any commit:

    python benchmarks/framing_cost.py            # this checkout
    PYTHONPATH=/tmp/old python benchmarks/framing_cost.py   # another one

Part 2 (when C{pfo3.framing} exists) times L{pfo3.framing.LineSplitter}
against the loop it replaced (kept below in C{OldProtocol}, the reference) on the
cases the load engine and the asyncio baseline see: one short line per read,
64 lines per read, 64 KiB reads of pipelined lines, and the 1 MB line in
200-byte pieces.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable, List, Optional

from twisted.internet.testing import StringTransport

from pfo3.testing import make_server

try:
    from pfo3.framing import LineSplitter
except ImportError:  # an older pfo3: part 2 is skipped
    LineSplitter = None  # type: ignore[assignment,misc]


def cpu(run: Callable[[], None], repeat: int) -> float:
    """
    The least CPU time (seconds) of C{repeat} calls of C{run}.
    """
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        run()
        best = min(best, time.process_time() - t0)
    return best


def big_request(size: int) -> bytes:
    body = b"a" * (size - 60)
    return b'{"tarea_id": "big", "tipo": "reverse", "contenido": "' + body + b'"}\n'


def server_run(line: bytes, chunk: int) -> Callable[[], None]:
    """
    One connection to a fresh server that receives C{line} in pieces of
    C{chunk} bytes (all of it at once if C{chunk} is 0).
    """
    pieces = [line] if not chunk else [line[i:i + chunk] for i in range(0, len(line), chunk)]

    def run() -> None:
        factory = make_server()
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        for piece in pieces:
            proto.dataReceived(piece)
        reply = json.loads(transport.value())
        assert reply["estado"] == "ok", reply
        proto.connectionLost()

    return run


class OldProtocol:
    """
    How the load engine and the asyncio baseline split lines before
    L{LineSplitter}, inline in their C{data_received}: re-join the
    unfinished line to each chunk and split it all.
    """

    def __init__(self) -> None:
        self.buffer = b""

    def data_received(self, data: bytes) -> int:
        if self.buffer:
            data = self.buffer + data
        lines = data.split(b"\n")
        self.buffer = lines.pop()
        return len(lines)


class NewProtocol:
    """
    How they split lines now: a L{LineSplitter}'s bound C{feed}.
    """

    def __init__(self, max_line: Optional[int] = None) -> None:
        self.feed = LineSplitter(max_line).feed

    def data_received(self, data: bytes) -> int:
        lines = self.feed(data)
        return len(lines)


def splitter_run(make: Callable[[], object], chunks: List[bytes], loops: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(loops):
            received = make().data_received  # type: ignore[attr-defined]
            for c in chunks:
                received(c)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="bytes of the long line")
    parser.add_argument("--chunk", type=int, default=200, help="bytes per piece")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import pfo3
    import pfo3.protocol
    print(f"pfo3 from {pfo3.__file__}, TaskProtocol from {pfo3.protocol.__file__}")
    line = big_request(args.size)
    one = cpu(server_run(line, 0), args.repeat)
    many = cpu(server_run(line, args.chunk), args.repeat)
    print(f"server, a {len(line):,}-byte request line: one chunk {one * 1e3:.2f} ms CPU, "
          f"{args.chunk}-byte chunks {many * 1e3:.2f} ms CPU, ratio {many / one:.1f}x")

    if LineSplitter is None:
        print("pfo3.framing not found: splitter comparison skipped")
        return
    short = b'{"tarea_id": "t12", "estado": "ok", "resultado": "HOLA MUNDO", "worker": 0}\n'
    stream = short * 20_000
    cases = [
        ("1 short line per read", [short] * 1000, 300),
        ("64 short lines per read", [short * 64] * 100, 300),
        ("64 KiB reads, lines cut at read ends",
         [stream[i:i + 65536] for i in range(0, len(stream), 65536)], 20),
        (f"a {args.size:,}-byte line in {args.chunk}-byte reads",
         [line[i:i + args.chunk] for i in range(0, len(line), args.chunk)], 1),
    ]
    makers: List[tuple[str, Callable[[], object]]] = [
        ("old inline loop", OldProtocol),
        ("LineSplitter()", NewProtocol),
        ("LineSplitter(1 MiB)", lambda: NewProtocol(1 << 20)),
    ]
    for name, chunks, loops in cases:
        feeds = len(chunks) * loops
        # Interleaved rounds, least time of each: the fairest under noise.
        best = [float("inf")] * len(makers)
        for _ in range(args.repeat):
            for k, (_label, make) in enumerate(makers):
                best[k] = min(best[k], cpu(splitter_run(make, chunks, loops), 1))
        print(f"{name}, per read: " + "; ".join(
            f"{label} {t / feeds * 1e9:,.0f} ns ({t / best[0]:.2f}x)"
            for (label, _make), t in zip(makers, best)
        ))

if __name__ == "__main__":
    main()
