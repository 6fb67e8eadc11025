"""
The CPU of one task on the server's own path, in process: bytes in, bytes out.

A real L{pfo3.protocol.TaskProtocol} from L{pfo3.testing.make_server} gets
pipelined chunks of 8 request lines (as a client with 8 tasks in flight
sends them) through C{dataReceived}, over a transport that only counts what is
written.  No sockets, no reactor: what is measured is framing, decoding,
orchestration, recording in the store and encoding, per task.

Workloads (C{--mix}):

  - C{seed}: C{{"tarea_id": "t1", "tipo": "1", "contenido": "hola"}}, every
    id unique;
  - C{mixed}: the inline types by code, name and alias, and a C{ping};
  - C{sleep}: C{sleep} of 0 s, answered when the fake clock advances after
    each chunk (the Deferred path: deadlines, pending tasks, two record
    updates per task).

Stores (C{--store}): C{memory} (the server's default C{memory:}, filled to its
bound first, as in a server that has been up a while, so that the tasks
measured also pay for forgetting old records) or C{none}.  The collector is
tuned as the server tunes it (C{--gc-threshold}, default as C{twistd pfo3}).

Time, on a quiet machine:

    python benchmarks/hotpath.py --store memory --mix seed

Instructions per task, repeatable on a busy one (runs itself twice under
valgrind's callgrind, with two numbers of chunks, and divides the difference,
so that start-up and imports cancel out):

    python benchmarks/hotpath.py --instructions --store none --chunks 1000

(16,000 tasks told apart, about a minute.)  The fake clock's C{seconds} is a
Python method, where a real reactor's is C's C{time.time}: with a store, which
reads the clock once per task, that adds a few hundred instructions a task.

Another checkout (an older commit) is measured with C{--tree PATH}: its
C{pfo3} is imported instead of the installed one.  Commits before the store
existed (before C{10974f6}) only run C{--store none}.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, List

LINES_PER_CHUNK = 8


def use_tree(path: str) -> None:
    """
    Import C{pfo3} from C{path} rather than from the editable install (whose
    import hook would otherwise win over C{sys.path}).
    """
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
    sys.path.insert(0, os.path.abspath(path))


class CountingTransport:
    """
    Just enough of a TCP transport for L{TaskProtocol}: the lines written
    are counted, and only the last write is kept.
    """

    disconnecting = False

    def __init__(self) -> None:
        self.lines = 0
        self.last = b""
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        self.lines += data.count(b"\n")
        self.last = data

    def writeSequence(self, seq: List[bytes]) -> None:
        self.write(b"".join(seq))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def loseConnection(self) -> None:
        self.disconnecting = True

    def getPeer(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 9000)


_MIXED = [
    ('"1"', '"hola"'), ('"mayus"', '"hola mundo"'), ("2", '"abcdef"'),
    ('"reverse"', '"dabale arroz"'), ('"3"', '"uno dos tres"'),
    ('"palabras"', '"a b c d"'), ('"upper"', '"x"'),
]


def chunks(mix: str, count: int, first: int = 0) -> List[bytes]:
    """
    C{count} chunks of L{LINES_PER_CHUNK} request lines, with task ids
    numbered from C{first}.
    """
    out = []
    n = first
    for _ in range(count):
        lines = []
        for j in range(LINES_PER_CHUNK):
            n += 1
            if mix == "seed":
                lines.append(b'{"tarea_id": "t%d", "tipo": "1", "contenido": "hola"}\n' % n)
            elif mix == "sleep":
                lines.append(b'{"tarea_id": "t%d", "tipo": "sleep", "contenido": 0}\n' % n)
            elif j == LINES_PER_CHUNK - 1:
                lines.append(b'{"op": "ping", "tarea_id": "t%d"}\n' % n)
            else:
                tipo, contenido = _MIXED[j % len(_MIXED)]
                lines.append(b'{"tarea_id": "t%d", "tipo": %s, "contenido": %s}\n'
                             % (n, tipo.encode(), contenido.encode()))
        out.append(b"".join(lines))
    return out


class Bench:
    """
    One server, one connection.
    """

    def __init__(self, store: str, mix: str) -> None:
        import inspect

        from pfo3.testing import FakeReactor, make_server

        self.clock = FakeReactor()
        self.mix = mix
        kwargs: dict = {"reactor": self.clock}
        if store == "memory":
            if "store" not in inspect.signature(make_server).parameters:
                raise SystemExit("this pfo3 has no results store: use --store none")
            from pfo3.store import DEFAULT_MAX_RECORDS, MemoryStore, Record

            memory = MemoryStore(self.clock)
            # Full, as in a server up for a while: the tasks measured turn
            # its generations over as they would there.
            for i in range(DEFAULT_MAX_RECORDS):
                memory.record(Record("", f"old{i}", "uppercase", "x", "ok", "-", 0.0))
            kwargs["store"] = memory
        self.factory = make_server(**kwargs)
        self.transport = CountingTransport()
        self.protocol = self.factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.sent = 0

    def run(self, data: List[bytes]) -> None:
        receive = self.protocol.dataReceived
        if self.mix == "sleep":
            advance = self.clock.advance
            for chunk in data:
                receive(chunk)
                advance(0)
        else:
            for chunk in data:
                receive(chunk)
        self.sent += len(data) * LINES_PER_CHUNK

    def check(self) -> None:
        t = self.transport
        if t.lines != self.sent or t.last.count(b'"estado": "ok"') != t.last.count(b"\n"):
            raise SystemExit(f"expected {self.sent} ok replies, got {t.lines} lines "
                             f"ending with {t.last!r}")


def tune_gc(threshold: int) -> None:
    # As pfo3.service does at start.
    if threshold > 0:
        gc.collect()
        gc.freeze()
        gc.set_threshold(threshold, *gc.get_threshold()[1:])


def timed(args: argparse.Namespace) -> None:
    # The collector is tuned before the store fills, as in the server.
    tune_gc(args.gc_threshold)
    bench = Bench(args.store, args.mix)
    n = args.chunks
    bench.run(chunks(args.mix, n, 0))  # warm up
    best = float("inf")
    for r in range(args.repeat):
        data = chunks(args.mix, n, (r + 1) * n * LINES_PER_CHUNK)
        t0 = time.process_time()
        bench.run(data)
        best = min(best, time.process_time() - t0)
    bench.check()
    per_task = best / (n * LINES_PER_CHUNK) * 1e6
    print(f"{args.mix} store={args.store}: {per_task:.2f} us/task "
          f"(best of {args.repeat} x {n * LINES_PER_CHUNK} tasks)")


def once(args: argparse.Namespace) -> None:
    # Every run makes the same chunks, however many it sends, so that making
    # them cancels out of the difference between two runs.
    data = chunks(args.mix, args.make or args.chunks)[:args.chunks]
    tune_gc(args.gc_threshold)
    bench = Bench(args.store, args.mix)
    bench.run(data)
    bench.check()


def instructions(args: argparse.Namespace) -> None:
    """
    Run L{once} under callgrind with C{chunks} and C{3 * chunks} chunks;
    the difference over the extra tasks is the instructions per task.
    """
    totals = []
    sizes = (args.chunks, 3 * args.chunks)
    outdir = args.out or tempfile.mkdtemp(prefix="hotpath-")
    os.makedirs(outdir, exist_ok=True)
    for size in sizes:
        out = os.path.join(outdir, f"callgrind.{args.mix}.{args.store}.{size}")
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
               sys.executable, os.path.abspath(__file__), "--once", "--chunks", str(size),
               "--make", str(sizes[-1]),
               "--store", args.store, "--mix", args.mix,
               "--gc-threshold", str(args.gc_threshold)]
        if args.tree:
            cmd += ["--tree", args.tree]
        # One hash seed: dict layouts, and so the counts, repeat run to run.
        env = dict(os.environ, PYTHONHASHSEED="0")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode or not found:
            raise SystemExit(done.stderr[-2000:])
        totals.append(int(found.group(1)))
    tasks = (sizes[1] - sizes[0]) * LINES_PER_CHUNK
    print(f"{args.mix} store={args.store}: {(totals[1] - totals[0]) / tasks:,.0f} "
          f"instructions/task ({outdir})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--store", choices=("memory", "none"), default="memory")
    parser.add_argument("--mix", choices=("seed", "mixed", "sleep"), default="seed")
    parser.add_argument("--chunks", type=int, default=5000,
                        help="chunks of 8 lines per run (default 5000; with "
                             "--instructions, the smaller of two runs)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--gc-threshold", type=int, default=10_000)
    parser.add_argument("--tree", help="import pfo3 from this checkout")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per task with callgrind")
    parser.add_argument("--out", help="where --instructions leaves callgrind's files")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--make", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tree:
        use_tree(args.tree)
    if args.instructions:
        instructions(args)
    elif args.once:
        once(args)
    else:
        timed(args)


if __name__ == "__main__":
    main()
