"""
What the web gateway costs per task against the TCP protocol: one
C{twistd pfo3 --port ... --web ...}, the same inline task (C{uppercase})
over TCP, WebSocket (C{/ws}) and HTTP (C{POST /tareas}), in interleaved
rounds of one run, with the ratios to TCP paired within a round (see
C{paired.py}: on a noisy machine a ratio of two runs taken side by side
means more than either figure).

The loads have the same shapes over every protocol:

  - C{8x1}: 8 connections, one task in flight on each (a request, its
    reply, the next request), for all three;
  - C{1x50}: one connection with 50 tasks in flight (pipelined), for TCP
    and WebSocket only: pfo3's HTTP API answers one request per connection
    at a time, so HTTP has no pipelined shape.

Every run prints tasks/s, p50 and p99 latency (ms, from sending a request
to reading its reply) and the server's CPU per task (µs, user + system of
its process); then, per shape, the median over rounds of each figure and
of each protocol's ratio to TCP in the same round.  The client is one
Python process (asyncio; C{websockets} for WebSocket, a minimal HTTP/1.1
client for HTTP) on the same machine, so the figures are lower bounds, and
the CPU per task, measured on the server alone, is the steadier figure.

    python benchmarks/web_cost.py --rounds 5 --duration 3 --json web.json --doc docs/web.md

C{--doc} rewrites the part of that file between
C{<!-- web_cost:begin -->} and C{<!-- web_cost:end -->} with the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

from websockets.asyncio.client import connect as ws_connect

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from paired import pfo3_system  # noqa: E402
from run_suite import Running, free_port, machine  # noqa: E402

PROTOCOLS = ("tcp", "ws", "http")
#: (connections, tasks in flight on each), and the protocols that run it.
SHAPES: List[Tuple[Tuple[int, int], Tuple[str, ...]]] = [
    ((8, 1), ("tcp", "ws", "http")),
    ((1, 50), ("tcp", "ws")),
]
BEGIN = "<!-- web_cost:begin -->"
END = "<!-- web_cost:end -->"

Send = Callable[[bytes], Awaitable[None]]
Receive = Callable[[], Awaitable[Dict[str, Any]]]


@dataclass
class Ports:
    """
    Where one server listens: its TCP protocol and its web site.
    """

    tcp: int
    web: int


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """
    @return: The nearest-rank percentile C{q} (0 < q <= 1) of a non-empty
        ascending sequence.
    """
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


# -- clients --------------------------------------------------------------------------------


async def tcp_connection(ports: Ports) -> Tuple[Send, Receive, Callable[[], Awaitable[None]]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.tcp)

    async def send(body: bytes) -> None:
        writer.write(body + b"\n")

    async def receive() -> Dict[str, Any]:
        reply: Dict[str, Any] = json.loads(await reader.readline())
        return reply

    async def close() -> None:
        writer.close()
        await writer.wait_closed()

    return send, receive, close


async def ws_connection(ports: Ports) -> Tuple[Send, Receive, Callable[[], Awaitable[None]]]:
    ws = await ws_connect(f"ws://127.0.0.1:{ports.web}/ws", compression=None, max_size=None)

    async def send(body: bytes) -> None:
        await ws.send(body.decode("utf-8"))

    async def receive() -> Dict[str, Any]:
        reply: Dict[str, Any] = json.loads(await ws.recv())
        return reply

    return send, receive, ws.close


async def http_connection(ports: Ports) -> Tuple[Send, Receive, Callable[[], Awaitable[None]]]:
    """
    A keep-alive HTTP/1.1 connection: C{send} posts a body to C{/tareas},
    C{receive} reads one response and returns its JSON (an error status
    comes back as the protocol's error object it carries).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.web)
    head = (f"POST /tareas HTTP/1.1\r\nHost: 127.0.0.1:{ports.web}\r\n"
            "Content-Type: application/json\r\nContent-Length: ").encode("ascii")

    async def send(body: bytes) -> None:
        writer.write(head + str(len(body)).encode("ascii") + b"\r\n\r\n" + body)

    async def receive() -> Dict[str, Any]:
        headers = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        if "transfer-encoding: chunked" in headers:
            body = b""
            while True:
                size = int((await reader.readline()).strip(), 16)
                if not size:
                    await reader.readline()
                    break
                body += await reader.readexactly(size)
                await reader.readline()
        else:
            length = int(headers.split("content-length:", 1)[1].split("\r\n", 1)[0])
            body = await reader.readexactly(length)
        reply: Dict[str, Any] = json.loads(body)
        return reply

    async def close() -> None:
        writer.close()
        await writer.wait_closed()

    return send, receive, close


CONNECT = {"tcp": tcp_connection, "ws": ws_connection, "http": http_connection}


async def drive(protocol: str, ports: Ports, window: int, until: float, tag: str,
                latencies: List[float], errors: List[Dict[str, Any]]) -> None:
    """
    One connection: keep C{window} tasks in flight until C{until}
    (C{time.perf_counter}), then wait for the last replies.
    """
    send, receive, close = await CONNECT[protocol](ports)
    started: Dict[str, float] = {}
    sent = 0
    try:
        while True:
            while len(started) < window and time.perf_counter() < until:
                tid = f"{tag}-{sent}"
                sent += 1
                started[tid] = time.perf_counter()
                await send(json.dumps({"tarea_id": tid, "tipo": "uppercase",
                                       "contenido": "hola"}).encode("utf-8"))
            if not started:
                return
            reply = await receive()
            begun = started.pop(str(reply.get("tarea_id")), None)
            if begun is None or reply.get("estado") != "ok":
                errors.append(reply)
                if begun is None:
                    return  # a reply that matches nothing: stop this connection
            else:
                latencies.append(time.perf_counter() - begun)
    finally:
        await close()


async def load(protocol: str, ports: Ports, shape: Tuple[int, int],
               duration: float) -> Dict[str, Any]:
    """
    Run C{shape} (connections, tasks in flight on each) over C{protocol}
    for C{duration} seconds.

    @return: Replies that were ok, errors, elapsed seconds, latencies.
    """
    connections, window = shape
    if protocol == "http" and window != 1:
        raise ValueError("HTTP carries one task per connection at a time")
    latencies: List[float] = []
    errors: List[Dict[str, Any]] = []
    begun = time.perf_counter()
    until = begun + duration
    await asyncio.gather(*(drive(protocol, ports, window, until, f"{protocol}{i}",
                                 latencies, errors) for i in range(connections)))
    return {"ok": len(latencies), "errors": errors,
            "elapsed": time.perf_counter() - begun, "latencies": latencies}


def measure(protocol: str, ports: Ports, shape: Tuple[int, int], duration: float,
            cpu: Optional[Callable[[], float]] = None) -> Dict[str, Any]:
    """
    One run: C{load} and its figures.

    @param cpu: The server's CPU seconds so far, read before and after.
    @return: tasks (ok), errors (count), throughput (tasks/s), p50_ms,
        p99_ms and cpu_us (server CPU per task, µs; L{None} without
        C{cpu}).
    """
    before = cpu() if cpu is not None else 0.0
    result = asyncio.run(load(protocol, ports, shape, duration))
    spent = cpu() - before if cpu is not None else None
    latencies = sorted(result["latencies"])
    ok = result["ok"]
    return {
        "protocol": protocol, "shape": f"{shape[0]}x{shape[1]}", "tasks": ok,
        "errors": len(result["errors"]), "first_error": (result["errors"] or [None])[0],
        "throughput": ok / result["elapsed"] if result["elapsed"] else 0.0,
        "p50_ms": nearest_rank(latencies, 0.5) * 1000 if latencies else None,
        "p99_ms": nearest_rank(latencies, 0.99) * 1000 if latencies else None,
        "cpu_us": spent * 1e6 / ok if spent is not None and ok else None,
    }


# -- rounds and figures ----------------------------------------------------------------------


def run_rounds(ports: Ports, rounds: int, duration: float,
               cpu: Optional[Callable[[], float]] = None,
               shapes: Sequence[Tuple[Tuple[int, int], Tuple[str, ...]]] = tuple(SHAPES),
               ) -> List[Dict[str, Any]]:
    """
    Every shape, every protocol that runs it, the order of the protocols
    rotated each round.

    @return: One dict per run (L{measure}'s, with its round).
    """
    runs: List[Dict[str, Any]] = []
    for shape, protocols in shapes:  # warm-up, not recorded
        for protocol in protocols:
            measure(protocol, ports, shape, min(duration, 0.5))
    for r in range(rounds):
        for shape, protocols in shapes:
            k = r % len(protocols)
            for protocol in protocols[k:] + protocols[:k]:
                run = measure(protocol, ports, shape, duration, cpu)
                run["round"] = r
                runs.append(run)
                print(f"  round {r + 1} {run['shape']:>5} {protocol:<5} "
                      f"{run['throughput']:9.0f}/s  p50 {run['p50_ms'] or 0:7.2f} ms  "
                      f"p99 {run['p99_ms'] or 0:7.2f} ms  {run['cpu_us'] or 0:6.1f} us/task  "
                      f"errors {run['errors']}", flush=True)
    return runs


def _median(values: List[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """
    @return: Per shape and protocol: the medians over rounds of tasks/s,
        p50, p99 and CPU per task, and of the ratios of tasks/s, p99 and
        CPU per task to TCP's in the same round and shape.
    """
    out = []
    shapes = list(dict.fromkeys(r["shape"] for r in runs))
    for shape in shapes:
        mine = [r for r in runs if r["shape"] == shape]
        tcp = {r["round"]: r for r in mine if r["protocol"] == "tcp"}
        for protocol in PROTOCOLS:
            these = [r for r in mine if r["protocol"] == protocol]
            if not these:
                continue
            row: Dict[str, Any] = {"shape": shape, "protocol": protocol, "rounds": len(these)}
            for key in ("throughput", "p50_ms", "p99_ms", "cpu_us"):
                row[key] = _median([r[key] for r in these])
            for key in ("throughput", "p99_ms", "cpu_us"):
                ratios: List[Optional[float]] = []
                for r in these:
                    base = tcp.get(r["round"])
                    if base and base[key] and r[key] is not None:
                        ratios.append(r[key] / base[key])
                row[f"{key}_vs_tcp"] = _median(ratios)
            out.append(row)
    return out


NAMES = {"tcp": "TCP", "ws": "WebSocket", "http": "HTTP"}


def markdown(summary: List[Dict[str, Any]], about: Dict[str, Any]) -> str:
    """
    @return: The figures as the Markdown of C{docs/web.md}'s section.
    """
    def num(value: Optional[float], fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = [
        f"`python benchmarks/web_cost.py --rounds {about['rounds']} "
        f"--duration {about['duration']:g}` at {about['commit']}, {about['date']}, "
        f"{about['cpus']} CPUs (load average {about['load']:.1f} at the start), Python "
        f"{about['python']}, Twisted {about['twisted']}. Medians over the rounds; "
        "ratios are to TCP in the same round and shape.",
        "",
        "| shape | protocol | tasks/s | p50 ms | p99 ms | server CPU µs/task "
        "| tasks/s ÷ TCP | p99 ÷ TCP | CPU ÷ TCP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['shape']} | {NAMES[row['protocol']]} | {num(row['throughput'], ',.0f')} "
            f"| {num(row['p50_ms'], '.2f')} | {num(row['p99_ms'], '.2f')} "
            f"| {num(row['cpu_us'], '.1f')} | {num(row['throughput_vs_tcp'], '.2f')} "
            f"| {num(row['p99_ms_vs_tcp'], '.2f')} | {num(row['cpu_us_vs_tcp'], '.2f')} |")
    return "\n".join(lines) + "\n"


def rewrite_doc(path: str, text: str) -> None:
    """
    Replace what lies between L{BEGIN} and L{END} in the file at C{path}
    with C{text}.

    @raise ValueError: if the file lacks the markers.
    """
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    start, end = doc.find(BEGIN), doc.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {BEGIN} ... {END} section")
    doc = doc[:start + len(BEGIN)] + "\n" + text + doc[end:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)


def wait_for(port: int, timeout: float = 30.0) -> None:
    """
    Wait until something listens on C{port} of 127.0.0.1.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0,
                        help="Seconds of each run.")
    parser.add_argument("--json", help="Write every run and the summary here.")
    parser.add_argument("--doc", help="Rewrite the figures between the markers of this file.")
    args = parser.parse_args(argv)
    web = free_port()
    system = pfo3_system("pfo3-web", ["--web", f"tcp:{web}:interface=127.0.0.1"])
    about = dict(machine(), rounds=args.rounds, duration=args.duration,
                 load=os.getloadavg()[0])
    with tempfile.TemporaryDirectory() as logdir:
        running = Running(system, logdir)
        try:
            wait_for(web)
            runs = run_rounds(Ports(running.port, web), args.rounds, args.duration,
                              running.cpu)
        finally:
            running.stop()
    summary = summarize(runs)
    text = markdown(summary, about)
    print()
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"about": about, "runs": runs, "summary": summary}, f, indent=1)
    if args.doc:
        rewrite_doc(args.doc, text)
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
