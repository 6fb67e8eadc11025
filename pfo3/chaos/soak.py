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
AMQP connections of this run's processes.

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
problem too.
"""

from __future__ import annotations

import json
import random
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

#: Replies that refuse a task before it runs: the store has no record.
REFUSALS = {"ocupado", "apagando", "broker_no_disponible", "buffer_lleno"}
#: Record states that end a task.
FINISHED = {"ok", "error", "timeout", "abandonada"}
TEXTS = ["hola mundo", "ñandú café", "uno dos tres cuatro", "x" * 200, ""]


class Skipped(Exception):
    """
    A fault could not be injected this time, for a reason outside pfo3 (a
    slow C{rabbitmqctl}).
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
                 broker: bool) -> None:
        self.workdir = workdir
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
        if self.broker:
            args += ["--broker", BROKER, "--broker-prefix", self.prefix, "--name", "o1"]
            for i in (1, 2):
                self.workers.append(Process(
                    self.workdir, f"w{i}", "pfo3-worker",
                    ["--broker", BROKER, "--broker-prefix", self.prefix, "--name", f"w{i}"],
                    wait_log="Connected to the broker"))
        self.orchestrator = Process(
            self.workdir, "o1", "pfo3", args, wait_port=self.port,
            wait_log="Connected to the broker" if self.broker else None)

    def stop(self) -> None:
        for p in [self.orchestrator, *self.workers]:
            if p is not None:
                p.stop()
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
        return faults

    def _injector(self, interval: float) -> None:
        schedule = self._schedule()
        i = 0
        while not self.stopping.wait(interval):
            name, fault = schedule[i % len(schedule)]
            i += 1
            at = time.monotonic() - self.started
            try:
                fault()
            except Skipped as e:
                self.fault_log.append(f"{at:6.1f}s {name} skipped: {e}")
                continue
            except Exception as e:
                self.problems.append(f"fault {name} at {at:.1f}s failed: {e!r}")
                continue
            self.faults[name] += 1
            self.fault_log.append(f"{at:6.1f}s {name}")

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
        for line in listing.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] in ports:
                subprocess.run(["rabbitmqctl", "-q", "close_connection", parts[0], "chaos soak"],
                               capture_output=True, timeout=60)

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
                if requests.pop("reset", None):
                    conn.cut_by_client = True
                    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    conn.sock.close()
                    break
                if requests.pop("slow", None):
                    slow.set()
                    threading.Timer(3.0, slow.clear).start()
                count = int(requests.pop("burst", "1"))
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
        self.stopping.set()
        injector.join(60)
        for t in threads:
            t.join(60)
        load_seconds = time.monotonic() - self.started
        self._reconcile()
        return self._figures(load_seconds)

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
                duplicates += 1
                examples.append(f"answered twice: {tarea_id} {e.replies}")
                continue
            final = [r for r in e.replies if r.get("estado") != "aceptada"]
            if final:
                r = final[0]
                code = r.get("codigo") or r["estado"]
                answered[code] += 1
                if code in REFUSALS:
                    continue
                want = "ok" if code == "ok" else code
                got = "ok" if state == "ok" else rec.get("codigo") or state
                if got != want:
                    mismatches += 1
                    if len(examples) < 20:
                        examples.append(f"reply {code} but record {rec} for {tarea_id}")
                continue
            if finished:
                code = rec.get("codigo")
                recorded[f"{state} ({code})" if code else str(state)] += 1
            elif rec.get("codigo") == "tarea_desconocida" and e.conn.cut_by_client:
                not_accepted += 1
            elif (rec.get("codigo") == "tarea_desconocida" and e.conn.dead.is_set()
                  and any(a <= e.conn.ended_at <= b for a, b in self.restarts)):
                # The orchestrator, stopping, closed the connection before
                # it read this line.
                not_accepted += 1
            else:
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
            "broker": self.broker, "sent": sent, "kinds": dict(kinds),
            "not_accepted": not_accepted, "accepted": accepted,
            "answered": dict(answered.most_common()),
            "recorded": dict(recorded.most_common()),
            "lost": lost, "duplicates": duplicates, "mismatches": mismatches,
            "faults": dict(self.faults), "fault_log": self.fault_log,
            "observed_estado": dict(self.observed.most_common()),
            "tracebacks": tracebacks, "problems": problems, "examples": examples[:20],
        }


def soak(duration: float = 60.0, seed: int = 1, clients: int = 4, broker: bool = True,
         workdir: Optional[Path] = None) -> Dict[str, Any]:
    """
    Run a soak of C{duration} seconds.

    @param broker: Run in distributed mode (RabbitMQ, two workers).
    @return: The figures, with C{"ok"} telling whether the ledger balanced
        and no other check failed.
    """
    with tempfile.TemporaryDirectory(prefix="pfo3-soak-") as tmp:
        s = Soak(workdir or Path(tmp), duration, seed, clients, broker)
        try:
            return s.run()
        finally:
            s.stop()


def report(f: Dict[str, Any]) -> str:
    """
    @return: The ledger of a soak, for people.
    """
    out = [
        f"soak: {f['seconds']} s of load ({'distributed' if f['broker'] else 'local'} mode), "
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
    for p in f["problems"]:
        out.append(f"  PROBLEM: {p}")
    for e in f["examples"]:
        out.append(f"  e.g. {e}")
    out.append("soak: ledger " + ("BALANCED" if f["balanced"] else "UNBALANCED")
               + (" PASS" if f["ok"] else " FAIL"))
    return "\n".join(out)
