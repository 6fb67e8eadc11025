"""
The soak: mixed load against a real pfo3 for a while, with faults injected
on a schedule, then a ledger that must balance.

Client threads send every task type (plain tasks, durable ones that wait,
and C{"esperar": false} background submissions) at a steady rate, each
with a fresh C{tarea_id}; an observer asks C{{"op": "estado"}} about
background tasks meanwhile.  A scheduler injects one fault every few
seconds, in turn: a client resets its connection with tasks in flight, a
client stops reading for a while, a burst of tasks, the orchestrator is
stopped (SIGTERM) and started again; with a broker, also C{kill -9} of a
worker mid-task (started again a second later) and the broker closing the
AMQP connections of this run's processes; with object storage (a SeaweedFS
started for the run, which some tasks use for their content or result),
C{kill -9} of the storage, started again three seconds later.  A fault that
was not carried out fails the run.

Once the load stops and the replies are in, every task is reconciled with
its record in the results store (SQLite, so records outlive the restarts):

  - I{accepted}: sent, and either answered or known to the store (a task
    on a connection cut, by the client or by a stopping orchestrator, before
    the server read it is not accepted);
  - I{answered}: exactly one reply, a result or an error with its code;
  - I{recorded}: no reply (background, or its connection was cut), and
    a finished record: C{ok}, C{error}/C{timeout} with a code, or
    C{abandonada};
  - I{lost}: anything else; I{duplicates}: more than one reply.

The ledger balances when accepted = answered + recorded, and none is lost
or answered twice; an answered task whose record says otherwise is a
problem too.  Then it is checked against the server's own figures: the
records in C{soak.db}, the tasks each life of the orchestrator logged it
ran, C{op: stats} of its last life, and the store's log of given-up
updates (L{Soak._check_server}).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from pfo3.chaos._process import (
    BROKER,
    Process,
    delete_broker_objects,
    free_port,
    wait_for_port,
)

#: The identity of the soak's object storage (SeaweedFS, started for the run).
WEED_ACCESS = "PFO3SOAKACCESSKEY"
WEED_SECRET = "pfo3-soak-secret-key-0123456789"

#: Replies that refuse a task before it runs: the store has no record.
REFUSALS = {"ocupado", "apagando", "broker_no_disponible", "buffer_lleno"}
#: Record states that end a task.
FINISHED = {"ok", "error", "timeout", "abandonada"}
TEXTS = ["hola mundo", "ñandú café", "uno dos tres cuatro", "x" * 200, ""]


#: Log lines of the results store giving record updates up (its C{dropped}
#: counter, which C{op: stats} does not show).
DROPPED_MARKERS = ("updates dropped since start", "record updates could not be written",
                   "updates was refused", "did not finish writing",
                   "stopping without it")

#: The faults a client thread carries out when asked (the rest, the
#: scheduler carries out itself).
CLIENT_FAULTS = {"client_reset": "reset", "slow_reader": "slow", "burst": "burst"}


class Skipped(Exception):
    """
    A fault could not be injected this time, for a reason outside pfo3 (a
    slow C{rabbitmqctl}).  The run fails with the reason: a schedule that
    did not happen proves nothing.
    """


@dataclass
class Entry:
    """
    One task the soak sent, and what came of it.
    """

    kind: str
    conn: Conn
    replies: List[Dict[str, Any]] = field(default_factory=list)
    record: Optional[Dict[str, Any]] = None


class Conn:
    """
    One client connection and how it ended.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dead = threading.Event()
        self.cut_by_client = False
        self.ended_at = 0.0
        self.ids: List[str] = []


class Ledger:
    """
    Every task sent, thread-safe.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: Dict[str, Entry] = {}
        self.unmatched = 0

    def sent(self, tarea_id: str, kind: str, conn: Conn) -> None:
        with self.lock:
            self.entries[tarea_id] = Entry(kind, conn)
            conn.ids.append(tarea_id)

    def reply(self, reply: Dict[str, Any]) -> None:
        with self.lock:
            entry = self.entries.get(str(reply.get("tarea_id")))
            if entry is None:
                self.unmatched += 1
            else:
                entry.replies.append(reply)

    def waiting(self, conn: Conn) -> int:
        with self.lock:
            return sum(1 for i in conn.ids if not self.entries[i].replies)


class Soak:
    """
    The processes, the clients and the fault schedule of one soak.
    """

    def __init__(self, workdir: Path, duration: float, seed: int, clients: int,
                 broker: bool, blobs: bool = False) -> None:
        self.workdir = workdir
        self.blobs = blobs
        #: The object storage (SeaweedFS) of a run with C{blobs}, its ports,
        #: and the reference of an object uploaded at the start.
        self.weed: Any = None
        self.weed_ports: List[int] = []
        self.ref = ""
        self.restarts_of_storage = 0
        self.duration = duration
        self.rng = random.Random(seed)
        self.seed = seed
        self.n_clients = clients
        self.broker = broker
        self.port = free_port()
        self.prefix = f"pfo3soak{uuid.uuid4().hex[:8]}"
        self.ledger = Ledger()
        self.stopping = threading.Event()
        self.faults: Counter[str] = Counter()
        #: Faults that a client thread carried out (of those it was asked).
        self.fired: Counter[str] = Counter()
        self.no_more_faults = threading.Event()
        #: What the server and its store say, read after the load.
        self.server: Dict[str, Any] = {}
        #: What the ledger made of each task (L{_figures}).
        self.verdicts: Dict[str, str] = {}
        self.fault_log: List[str] = []
        self.observed: Counter[str] = Counter()
        self.requests: List[Dict[str, str]] = [{} for _ in range(clients)]
        self.started = time.monotonic()
        self.workers: List[Process] = []
        self.orchestrator: Optional[Process] = None
        self.problems: List[str] = []
        #: When the orchestrator was stopping and starting: (from, to).
        self.restarts: List[Tuple[float, float]] = []

    # -- processes ------------------------------------------------------------

    def start(self) -> None:
        args = ["--port", f"tcp:{self.port}:interface=127.0.0.1",
                "--store", f"sqlite:{self.workdir / 'soak.db'}",
                "--timeout", "5", "--shutdown-timeout", "3", "--max-tasks", "2000"]
        blob_args: List[str] = []
        env: Dict[str, str] = {}
        if self.blobs:
            from pfo3.blobs import seaweed

            while len(self.weed_ports) < len(seaweed.PORTS):
                port = free_port()
                if port not in self.weed_ports:
                    self.weed_ports.append(port)
            self.weed = seaweed.start(self.workdir / "weed", WEED_ACCESS, WEED_SECRET,
                                      "pfo3-soak", ports=self.weed_ports)
            blob_args = ["--blobs", self.weed.url, "--blob-threshold", "1000"]
            env = self.weed.env()
        if self.broker:
            args += ["--broker", BROKER, "--broker-prefix", self.prefix, "--name", "o1"]
            for i in (1, 2):
                self.workers.append(Process(
                    self.workdir, f"w{i}", "pfo3-worker",
                    ["--broker", BROKER, "--broker-prefix", self.prefix, "--name", f"w{i}",
                     *blob_args], wait_log="Connected to the broker", env=env))
        self.orchestrator = Process(
            self.workdir, "o1", "pfo3", [*args, *blob_args], wait_port=self.port,
            wait_log="Connected to the broker" if self.broker else None, env=env)
        if self.blobs:
            self.ref = self._upload(b"uno dos tres cuatro cinco " * 40)

    def _upload(self, data: bytes) -> str:
        """
        Upload C{data} as a client does (C{op: subir}, then a presigned
        C{PUT}).

        @return: Its reference.
        """
        import urllib.request

        where = self._op({"op": "subir", "bytes": len(data)})["resultado"]
        request = urllib.request.Request(where["url"], data=data, method="PUT")
        urllib.request.urlopen(request, timeout=30).close()
        return str(where["ref"])

    def stop(self) -> None:
        for p in [self.orchestrator, *self.workers]:
            if p is not None:
                p.stop()
        if self.weed is not None:
            self.weed.stop()
        if self.broker:
            why = delete_broker_objects(self.prefix, ["o1"])
            if why:
                self.problems.append(why)

    # -- faults ---------------------------------------------------------------

    def _schedule(self) -> List[Tuple[str, Callable[[], None]]]:
        faults: List[Tuple[str, Callable[[], None]]] = [
            ("client_reset", self._client_reset), ("slow_reader", self._slow_reader),
            ("burst", self._burst), ("orchestrator_sigterm", self._restart_orchestrator),
        ]
        if self.broker:
            faults[1:1] = [("worker_kill9", self._kill_worker)]
            faults[3:3] = [("broker_connections_closed", self._close_broker_connections)]
        if self.blobs:
            faults[2:2] = [("object_storage_kill9", self._kill_storage)]
        return faults

    def _injector(self, interval: float) -> None:
        schedule = self._schedule()
        i = 0
        while not self.no_more_faults.wait(interval):
            name, fault = schedule[i % len(schedule)]
            i += 1
            at = time.monotonic() - self.started
            try:
                fault()
                if name in CLIENT_FAULTS:
                    self._wait_fired(name)
            except Skipped as e:
                self.fault_log.append(f"{at:6.1f}s {name} skipped: {e}")
                self.problems.append(f"fault {name} at {at:.1f}s did not fire: {e}")
                continue
            except Exception as e:
                self.problems.append(f"fault {name} at {at:.1f}s failed: {e!r}")
                continue
            self.faults[name] += 1
            self.fault_log.append(f"{at:6.1f}s {name}")

    def _wait_fired(self, name: str, deadline: float = 15.0) -> None:
        """
        Wait until a client thread has carried out the fault C{name}.

        @raise Skipped: if none did in time.
        """
        end = time.monotonic() + deadline
        with self.ledger.lock:
            want = self.faults[name] + 1
        while time.monotonic() < end:
            with self.ledger.lock:
                if self.fired[name] >= want:
                    return
            time.sleep(0.05)
        key = CLIENT_FAULTS[name]
        for requests in self.requests:
            requests.pop(key, None)
        raise Skipped(f"no client carried it out within {deadline:g} s")

    def _took(self, requests: Dict[str, str], key: str) -> Optional[str]:
        """
        Take the fault C{key} asked of a client, and count it fired.
        """
        value = requests.pop(key, None)
        if value is not None:
            name = next(n for n, k in CLIENT_FAULTS.items() if k == key)
            with self.ledger.lock:
                self.fired[name] += 1
        return value

    def _client_reset(self) -> None:
        self.requests[self.rng.randrange(self.n_clients)]["reset"] = "1"

    def _slow_reader(self) -> None:
        self.requests[self.rng.randrange(self.n_clients)]["slow"] = "3"

    def _burst(self) -> None:
        self.requests[self.rng.randrange(self.n_clients)]["burst"] = "300"

    def _kill_worker(self) -> None:
        worker = self.rng.choice(self.workers)
        worker.signal(signal.SIGKILL)
        worker.proc.wait(10)
        time.sleep(1.0)
        worker.restart()

    def _restart_orchestrator(self) -> None:
        assert self.orchestrator is not None
        began = time.monotonic()
        if self.orchestrator.stop(20) is None:
            self.problems.append("the orchestrator did not stop within 20 s of SIGTERM")
        self.orchestrator.restart()
        try:
            wait_for_port(self.port, self.orchestrator.proc, 30.0)
        finally:
            self.restarts.append((began, time.monotonic()))

    def _kill_storage(self) -> None:
        """
        C{kill -9} the object storage (SeaweedFS), and start it again three
        seconds later on the same ports and data folder.
        """
        from pfo3.blobs import seaweed

        os.killpg(self.weed.proc.pid, signal.SIGKILL)
        self.weed.proc.wait(10)
        time.sleep(3.0)
        # A bucket of its own tells when it answers again.
        self.restarts_of_storage += 1
        restarted = seaweed.start(self.workdir / "weed", WEED_ACCESS, WEED_SECRET,
                                  f"pfo3-soak-{self.restarts_of_storage}",
                                  ports=self.weed_ports)
        self.weed.proc = restarted.proc

    def _close_broker_connections(self) -> None:
        """
        Have RabbitMQ close the AMQP connections of this soak's processes
        (and no one else's).
        """
        pids = {str(p.pid) for p in [self.orchestrator, *self.workers] if p is not None}
        ss = subprocess.run(["ss", "-tnpH", "( dport = :5672 )"], capture_output=True,
                            text=True, timeout=10).stdout
        ports = {line.split()[3].rsplit(":", 1)[1] for line in ss.splitlines()
                 if any(f"pid={pid}," in line for pid in pids)}
        try:
            listing = subprocess.run(
                ["rabbitmqctl", "-q", "list_connections", "pid", "peer_port"],
                capture_output=True, text=True, timeout=60).stdout
        except subprocess.TimeoutExpired:
            raise Skipped("rabbitmqctl timed out")
        closed = 0
        for line in listing.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] in ports:
                done = subprocess.run(
                    ["rabbitmqctl", "-q", "close_connection", parts[0], "chaos soak"],
                    capture_output=True, timeout=60)
                closed += done.returncode == 0
        if not closed:
            raise Skipped(f"no AMQP connection of the run's processes was found to close "
                          f"(local ports {sorted(ports)})")

    # -- clients --------------------------------------------------------------

    def _connect(self) -> Optional[Conn]:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        except OSError:
            return None
        sock.settimeout(None)
        return Conn(sock)

    def _read(self, conn: Conn, slow: threading.Event) -> None:
        buf = b""
        try:
            while True:
                while slow.is_set():
                    time.sleep(0.05)
                chunk = conn.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    try:
                        self.ledger.reply(json.loads(line))
                    except ValueError:
                        self.problems.append(f"not a reply: {line[:200]!r}")
        except OSError:
            pass
        conn.ended_at = time.monotonic()
        conn.dead.set()

    def _task(self, rng: random.Random) -> Tuple[Dict[str, Any], str]:
        tipo = rng.choice(["uppercase", "reverse", "word_count", "sleep", "sleep"])
        req: Dict[str, Any] = {"tarea_id": str(uuid.uuid4()), "tipo": tipo}
        req["contenido"] = (round(rng.uniform(0.02, 0.8), 2) if tipo == "sleep"
                            else rng.choice(TEXTS))
        if self.blobs and tipo != "sleep" and rng.random() < 0.3:
            # Object storage: the content an object, or the result one.
            if rng.random() < 0.5:
                del req["contenido"]
                req["contenido_ref"] = self.ref
            else:
                req["contenido"] = "ab " * 500
                req["refs"] = True
        r = rng.random()
        if r < 0.25:
            req["esperar"] = False
            return req, "background"
        if r < 0.35:
            req["esperar"] = True
            return req, "durable"
        return req, "plain"

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 7919 + index)
        requests = self.requests[index]
        while not self.stopping.is_set():
            conn = self._connect()
            if conn is None:
                time.sleep(0.2)
                continue
            slow = threading.Event()
            reader = threading.Thread(target=self._read, args=(conn, slow), daemon=True)
            reader.start()
            while not self.stopping.is_set() and not conn.dead.is_set():
                if self._took(requests, "reset"):
                    conn.cut_by_client = True
                    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    conn.sock.close()
                    break
                if self._took(requests, "slow"):
                    slow.set()
                    threading.Timer(3.0, slow.clear).start()
                count = int(self._took(requests, "burst") or "1")
                lines = []
                for _ in range(count):
                    req, kind = self._task(rng)
                    self.ledger.sent(req["tarea_id"], kind, conn)
                    lines.append(json.dumps(req).encode() + b"\n")
                try:
                    conn.sock.sendall(b"".join(lines))
                except OSError:
                    break
                time.sleep(rng.uniform(0.005, 0.035))
            if not conn.cut_by_client:
                # Drain: wait for the replies to what this connection sent.
                end = time.monotonic() + 30
                while (self.ledger.waiting(conn) and not conn.dead.is_set()
                       and time.monotonic() < end):
                    time.sleep(0.05)
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                conn.dead.wait(10)
                conn.sock.close()
            reader.join(10)

    def _observer(self) -> None:
        """
        Ask C{op: estado} about background tasks while the soak runs.
        """
        rng = random.Random(self.seed)
        while not self.stopping.wait(0.25):
            with self.ledger.lock:
                ids = [i for i, e in list(self.ledger.entries.items())[-500:]
                       if e.kind == "background"]
            if not ids:
                continue
            try:
                for reply in self._ask([rng.choice(ids) for _ in range(5)], 5.0):
                    res = reply.get("resultado")
                    self.observed[str(reply.get("codigo") or (
                        res.get("estado") if isinstance(res, dict) else "?"))] += 1
            except OSError:
                self.observed["(connection failed)"] += 1

    def _ask(self, ids: List[str], deadline: float) -> List[Dict[str, Any]]:
        """
        Pipeline C{op: estado} for C{ids} on one connection.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=deadline) as sock:
            sock.sendall(b"".join(
                json.dumps({"op": "estado", "tarea_id": i}).encode() + b"\n" for i in ids))
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        return [json.loads(line) for line in data.splitlines()]

    # -- the run --------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        self.start()
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                   for i in range(self.n_clients)]
        threads.append(threading.Thread(target=self._observer, daemon=True))
        injector = threading.Thread(
            target=self._injector, args=(max(2.0, min(6.0, self.duration / 10)),), daemon=True)
        for t in [*threads, injector]:
            t.start()
        time.sleep(self.duration)
        # The faults stop first, so that each one scheduled is carried out
        # while the clients still run.
        self.no_more_faults.set()
        injector.join(120)
        self.stopping.set()
        for t in threads:
            t.join(60)
        load_seconds = time.monotonic() - self.started
        self._reconcile()
        self._read_server()
        figures = self._figures(load_seconds)
        self._check_server(figures)
        return figures

    def _reconcile(self) -> None:
        """
        Fetch the record of every task, waiting (a bounded time) for the
        records of tasks that have not finished yet.
        """
        assert self.orchestrator is not None
        try:
            # A restart may have been the last fault: let it finish.
            wait_for_port(self.port, self.orchestrator.proc, 30.0)
        except RuntimeError as e:
            self.problems.append(f"the orchestrator is not running at the end: {e}")
            return
        end = time.monotonic() + 60
        todo = list(self.ledger.entries)
        while todo:
            records: Dict[str, Dict[str, Any]] = {}
            for i in range(0, len(todo), 1000):
                for reply in self._ask(todo[i:i + 1000], 30.0):
                    records[str(reply.get("tarea_id"))] = reply
            todo = []
            for tarea_id, reply in records.items():
                entry = self.ledger.entries[tarea_id]
                res = reply.get("resultado")
                entry.record = res if isinstance(res, dict) else {"codigo": reply.get("codigo")}
                if isinstance(res, dict) and res.get("estado") not in FINISHED:
                    todo.append(tarea_id)
                elif reply.get("codigo") == "almacen_no_disponible":
                    todo.append(tarea_id)
            if todo and time.monotonic() > end:
                break
            if todo:
                time.sleep(1.0)

    def _read_server(self) -> None:
        """
        Read what the server says of the run: C{op: stats} of its last life
        once nothing is in flight, then (after stopping it) the tasks each
        life ran by its log, the store's given-up updates by its log, and
        the records in C{soak.db}.
        """
        assert self.orchestrator is not None
        stats: Optional[Dict[str, Any]] = None
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                reply = self._op({"op": "stats"})
            except (OSError, ValueError) as e:
                self.problems.append(f"op stats failed: {e}")
                break
            stats = reply.get("resultado")
            if (isinstance(stats, dict) and stats.get("en_curso") == 0
                    and (stats.get("store") or {}).get("pendientes") == 0):
                break
            time.sleep(0.5)
        if self.orchestrator.stop(30) is None:
            self.problems.append("the orchestrator did not stop within 30 s of SIGTERM")
        log = self.orchestrator.log_text()
        self.server = {
            "stats": stats,
            "lives": log.count("pfo3 started:"),
            "completed": [int(n) for n in re.findall(r"pfo3 stopped after (\d+) task", log)],
            "dropped": [line for line in log.splitlines()
                        if any(m in line for m in DROPPED_MARKERS)],
            "rows": read_records(self.workdir / "soak.db"),
        }

    def _op(self, request: Dict[str, Any]) -> Dict[str, Any]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply: Dict[str, Any] = json.loads(data.split(b"\n")[0])
        return reply

    def _check_server(self, figures: Dict[str, Any]) -> None:
        """
        Check the ledger against the server's own figures (L{_read_server}):
        the records in the store are those of the tasks accepted and not
        refused, each finished and saying what the client saw; the tasks
        each life of the orchestrator says it ran add up to the records;
        its last C{op: stats} counts what that life ran; the store gave no
        update up.  Adds the figures and any problem to C{figures}.
        """
        problems: List[str] = []
        server = self.server
        rows: Dict[str, Tuple[str, Optional[str]]] = server.get("rows", {})
        missing = extra = unfinished = disagree = 0
        for tarea_id, e in self.ledger.entries.items():
            verdict = self.verdicts.get(tarea_id)
            row = rows.get(tarea_id)
            if verdict in ("duplicate", "lost"):
                continue
            if verdict == "not_accepted" or verdict == "refused":
                if row is not None and (verdict == "not_accepted" or row[0] not in FINISHED):
                    extra += 1
                    problems.append(f"a record for {tarea_id} ({verdict}): {row}")
                continue
            if row is None:
                missing += 1
                if missing <= 5:
                    problems.append(f"no record in the store for {tarea_id} ({verdict}, "
                                    f"replies {e.replies}, estado said {e.record})")
                continue
            if row[0] not in FINISHED:
                unfinished += 1
                problems.append(f"the record of {tarea_id} is not finished: {row}")
                continue
            got = "ok" if row[0] == "ok" else row[1] or row[0]
            final = [r for r in e.replies if r.get("estado") != "aceptada"]
            if final:
                want = "ok" if final[0].get("estado") == "ok" else final[0].get("codigo")
            else:
                rec = e.record or {}
                want = "ok" if rec.get("estado") == "ok" else rec.get("codigo") or rec.get(
                    "estado")
            if got != want:
                disagree += 1
                if disagree <= 5:
                    problems.append(f"the store says {row} for {tarea_id}, the client saw "
                                    f"{want}")
        strangers = set(rows) - set(self.ledger.entries)
        if strangers:
            problems.append(f"{len(strangers)} records of tasks never sent, e.g. "
                            f"{sorted(strangers)[:3]}")
        completed = server.get("completed", [])
        lives = server.get("lives", 0)
        if len(completed) != lives:
            problems.append(f"the orchestrator started {lives} times but logged how many "
                            f"tasks it ran {len(completed)} times")
        if sum(completed) != len(rows):
            problems.append(f"the orchestrator says it ran {sum(completed)} tasks, the store "
                            f"holds {len(rows)} records")
        stats = server.get("stats")
        if not isinstance(stats, dict):
            problems.append(f"no op stats at the end: {stats!r}")
        elif completed and stats.get("total") != completed[-1]:
            problems.append(f"op stats counted {stats.get('total')} tasks in the last life, "
                            f"its log {completed[-1]}")
        dropped = server.get("dropped", [])
        if dropped:
            problems.append(f"the store gave record updates up: {dropped[:3]}")
        figures["store"] = {
            "records": len(rows), "missing": missing, "unexpected": extra + len(strangers),
            "unfinished": unfinished, "disagree": disagree, "dropped_lines": len(dropped),
            "lives": lives, "ran_by_log": sum(completed),
            "stats_total_last_life": stats.get("total") if isinstance(stats, dict) else None,
        }
        figures["faults_fired"] = {name: self.fired.get(name, self.faults[name])
                                   for name in self.faults}
        for name, n in self.faults.items():
            if name in CLIENT_FAULTS and self.fired[name] < n:
                problems.append(f"fault {name}: scheduled {n} times, carried out "
                                f"{self.fired[name]} times")
        figures["problems"].extend(problems)
        figures["ok"] = figures["ok"] and not problems

    def _figures(self, load_seconds: float) -> Dict[str, Any]:
        answered: Counter[str] = Counter()
        recorded: Counter[str] = Counter()
        not_accepted = lost = duplicates = mismatches = 0
        examples: List[str] = []
        kinds: Counter[str] = Counter()
        for tarea_id, e in self.ledger.entries.items():
            kinds[e.kind] += 1
            rec = e.record or {}
            state = rec.get("estado")
            finished = state in FINISHED
            if len(e.replies) > 1:
                self.verdicts[tarea_id] = "duplicate"
                duplicates += 1
                examples.append(f"answered twice: {tarea_id} {e.replies}")
                continue
            final = [r for r in e.replies if r.get("estado") != "aceptada"]
            if final:
                r = final[0]
                code = r.get("codigo") or r["estado"]
                answered[code] += 1
                if code in REFUSALS:
                    self.verdicts[tarea_id] = "refused"
                    continue
                self.verdicts[tarea_id] = "answered"
                want = "ok" if code == "ok" else code
                got = "ok" if state == "ok" else rec.get("codigo") or state
                if got != want:
                    mismatches += 1
                    if len(examples) < 20:
                        examples.append(f"reply {code} but record {rec} for {tarea_id}")
                continue
            if finished:
                self.verdicts[tarea_id] = "recorded"
                code = rec.get("codigo")
                recorded[f"{state} ({code})" if code else str(state)] += 1
            elif rec.get("codigo") == "tarea_desconocida" and e.conn.cut_by_client:
                self.verdicts[tarea_id] = "not_accepted"
                not_accepted += 1
            elif (rec.get("codigo") == "tarea_desconocida" and e.conn.dead.is_set()
                  and any(a <= e.conn.ended_at <= b for a, b in self.restarts)):
                # The orchestrator, stopping, closed the connection before
                # it read this line.
                self.verdicts[tarea_id] = "not_accepted"
                not_accepted += 1
            else:
                self.verdicts[tarea_id] = "lost"
                lost += 1
                if len(examples) < 20:
                    examples.append(f"lost ({e.kind}, replies {e.replies}): {tarea_id} {rec}")
        sent = len(self.ledger.entries)
        accepted = sent - not_accepted
        balanced = (accepted == sum(answered.values()) + sum(recorded.values())
                    and lost == 0 and duplicates == 0)
        problems = list(self.problems)
        if mismatches:
            problems.append(f"{mismatches} replies disagree with their records")
        if self.ledger.unmatched:
            problems.append(f"{self.ledger.unmatched} replies matched no task sent")
        procs = [p for p in [self.orchestrator, *self.workers] if p is not None]
        tracebacks = {p.name: len(p.tracebacks()) for p in procs}
        if any(tracebacks.values()):
            problems.append(f"tracebacks in the logs: {tracebacks}")
        return {
            "ok": balanced and not problems, "balanced": balanced, "seed": self.seed,
            "duration": self.duration, "seconds": round(load_seconds, 1),
            "broker": self.broker, "blobs": self.blobs, "sent": sent, "kinds": dict(kinds),
            "not_accepted": not_accepted, "accepted": accepted,
            "answered": dict(answered.most_common()),
            "recorded": dict(recorded.most_common()),
            "lost": lost, "duplicates": duplicates, "mismatches": mismatches,
            "faults": dict(self.faults), "fault_log": self.fault_log,
            "observed_estado": dict(self.observed.most_common()),
            "tracebacks": tracebacks, "problems": problems, "examples": examples[:20],
        }


def read_records(path: Path) -> Dict[str, Tuple[str, Optional[str]]]:
    """
    @return: The C{(estado, codigo)} of every record in a SQLite store, by
        C{tarea_id}.
    """
    import sqlite3

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {str(t): (str(e), c) for t, e, c in db.execute(
            "SELECT tarea_id, estado, codigo FROM pfo3_tareas")}
    finally:
        db.close()


def soak(duration: float = 60.0, seed: int = 1, clients: int = 4, broker: bool = True,
         workdir: Optional[Path] = None, blobs: bool = True) -> Dict[str, Any]:
    """
    Run a soak of C{duration} seconds.

    @param broker: Run in distributed mode (RabbitMQ, two workers).
    @param blobs: Give the server and the workers an object storage
        (SeaweedFS's C{weed mini}, started for the run), send tasks that use
        it, and kill it (then start it again) in the fault schedule.
    @return: The figures, with C{"ok"} telling whether the ledger balanced
        and no other check failed.
    """
    with tempfile.TemporaryDirectory(prefix="pfo3-soak-") as tmp:
        s = Soak(workdir or Path(tmp), duration, seed, clients, broker, blobs)
        try:
            return s.run()
        finally:
            s.stop()


def report(f: Dict[str, Any]) -> str:
    """
    @return: The ledger of a soak, for people.
    """
    out = [
        f"soak: {f['seconds']} s of load ({'distributed' if f['broker'] else 'local'} mode"
        f"{', object storage' if f.get('blobs') else ''}), "
        f"seed {f['seed']}",
        "  faults injected: " + ", ".join(f"{k} {v}" for k, v in f["faults"].items()),
        f"  tasks sent                 {f['sent']:>8}   "
        + ", ".join(f"{k} {v}" for k, v in f["kinds"].items()),
        f"  - not accepted             {f['not_accepted']:>8}   "
        "(on a connection cut, by the client or a stopping server, before it read them)",
        f"  = accepted                 {f['accepted']:>8}",
        f"    answered                 {sum(f['answered'].values()):>8}   "
        + ", ".join(f"{k} {v}" for k, v in f["answered"].items()),
        f"    recorded, no reply       {sum(f['recorded'].values()):>8}   "
        + ", ".join(f"{k} {v}" for k, v in f["recorded"].items()),
        f"    lost                     {f['lost']:>8}",
        f"  answered twice             {f['duplicates']:>8}",
        f"  reply and record disagree  {f['mismatches']:>8}",
        "  estado asked meanwhile: " + ", ".join(
            f"{k} {v}" for k, v in f["observed_estado"].items()),
        "  tracebacks in logs: " + ", ".join(f"{k} {v}" for k, v in f["tracebacks"].items()),
    ]
    st = f.get("store")
    if st is not None:
        out += [
            f"  the store (soak.db): {st['records']} records; missing {st['missing']}, "
            f"unexpected {st['unexpected']}, unfinished {st['unfinished']}, "
            f"disagreeing with the replies {st['disagree']}; updates given up: "
            f"{st['dropped_lines']} log lines",
            f"  the orchestrator: {st['lives']} lives, {st['ran_by_log']} tasks run by its "
            f"log; op stats of the last life: {st['stats_total_last_life']} tasks",
            "  faults carried out: " + ", ".join(
                f"{k} {v}" for k, v in f.get("faults_fired", {}).items()),
        ]
    for p in f["problems"]:
        out.append(f"  PROBLEM: {p}")
    for e in f["examples"]:
        out.append(f"  e.g. {e}")
    out.append("soak: ledger " + ("BALANCED" if f["balanced"] else "UNBALANCED")
               + (" PASS" if f["ok"] else " FAIL"))
    return "\n".join(out)
