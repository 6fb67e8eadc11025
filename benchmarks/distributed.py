"""
pfo3's distributed mode beside Celery, on the same RabbitMQ.

    python benchmarks/distributed.py              # about 8 minutes
    python benchmarks/distributed.py --quick      # about 3 minutes

Four systems run side by side for the whole load phase, on loopback only,
each with its own names on the broker (a fresh prefix per run):

  - C{pfo3-1w}: a C{twistd pfo3 --broker} orchestrator and one
    C{twistd pfo3-worker};
  - C{pfo3-2w}: the same with two workers;
  - C{celery-threads}: a Celery worker with the threads pool;
  - C{celery-prefork}: a Celery worker with the prefork pool, 2 processes
    (one per core).

Celery uses the C{rpc://} result backend and C{task_acks_late}
(C{benchmarks/celery_app.py}).  The task is the same trivial one on both
sides: the uppercase of C{"hola mundo"}.

Two modes: I{one at a time} (pfo3: C{pfo3-bench -c 1 -i 1}; Celery:
C{delay().get()} in a loop) and I{pipelined} (pfo3: C{pfo3-bench -c 16 -i
8}; Celery: several client processes each keeping a window of tasks in
flight).  Before the measured rounds, a tuning phase tries several
configurations of each Celery worker (concurrency, prefetch multiplier)
and several client shapes (processes x window, batch or sliding), and the
rounds then use the best one found for each pool: the comparison is against
Celery at its best on this machine.

The measured runs are interleaved (round 1: A B C D, round 2: B C D A, ...)
and reported as medians over the rounds; each run records throughput,
p50/p99 latency, errors, and the CPU time of the system's own processes
(not the broker's).  A broker floor is measured too: one message through a
classic queue and through a quorum queue, one at a time, with a bare pika
client, which bounds what any client of this broker can reach.

Everything declared on the broker is deleted at the end; every process is
stopped; every run is bounded in time.  Results go to
C{benchmarks/results/distributed.json} and C{docs/distributed-benchmarks.md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from pfo3.load import BUCKET, merge_hist, percentile  # noqa: E402

BROKER = os.environ.get("PFO3_BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672/%2F")
BIN = os.path.dirname(sys.executable)
TEXT = "hola mundo"
#: pfo3's pipelined load: connections x requests in flight on each.
PFO3_PIPELINED = (16, 8)
#: Celery worker configurations tried per pool: (concurrency, prefetch multiplier).
CELERY_WORKERS = {
    "threads": [(8, 4), (8, 64), (32, 16)],
    "prefork": [(2, 4), (2, 64)],
}
#: Celery client shapes tried in pipelined mode: (processes, window, kind).
CELERY_SHAPES: List[Tuple[int, int, str]] = [
    (1, 128, "batch"), (1, 128, "sliding"), (2, 64, "sliding"), (3, 64, "sliding"),
    (4, 32, "sliding"), (2, 256, "batch"),
]


# --- the broker ------------------------------------------------------------------


def blocking_channel() -> Tuple[Any, Any]:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(BROKER))
    return connection, connection.channel()


def delete_names(queues: Sequence[str], exchanges: Sequence[str]) -> List[str]:
    """
    Delete queues and exchanges (missing ones are fine).

    @return: What could not be deleted, with why.
    """
    problems: List[str] = []
    connection, channel = blocking_channel()
    try:
        for kind, names in (("queue", queues), ("exchange", exchanges)):
            for name in names:
                try:
                    if kind == "queue":
                        channel.queue_delete(name)
                    else:
                        channel.exchange_delete(name)
                except Exception as e:  # a closed channel: open another
                    problems.append(f"{kind} {name}: {e}")
                    if not channel.is_open:
                        channel = connection.channel()
    finally:
        connection.close()
    return problems


def broker_floor(prefix: str, n: int = 500) -> Dict[str, Any]:
    """
    One small message at a time through a classic and a quorum queue with a
    bare pika client: publish, wait for its delivery; no confirms.
    """
    import pika

    connection, channel = blocking_channel()
    queues = {"classic": f"{prefix}.floor.classic", "quorum": f"{prefix}.floor.quorum"}
    got: List[int] = []
    out: Dict[str, Any] = {}
    try:
        channel.queue_declare(queues["classic"], durable=True)
        channel.queue_declare(queues["quorum"], durable=True,
                              arguments={"x-queue-type": "quorum"})
        for q in queues.values():
            channel.basic_consume(q, lambda *a: got.append(1), auto_ack=True)
        props = pika.BasicProperties(delivery_mode=2)
        for kind, q in queues.items():
            lat: List[float] = []
            for i in range(n + 50):
                got.clear()
                start = time.perf_counter()
                channel.basic_publish("", q, b'{"v":1}', props)
                while not got:
                    connection.process_data_events(time_limit=None)
                if i >= 50:
                    lat.append(time.perf_counter() - start)
            lat.sort()
            out[kind] = {"p50_ms": round(lat[len(lat) // 2] * 1e3, 3),
                         "p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 3)}
    finally:
        for q in queues.values():
            try:
                channel.queue_delete(q)
            except Exception:
                pass
        connection.close()
    return out


# --- processes -------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_with(repo: str = REPO, **extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, HERE, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Processes:
    """
    The processes of one system, and their CPU time.
    """

    def __init__(self, logdir: str, name: str) -> None:
        self.logdir = logdir
        self.name = name
        self.procs: List[subprocess.Popen[bytes]] = []

    def start(self, argv: List[str], tag: str, env: Dict[str, str]) -> str:
        path = os.path.join(self.logdir, f"{self.name}-{tag}.log")
        with open(path, "wb") as log:
            self.procs.append(subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE,
                start_new_session=True))
        return path

    def wait_log(self, path: str, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(path, encoding="utf-8", errors="replace") as f:
                if text in f.read():
                    return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.05)
        with open(path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"{self.name}: {text!r} not in {path}:\n{tail}")

    def cpu(self) -> float:
        import psutil

        total = 0.0
        for p in self.procs:
            try:
                proc = psutil.Process(p.pid)
                for q in [proc, *proc.children(recursive=True)]:
                    t = q.cpu_times()
                    total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        self.procs = []


def broker_cpu() -> float:
    """
    @return: CPU seconds of the RabbitMQ processes on this machine so far
        (C{beam.smp}; every user of the broker counts, not only this run).
    """
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "beam.smp":
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


def summarise(replies: int, elapsed: float, hist: Dict[int, int], errors: int,
              extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    out = {
        "throughput": round(replies / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile(hist, 0.50) * 1e3, 3),
        "p99_ms": round(percentile(hist, 0.99) * 1e3, 3),
        "replies": replies, "errors": errors, "elapsed_s": round(elapsed, 3),
    }
    out.update(extra or {})
    return out


# --- pfo3 ------------------------------------------------------------------------


class Pfo3:
    """
    An orchestrator and C{workers} worker processes on their own prefix.
    """

    kind = "pfo3"

    def __init__(self, name: str, workers: int, prefix: str, logdir: str,
                 repo: str = REPO) -> None:
        """
        @param repo: The checkout whose pfo3 the orchestrator and workers run
            (the load generator is always this one's).
        """
        self.name = name
        self.workers = workers
        self.repo = repo
        self.prefix = prefix
        self.procs = Processes(logdir, name)
        self.port = 0
        self.config = {"workers": workers, "capacity": 64, "threads": 4,
                       "pipelined": f"{PFO3_PIPELINED[0]}x{PFO3_PIPELINED[1]}"}
        if repo != REPO:
            self.config["checkout"] = repo

    def start(self) -> None:
        twistd = os.path.join(BIN, "twistd")
        env = env_with(self.repo)
        common = ["--broker", BROKER, "--broker-prefix", self.prefix]
        self.port = free_port()
        log = self.procs.start(
            [twistd, "-n", "--pidfile=", "pfo3", "--port",
             f"tcp:{self.port}:interface=127.0.0.1", *common, "--name", "o1"], "o1", env)
        self.procs.wait_log(log, "Connected to the broker")
        for i in range(self.workers):
            log = self.procs.start(
                [twistd, "-n", "--pidfile=", "pfo3-worker", *common, "--name", f"w{i + 1}",
                 "--capacity", "64", "--workers", "4"], f"w{i + 1}", env)
            self.procs.wait_log(log, "Connected to the broker")
        self._bench(["-n", "200", "-c", "4", "-i", "8"])  # warm: the path works

    def _bench(self, args: Sequence[str], timeout: float = 60.0) -> Dict[str, Any]:
        argv = [sys.executable, "-m", "pfo3.bench", "-e", f"tcp:127.0.0.1:{self.port}",
                "--json", "-q", *args]
        done = subprocess.run(argv, capture_output=True, env=env_with(), timeout=timeout)
        lines = done.stdout.decode().strip().splitlines()
        if not lines:
            raise RuntimeError(f"pfo3-bench printed nothing: {done.stderr.decode()[-2000:]}")
        result: Dict[str, Any] = json.loads(lines[-1])
        return result

    def run(self, mode: str, duration: float) -> Dict[str, Any]:
        c, i = (1, 1) if mode == "serial" else PFO3_PIPELINED
        s = self._bench(["-c", str(c), "-i", str(i), "-d", str(duration)],
                        timeout=duration + 60)
        lat = s["latency_ms"]
        return {"throughput": s["throughput"], "p50_ms": lat["p50"], "p99_ms": lat["p99"],
                "replies": s["replies"], "errors": s["error_count"] + s["unanswered"],
                "elapsed_s": s["elapsed_s"], "shape": f"{c}x{i}"}

    def stop(self) -> List[str]:
        self.procs.stop()
        p = self.prefix
        return delete_names([f"{p}.tareas", f"{p}.muertas", f"{p}.respuestas.o1"],
                            [f"{p}.muertas", f"{p}.cancelaciones"])


# --- Celery ----------------------------------------------------------------------


class CeleryWorker:
    """
    A Celery worker of one pool on its own prefix.
    """

    kind = "celery"

    def __init__(self, name: str, pool: str, prefix: str, logdir: str) -> None:
        self.name = name
        self.pool = pool
        self.prefix = prefix
        self.logdir = logdir
        self.procs = Processes(logdir, name)
        self.concurrency, self.prefetch = CELERY_WORKERS[pool][0]
        self.shape: Tuple[int, int, str] = CELERY_SHAPES[0]
        self.config: Dict[str, Any] = {}

    def env(self) -> Dict[str, str]:
        return env_with(PFO3_CELERY_BROKER=BROKER, PFO3_CELERY_PREFIX=self.prefix,
                        PFO3_CELERY_PREFETCH=str(self.prefetch))

    def start(self) -> None:
        celery = os.path.join(BIN, "celery")
        log = self.procs.start(
            [celery, "-A", "celery_app", "worker", "--pool", self.pool,
             "--concurrency", str(self.concurrency), "--without-gossip", "--without-mingle",
             "--without-heartbeat", "--loglevel", "INFO", "-n", f"{self.name}@%h"],
            f"{self.concurrency}-{self.prefetch}", self.env())
        self.procs.wait_log(log, "ready.", timeout=60)
        self._clients(1, "serial", 0, 0.0, count=50)  # warm: the path works
        self.config = {"pool": self.pool, "concurrency": self.concurrency,
                       "prefetch_multiplier": self.prefetch,
                       "pipelined": "{} procs x {} {}".format(*self.shape)}

    def restart(self, concurrency: int, prefetch: int) -> None:
        self.procs.stop()
        self.concurrency, self.prefetch = concurrency, prefetch
        self.start()

    def _clients(self, procs: int, kind: str, window: int, duration: float,
                 count: int = 0) -> Dict[str, Any]:
        start_at = time.time() + 1.5  # after every client has imported Celery
        argv = [sys.executable, os.path.abspath(__file__), "celery-client", "--kind", kind,
                "--window", str(window), "--duration", str(duration), "--count", str(count),
                "--start-at", str(start_at)]
        running = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=self.env(), cwd=HERE) for _ in range(procs)]
        results = []
        for p in running:
            try:
                out, err = p.communicate(timeout=duration + 90)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            lines = out.decode().strip().splitlines()
            if not lines:
                raise RuntimeError(f"Celery client printed nothing: {err.decode()[-2000:]}")
            results.append(json.loads(lines[-1]))
        hist: Dict[int, int] = {}
        for r in results:
            merge_hist(hist, {int(k): v for k, v in r["hist"].items()})
        throughput = sum(r["replies"] / r["elapsed"] for r in results if r["elapsed"])
        out_ = summarise(sum(r["replies"] for r in results), 1.0, hist,
                         sum(r["errors"] for r in results))
        out_["throughput"] = round(throughput, 1)
        out_["elapsed_s"] = round(max(r["elapsed"] for r in results), 3)
        return out_

    def run(self, mode: str, duration: float) -> Dict[str, Any]:
        if mode == "serial":
            r = self._clients(1, "serial", 0, duration)
            r["shape"] = "1 proc, delay().get()"
            return r
        procs, window, kind = self.shape
        r = self._clients(procs, kind, window, duration)
        r["shape"] = f"{procs} procs x {window} {kind}"
        return r

    def stop(self) -> List[str]:
        self.procs.stop()
        p = self.prefix
        return delete_names([f"{p}.celery"], [f"{p}.celery", f"{p}.ev", f"{p}.ctl"])


def celery_client(args: argparse.Namespace) -> int:
    """
    One Celery client process: C{delay().get()} in a loop (serial), or a
    window of tasks in flight (batch: submit C{window}, join them all;
    sliding: submit a new task as each result arrives).  Prints one JSON
    line with its histogram.
    """
    from celery_app import app, upper

    hist: Dict[int, int] = {}
    errors = 0
    replies = 0
    per_second = 1 / BUCKET

    def record(seconds: float) -> None:
        key = int(seconds * per_second)
        hist[key] = hist.get(key, 0) + 1

    upper.delay(TEXT).get(timeout=30)  # connections and reply queue up
    pause = args.start_at - time.time()
    if pause > 0:
        time.sleep(pause)
    started = time.perf_counter()
    deadline = started + args.duration
    limit = args.count or float("inf")

    def going() -> bool:
        return (time.perf_counter() < deadline or args.count) and replies < limit

    if args.kind == "serial":
        while going():
            t = time.perf_counter()
            try:
                upper.delay(TEXT).get(timeout=30)
            except Exception:
                errors += 1
            record(time.perf_counter() - t)
            replies += 1
    elif args.kind == "batch":
        from celery.result import ResultSet

        while going():
            sent: Dict[str, float] = {}
            results = []
            for _ in range(args.window):
                r = upper.delay(TEXT)
                sent[r.id] = time.perf_counter()
                results.append(r)

            def got(task_id: str, value: Any, sent: Dict[str, float] = sent) -> None:
                record(time.perf_counter() - sent[task_id])

            try:
                ResultSet(results).join_native(timeout=30, callback=got)
            except Exception:
                errors += 1
            replies += len(results)
    else:  # sliding
        consumer = app.backend.result_consumer
        done: List[float] = []
        inflight = [0]

        def submit() -> None:
            t = time.perf_counter()
            r = upper.delay(TEXT)

            def finished(_: Any) -> None:
                done.append(time.perf_counter() - t)

            r.then(finished)
            inflight[0] += 1

        for _ in range(args.window):
            submit()
        idle_since = time.perf_counter()
        while inflight[0]:
            try:
                consumer.drain_events(timeout=1)
            except Exception:  # socket.timeout
                if time.perf_counter() - idle_since > 30:
                    errors += inflight[0]
                    break
            if done:
                idle_since = time.perf_counter()
            while done:
                record(done.pop())
                replies += 1
                inflight[0] -= 1
                if going() and replies + inflight[0] < limit:
                    submit()
    elapsed = time.perf_counter() - started
    print(json.dumps({"replies": replies, "errors": errors, "elapsed": elapsed,
                      "hist": hist}))
    return 0


# --- the run ---------------------------------------------------------------------


def tune_celery(system: CeleryWorker, duration: float) -> List[Dict[str, Any]]:
    """
    Try each worker configuration of the pool with each client shape; leave
    the worker running with the best configuration and shape.
    """
    tried: List[Dict[str, Any]] = []
    best: Tuple[float, Tuple[int, int], Tuple[int, int, str]] = (
        -1.0, CELERY_WORKERS[system.pool][0], CELERY_SHAPES[0])
    for i, (concurrency, prefetch) in enumerate(CELERY_WORKERS[system.pool]):
        if i:
            system.restart(concurrency, prefetch)
        for shape in CELERY_SHAPES:
            procs, window, kind = shape
            r = system._clients(procs, kind, window, duration)
            entry = {"system": system.name, "concurrency": concurrency,
                     "prefetch_multiplier": prefetch, "procs": procs, "window": window,
                     "kind": kind, **r}
            tried.append(entry)
            print(f"  tune {system.name:<15} c={concurrency:<3} prefetch x{prefetch:<3} "
                  f"{procs} x {window:<4} {kind:<8} {r['throughput']:8.1f}/s  "
                  f"p50 {r['p50_ms']:7.2f} ms  errors {r['errors']}", flush=True)
            if r["errors"] == 0 and r["throughput"] > best[0]:
                best = (r["throughput"], (concurrency, prefetch), shape)
    if (system.concurrency, system.prefetch) != best[1]:
        system.restart(*best[1])
    system.shape = best[2]
    system.config["pipelined"] = "{} procs x {} {}".format(*best[2])
    return tried


_SOCKET = ("untilConcludes", "Connection.writeSomeData", "Connection.doRead")


def by_package(path: str) -> List[Tuple[str, float]]:
    """
    @return: Percent of the main (reactor) thread's samples in a py-spy raw
        profile by where its innermost frame is: idle (the reactor's epoll
        wait), socket send/recv, pika, twisted, pfo3, json, other.  Idle
        thread-pool threads are left out.
    """
    from collections import Counter

    counts: Counter[str] = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit() or not stack.startswith("<module> (twistd"):
                continue
            leaf = stack.split(";")[-1]
            where = leaf.rpartition(" (")[2]
            if leaf.startswith("EPollReactor.doPoll"):
                name = "idle"
            elif leaf.startswith(_SOCKET):
                name = "socket send/recv"
            else:
                name = next((n for n in ("pika", "twisted", "pfo3", "json")
                             if f"{n}/" in where), "other")
            counts[name] += int(count)
    total = sum(counts.values())
    return [(n, 100.0 * c / total) for n, c in counts.most_common()] if total else []


def profile_pfo3(system: Pfo3, outdir: str, seconds: float) -> List[Dict[str, Any]]:
    """
    py-spy profiles of the orchestrator and the first worker of C{system},
    both under the pipelined load and one at a time.
    """
    import shutil
    import threading

    import profile_summary

    pyspy = shutil.which("py-spy") or os.path.join(BIN, "py-spy")
    if not os.path.exists(pyspy):
        print("  py-spy not found: no profile", flush=True)
        return []
    out: List[Dict[str, Any]] = []
    roles = {"orchestrator": system.procs.pids()[0], "worker": system.procs.pids()[1]}
    for mode in ("pipelined", "serial"):
        load: Dict[str, Any] = {}

        def run_load(mode: str = mode, load: Dict[str, Any] = load) -> None:
            load.update(system.run(mode, seconds + 2.0))

        thread = threading.Thread(target=run_load, daemon=True)
        thread.start()
        time.sleep(1.0)
        spies = {}
        for role, pid in roles.items():
            raw = os.path.join(outdir, f"distributed-{system.name}-{mode}-{role}.raw")
            if os.path.exists(raw):
                os.remove(raw)
            spies[role] = (raw, subprocess.Popen(
                [pyspy, "record", "--pid", str(pid), "-d", str(int(seconds)), "-r", "250",
                 "-f", "raw", "-o", raw], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        for _, spy in spies.values():
            try:
                spy.wait(timeout=seconds + 60)
            except subprocess.TimeoutExpired:
                spy.kill()
        thread.join(timeout=seconds + 90)
        for role, (raw, _) in spies.items():
            if not os.path.exists(raw):
                continue
            out.append({"system": system.name, "mode": mode, "role": role,
                        "raw": os.path.relpath(raw, REPO),
                        "throughput": load.get("throughput"),
                        "packages": by_package(raw),
                        "markdown": profile_summary.as_markdown(raw, 12)})
        print(f"  profiled {system.name} {mode}: {load.get('throughput')}/s", flush=True)
    return out


def median_of(runs: List[Dict[str, Any]], key: str) -> float:
    clean = [r[key] for r in runs if not r["errors"]] or [r[key] for r in runs]
    return round(statistics.median(clean), 3)


def machine() -> Dict[str, Any]:
    import celery

    import twisted

    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "pfo3"],
                           capture_output=True, text=True).stdout.strip()
    try:
        import pika

        pika_version = pika.__version__
    except Exception:  # pragma: no cover
        pika_version = "?"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "twisted": twisted.__version__, "celery": celery.__version__, "pika": pika_version,
        "platform": platform.platform(),
        "commit": commit + (" + uncommitted changes" if dirty else ""),
        "load_average": os.getloadavg(),
    }


def render(results: Dict[str, Any]) -> str:
    """
    The Markdown report of a run.
    """
    s = results["summary"]
    lines = [
        "# pfo3 distributed mode beside Celery",
        "",
        "Generated by `python benchmarks/distributed.py"
        + (" --quick" if results["quick"] else "") + "` on "
        f"{results['meta']['date']} ({results['meta']['cpus']} CPUs, Python "
        f"{results['meta']['python']}, Twisted {results['meta']['twisted']}, pika "
        f"{results['meta']['pika']}, Celery {results['meta']['celery']}, RabbitMQ on "
        f"127.0.0.1; commit {results['meta']['commit']}). Raw figures: "
        "`benchmarks/results/distributed.json`.",
        "",
        f"Medians of {results['rounds']} interleaved rounds of {results['duration_s']:g} s "
        "per system and mode. The task is the uppercase of `\"hola mundo\"` on both sides. "
        "*One at a time*: one request in flight (pfo3: `pfo3-bench -c 1 -i 1`; Celery: "
        "`delay().get()` in a loop). *Pipelined*: pfo3 `pfo3-bench -c 16 -i 8` (128 in "
        "flight); Celery the best client shape and worker configuration of the tuning "
        "phase (below). CPU is that of the system's own processes per task (orchestrator "
        "and workers; Celery worker and its pool processes), not the broker's nor the "
        "load generator's; broker CPU is RabbitMQ's per task over the same run (it "
        "counts every user of the shared broker, so it is an upper bound).",
        "",
        "| system | mode | throughput (/s) | p50 (ms) | p99 (ms) | CPU (us/task) | "
        "broker CPU (us/task) | vs Celery's best |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in results["systems"]:
        for mode in ("serial", "pipelined"):
            m = s[name][mode]
            best = results["celery_best"][mode]
            ratio = m["throughput"] / best["throughput"] if best["throughput"] else 0
            lines.append(
                f"| {name} | {'one at a time' if mode == 'serial' else 'pipelined'} | "
                f"{m['throughput']:,.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                f"{m['cpu_us_per_task']:,.0f} | {m['broker_cpu_us_per_task']:,.0f} | "
                f"{ratio:.2f}x |")
    cb = results["celery_best"]
    lines += [
        "",
        f"Celery's best: one at a time {cb['serial']['system']} "
        f"({cb['serial']['throughput']:,.0f}/s), pipelined {cb['pipelined']['system']} "
        f"({cb['pipelined']['throughput']:,.0f}/s). The ratios are of medians measured in "
        "the same run.",
        "",
        "## Targets",
        "",
    ]
    for t in results["targets"]:
        lines.append(f"- {t['target']}: {'**met**' if t['met'] else '**not met**'} "
                     f"({t['detail']})")
    fl = results.get("broker_floor") or {}
    if fl:
        lines += [
            "",
            "## The broker's floor",
            "",
            "One small persistent message at a time through one queue, bare pika, no "
            "confirms (what a single hop costs any client of this broker):",
            "",
            "| queue | p50 (ms) | p99 (ms) |",
            "|---|---:|---:|",
        ]
        for kind, v in fl.items():
            lines.append(f"| {kind} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} |")
        lines += [
            "",
            "A pfo3 task crosses the broker twice: the task through the quorum queue "
            "`PREFIX.tareas`, the reply through the orchestrator's classic reply queue. "
            "Celery's task crosses a classic queue twice (task queue, rpc reply queue).",
        ]
    lines += [
        "",
        "## Celery configurations tried",
        "",
        "`benchmarks/celery_app.py`: `rpc://` backend, `task_acks_late`, JSON, transient "
        "results, no events, no remote control, no rate limits; the worker runs with "
        "`--without-gossip --without-mingle --without-heartbeat`. Its task queue is "
        "Celery's default (classic, durable, persistent messages) without publisher "
        "confirms: cheaper than pfo3's confirmed quorum queue. Pipelined clients: *batch* "
        "submits a window of `delay()`s and joins them with `ResultSet.join_native`; "
        "*sliding* keeps the window full, submitting a new task as each result arrives "
        "(`AsyncResult.then` while draining the rpc reply queue). One pass each:",
        "",
        "| worker | concurrency | prefetch multiplier | client | throughput (/s) | "
        "p50 (ms) | p99 (ms) | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for t in results["celery_tuning"]:
        lines.append(
            f"| {t['system']} | {t['concurrency']} | {t['prefetch_multiplier']} | "
            f"{t['procs']} procs x {t['window']} {t['kind']} | {t['throughput']:,.0f} | "
            f"{t['p50_ms']:.2f} | {t['p99_ms']:.2f} | {t['errors']} |")
    lines += ["", "Kept for the rounds:", ""]
    for name, conf in results["configs"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in conf.items()))
    lines += ["", "## Every run", "",
              "| round | system | mode | shape | throughput (/s) | p50 (ms) | p99 (ms) | "
              "errors |", "|---:|---|---|---|---:|---:|---:|---:|"]
    for r in results["runs"]:
        lines.append(
            f"| {r['round'] + 1} | {r['system']} | {r['mode']} | {r['shape']} | "
            f"{r['throughput']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['errors']} |")
    profiles = results.get("profiles") or []
    if profiles:
        lines += ["", "## Profiles (py-spy, pfo3-1w)", ""]
        for p in profiles:
            pk = ", ".join(f"{name} {share:.0f}%" for name, share in p["packages"][:6])
            lines += [f"### {p['role']}, {p['mode']} ({p['throughput']}/s)", "",
                      f"Main thread, by where its innermost frame is: {pk}. Raw (all "
                      f"threads, the idle pool threads included; not committed): `{p['raw']}`.", "",
                      p["markdown"].strip(), ""]
    notes = results.get("notes")
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    client = sub.add_parser("celery-client", help="(internal) one Celery load process")
    client.add_argument("--kind", choices=["serial", "batch", "sliding"], required=True)
    client.add_argument("--window", type=int, default=1)
    client.add_argument("--duration", type=float, default=4.0)
    client.add_argument("--count", type=int, default=0)
    client.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 s, short tuning")
    parser.add_argument("--rounds", type=int, help="measured rounds (default 5, quick 3)")
    parser.add_argument("--duration", type=float, help="seconds per run (default 4)")
    parser.add_argument("--results", default=os.path.join(HERE, "results", "distributed.json"))
    parser.add_argument("--markdown",
                        default=os.path.join(REPO, "docs", "distributed-benchmarks.md"))
    parser.add_argument("--notes", help="a Markdown file appended to the report")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="also run an orchestrator + 1 worker from this other checkout "
                             "(e.g. an export of an earlier commit) as 'pfo3-1w-base'")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy phase")
    parser.add_argument("--render-only", action="store_true",
                        help="only re-render the report from --results")
    args = parser.parse_args(argv)
    if args.command == "celery-client":
        return celery_client(args)
    if args.render_only:
        with open(args.results, encoding="utf-8") as f:
            results = json.load(f)
        if args.notes:
            with open(args.notes, encoding="utf-8") as f:
                results["notes"] = f.read()
            with open(args.results, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(render(results))
        return 0

    rounds = args.rounds or (3 if args.quick else 5)
    duration = args.duration or (2.0 if args.quick else 4.0)
    tune_duration = 2.0 if args.quick else 3.0
    run_id = f"pfo3bench{uuid.uuid4().hex[:8]}"
    print(f"broker prefix {run_id}", flush=True)
    started = time.monotonic()
    results: Dict[str, Any] = {"meta": machine(), "quick": args.quick, "rounds": rounds,
                               "duration_s": duration, "prefix": run_id}
    print("broker floor", flush=True)
    results["broker_floor"] = broker_floor(run_id)
    print(f"  {results['broker_floor']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pfo3-dist-") as logdir:
        systems: List[Any] = [
            Pfo3("pfo3-1w", 1, f"{run_id}a", logdir),
            Pfo3("pfo3-2w", 2, f"{run_id}b", logdir),
            CeleryWorker("celery-threads", "threads", f"{run_id}t", logdir),
            CeleryWorker("celery-prefork", "prefork", f"{run_id}p", logdir),
        ]
        if args.baseline:
            systems.insert(1, Pfo3("pfo3-1w-base", 1, f"{run_id}z", logdir,
                                   repo=os.path.abspath(args.baseline)))
        started_systems: List[Any] = []
        leftovers: List[str] = []
        runs: List[Dict[str, Any]] = []
        try:
            for s in systems:
                print(f"starting {s.name}", flush=True)
                started_systems.append(s)
                s.start()
            print("tuning Celery (pipelined)", flush=True)
            results["celery_tuning"] = []
            for s in systems:
                if s.kind == "celery":
                    results["celery_tuning"] += tune_celery(s, tune_duration)
            results["configs"] = {s.name: s.config for s in systems}
            print(f"load: {rounds} rounds x 2 modes x {len(systems)} systems, "
                  f"{duration:g} s each", flush=True)
            for r in range(rounds):
                order = systems[r % len(systems):] + systems[:r % len(systems)]
                for mode in ("serial", "pipelined"):
                    for s in order:
                        before, broker_before = s.procs.cpu(), broker_cpu()
                        run = s.run(mode, duration)
                        cpu = s.procs.cpu() - before
                        broker = broker_cpu() - broker_before
                        n = run["replies"]
                        run.update({"round": r, "system": s.name, "mode": mode,
                                    "cpu_us_per_task": round(cpu / n * 1e6, 1) if n else None,
                                    "broker_cpu_us_per_task":
                                        round(broker / n * 1e6, 1) if n else None})
                        runs.append(run)
                        print(f"  round {r + 1}/{rounds} {mode:<9} {s.name:<15} "
                              f"{run['throughput']:8.1f}/s  p50 {run['p50_ms']:7.2f} ms  "
                              f"p99 {run['p99_ms']:7.2f} ms  errors {run['errors']}",
                              flush=True)
            if not args.no_profile:
                print("profile: pfo3-1w", flush=True)
                results["profiles"] = profile_pfo3(
                    systems[0], os.path.dirname(os.path.abspath(args.results)), 4.0)
        finally:
            for s in started_systems:
                try:
                    leftovers += s.stop()
                except Exception as e:
                    leftovers.append(f"{s.name}: {e}")
    results["runs"] = runs
    results["cleanup_problems"] = leftovers
    results["systems"] = [s.name for s in systems]
    summary: Dict[str, Dict[str, Any]] = {}
    for s in systems:
        summary[s.name] = {}
        for mode in ("serial", "pipelined"):
            mine = [r for r in runs if r["system"] == s.name and r["mode"] == mode]
            summary[s.name][mode] = {
                k: median_of(mine, k) for k in ("throughput", "p50_ms", "p99_ms")}
            for key in ("cpu_us_per_task", "broker_cpu_us_per_task"):
                cpu = [r[key] for r in mine if r[key] is not None]
                summary[s.name][mode][key] = round(statistics.median(cpu), 1) if cpu else 0.0
            summary[s.name][mode]["errors"] = sum(r["errors"] for r in mine)
    results["summary"] = summary
    best: Dict[str, Any] = {}
    for mode in ("serial", "pipelined"):
        name = max((s.name for s in systems if s.kind == "celery"),
                   key=lambda n: summary[n][mode]["throughput"])
        best[mode] = {"system": name, **summary[name][mode]}
    results["celery_best"] = best
    tuned = max(results["celery_tuning"], key=lambda t: t["throughput"])
    results["celery_best_tuning_pass"] = {
        k: tuned[k] for k in ("system", "concurrency", "prefetch_multiplier", "procs",
                              "window", "kind", "throughput", "p50_ms", "p99_ms")}
    pfo3_pipe = max(summary[n]["pipelined"]["throughput"] for n in ("pfo3-1w", "pfo3-2w"))
    ratio = pfo3_pipe / best["pipelined"]["throughput"]
    p50s = {n: summary[n]["serial"]["p50_ms"] for n in ("pfo3-1w", "pfo3-2w")}
    results["targets"] = [
        {"target": "pipelined throughput >= 10x Celery's best", "met": ratio >= 10,
         "detail": f"pfo3's best {pfo3_pipe:,.0f}/s = {ratio:.2f}x Celery's best median "
                   f"{best['pipelined']['throughput']:,.0f}/s; "
                   f"{pfo3_pipe / tuned['throughput']:.2f}x the best single Celery pass of "
                   f"the tuning phase, {tuned['throughput']:,.0f}/s"},
        {"target": "one at a time p50 <= 1 ms", "met": max(p50s.values()) <= 1.0,
         "detail": ", ".join(f"{n} {v:.2f} ms" for n, v in p50s.items())
                   + f"; Celery's best {best['serial']['p50_ms']:.2f} ms"},
    ]
    if args.notes:
        with open(args.notes, encoding="utf-8") as f:
            results["notes"] = f.read()
    results["seconds"] = round(time.monotonic() - started, 1)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    with open(args.markdown, "w", encoding="utf-8") as f:
        f.write(render(results))
    print()
    for name in results["systems"]:
        for mode in ("serial", "pipelined"):
            m = summary[name][mode]
            print(f"{name:<15} {mode:<9} {m['throughput']:9.1f}/s  p50 {m['p50_ms']:7.2f} ms  "
                  f"p99 {m['p99_ms']:7.2f} ms  cpu {m['cpu_us_per_task']:7.1f} us/task  "
                  f"x{m['throughput'] / best[mode]['throughput']:.2f} vs Celery's best")
    for t in results["targets"]:
        print(f"{t['target']}: {'met' if t['met'] else 'NOT met'} ({t['detail']})")
    if leftovers:
        print("clean-up problems:", *leftovers, sep="\n  ")
    print(f"done in {results['seconds']:.0f} s: {args.results}, {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
