"""
Slow senders of long lines against everyone else, on a real server.

Starts C{twistd -n --pidfile= pfo3} on a free loopback port, then:

  1. measures ping latency from a separate, well-behaved client process
     (C{{"op": "ping"}} back to back, 20 ms apart) with no load;
  2. opens C{--conns} connections, each sending the start of a request line of
     C{--size} bytes and never its end;
  3. for C{--duration} seconds, sends one more byte on each of them every
     C{--interval} seconds, while the ping client measures again and the
     server's RSS and CPU are sampled;
  4. counts the error lines the slow senders got, closes everything, stops
     the server, and prints the figures.

Everything is bounded: connections (C{--conns}, at most 2000), bytes, and
time (the whole run stops by itself in about C{--duration} + 25 seconds).
Loopback only.  To measure another checkout's server (say an export of an
older commit), pass its directory: the server then runs with C{PYTHONPATH}
set to it.

    python benchmarks/slow_senders.py                       # this checkout
    python benchmarks/slow_senders.py --root /tmp/old       # another one
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PING = b'{"op": "ping"}\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server did not start listening")


def pinger(port: int, seconds: float) -> None:
    """
    (Child process.) Ping for C{seconds}; print the round trips as JSON.
    """
    rtts: List[float] = []
    starts: List[float] = []
    timeouts = 0
    begin = time.monotonic()
    end = begin + seconds
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(5.0)
        f = s.makefile("rb")
        while time.monotonic() < end:
            t0 = time.perf_counter()
            s.sendall(PING)
            try:
                reply = f.readline()
            except socket.timeout:
                timeouts += 1
                break
            if b"pong" not in reply:
                raise SystemExit(f"unexpected reply {reply!r}")
            rtts.append(time.perf_counter() - t0)
            starts.append(time.monotonic() - begin)
            time.sleep(0.02)
    print(json.dumps({"rtts": rtts, "starts": starts, "timeouts": timeouts}))


def start_pinger(port: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--ping", str(port), "--duration", str(seconds)],
        stdout=subprocess.PIPE,
    )


def ping_figures(out: bytes, skip: float = 0.0) -> Dict[str, Any]:
    """
    Percentiles of the round trips that the pinger printed, leaving out
    those started in its first C{skip} seconds.
    """
    got = json.loads(out)
    rtts = sorted(r for r, t in zip(got["rtts"], got["starts"]) if t >= skip)
    if not rtts:
        return {"n": 0, "timeouts": got["timeouts"]}

    def pct(p: float) -> float:
        return rtts[min(len(rtts) - 1, int(p * len(rtts)))] * 1e3

    return {"n": len(rtts), "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": rtts[-1] * 1e3,
            "timeouts": got["timeouts"]}


def run(args: argparse.Namespace) -> None:
    root = Path(args.root).resolve()
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)
    twistd = Path(sys.executable).parent / "twistd"
    extra = ["--max-buffered", str(args.max_buffered)] if args.max_buffered else []
    logdir = tempfile.mkdtemp(prefix="pfo3-slow-")
    log = open(os.path.join(logdir, "server.log"), "wb")
    server = subprocess.Popen(
        [str(twistd), "-n", "--pidfile=", "pfo3", "--port", f"tcp:{port}:interface=127.0.0.1",
         "--no-plugins", *extra],
        cwd=logdir, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    senders: List[socket.socket] = []
    try:
        wait_for_port(port, server)
        proc = psutil.Process(server.pid)
        print(f"server: pfo3 from {root}, pid {server.pid}, port {port}, "
              f"options {' '.join(extra) or '(defaults)'}")

        quiet = ping_figures(start_pinger(port, args.quiet).communicate(timeout=60)[0])
        rss_quiet = proc.memory_info().rss

        head = b'{"tarea_id": "lento", "tipo": "uppercase", "contenido": "'
        body = head + b"a" * (args.size - len(head))
        t0 = time.monotonic()
        setup_deadline = t0 + args.setup_limit
        for _ in range(args.conns):
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(max(0.1, setup_deadline - time.monotonic()))
            senders.append(s)
        sent_whole = 0
        for s in senders:
            try:
                s.sendall(body)
                sent_whole += 1
            except OSError:  # a timeout: the server is not keeping up
                break
            if time.monotonic() > setup_deadline:
                break
        setup = time.monotonic() - t0
        for s in senders:
            s.setblocking(False)
        print(f"slow senders: {len(senders)} connections, {sent_whole} sent their "
              f"{args.size:,}-byte unfinished line in {setup:.1f} s")

        cpu0 = proc.cpu_times()
        w0 = time.monotonic()
        ping = start_pinger(port, args.duration)
        rss_max = 0
        trickled = 0
        end = w0 + args.duration
        next_tick = w0
        next_sample = w0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                rss_max = max(rss_max, proc.memory_info().rss)
                next_sample += 1.0
            if now >= next_tick:
                for s in senders:
                    try:
                        trickled += s.send(b"a")
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        pass
                next_tick += args.interval
            time.sleep(max(0.0, min(next_tick, next_sample, end) - time.monotonic()))
        cpu1 = proc.cpu_times()
        wall = time.monotonic() - w0
        out, _ = ping.communicate(timeout=60)
        loaded = ping_figures(out)
        steady = ping_figures(out, args.settle)
        rss_max = max(rss_max, proc.memory_info().rss)
        cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall * 100

        codes: Dict[str, int] = {}
        for s in senders:
            try:
                data = s.recv(1 << 16)
            except (BlockingIOError, InterruptedError, OSError):
                continue
            for line in data.splitlines():
                try:
                    code = json.loads(line).get("codigo", "?")
                except ValueError:
                    code = "?"
                codes[code] = codes.get(code, 0) + 1

        def fmt(p: Dict[str, Any]) -> str:
            if not p["n"]:
                return f"no replies ({p['timeouts']} timeouts)"
            return (f"p50 {p['p50_ms']:.2f} ms, p99 {p['p99_ms']:.2f} ms, "
                    f"max {p['max_ms']:.1f} ms over {p['n']} pings"
                    + (f", {p['timeouts']} timed out" if p["timeouts"] else ""))

        print(f"ping, no load:      {fmt(quiet)}; server RSS {rss_quiet / 2**20:.0f} MiB")
        print(f"ping, slow senders: {fmt(loaded)}")
        print(f"  the same after the first {args.settle:.0f} s: {fmt(steady)}")
        print(f"server while trickling ({wall:.0f} s, {trickled:,} bytes trickled): "
              f"CPU {cpu:.0f}% of a core, RSS max {rss_max / 2**20:.0f} MiB")
        print(f"error lines to slow senders: {codes or 'none'}")
    finally:
        for s in senders:
            s.close()
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(ROOT),
                        help="checkout whose pfo3 the server runs (default: this one)")
    parser.add_argument("--conns", type=int, default=1000, help="slow senders (max 2000)")
    parser.add_argument("--size", type=int, default=1_000_000,
                        help="bytes of each unfinished line (max 1 MiB)")
    parser.add_argument("--interval", type=float, default=0.1,
                        help="seconds between two bytes of a slow sender")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds of trickling (max 30)")
    parser.add_argument("--quiet", type=float, default=3.0,
                        help="seconds of pings before the slow senders")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="also report the pings after this many seconds of trickling")
    parser.add_argument("--setup-limit", type=float, default=20.0,
                        help="seconds allowed to send the unfinished lines")
    parser.add_argument("--max-buffered", type=int, default=0,
                        help="pass --max-buffered to the server (0: its default)")
    parser.add_argument("--ping", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ping:
        pinger(args.ping, args.duration)
        return
    if not (1 <= args.conns <= 2000 and 1 <= args.size <= 1 << 20
            and 0 < args.duration <= 30 and args.interval >= 0.01):
        parser.error("out of bounds: --conns 1..2000, --size ..1 MiB, --duration ..30 s")
    run(args)


if __name__ == "__main__":
    main()
