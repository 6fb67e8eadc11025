"""
The load engine of C{pfo3-bench}: task mixes, pipelined connections,
latency histograms and several load processes.

The generator competes with the server for the same cores, so it does as little
work per request as it can:

  - every request line is encoded once, before the run: a connection has
    C{--inflight} I{slots}, each with its own C{tarea_id} (C{t0}, C{t1}, ...),
    and a slot is reused only after its reply arrived;
  - a reply is not decoded: the C{tarea_id} is cut out of the line with two
    C{find}s and C{"estado": "ok"} is looked for as bytes (inside a JSON string
    a quote is always escaped, so neither can be faked by a result); only
    error lines are decoded, to count them by C{codigo};
  - latencies go into a histogram of 10 microsecond buckets (a dict), one
    clock reading per chunk of replies; the histograms of several load
    processes (C{--procs}) are summed.

Requests carry C{tarea_id}, C{tipo} and C{contenido}; against a server that
requires tokens, each connection sends C{{"op": "auth"}} first (its reply is
set aside), or every request carries the token (L{Plan.auth}).
L{_request_line} is the one place where request lines are built.
"""


from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol

from pfo3.framing import LineSplitter

__all__ = [
    "Kind", "Plan", "Result", "merge_hist", "parse_mix", "percentile", "run_load",
    "run_procs", "schedule", "split",
]

DEFAULT_ENDPOINT = "tcp:127.0.0.1:9000"
DEFAULT_TEXT = "hola mundo"
DEFAULT_SLEEP = 0.01

#: Width of a latency histogram bucket, in seconds.
BUCKET = 1e-5
_PER_SECOND = 1 / BUCKET

#: Task names (and codes) whose C{contenido} is a number of seconds.
SLEEP_TIPOS = frozenset({"sleep", "4", "espera", "delay"})

_OK = (b'"estado": "ok"', b'"estado":"ok"')
_TID = b'"tarea_id"'


# --- task mix -------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """
    One kind of request in the mix.

    @ivar tipo: Sent as the request's C{tipo}.
    @ivar contenido: Sent as the request's C{contenido}.
    @ivar weight: Relative share of the requests.
    """

    tipo: str
    contenido: Any
    weight: int

    def label(self) -> str:
        """
        @return: The kind as C{TIPO=CONTENIDO:WEIGHT}, contenido cut short.
        """
        text = json.dumps(self.contenido, ensure_ascii=False)
        if len(text) > 20:
            text = text[:17] + "..."
        return f"{self.tipo}={text}:{self.weight}"


def parse_mix(specs: Sequence[str], text: str = DEFAULT_TEXT) -> List[Kind]:
    """
    Parse task-mix specifications.

    Each spec is a comma-separated list of C{TIPO[=CONTENIDO][:WEIGHT]}, e.g.
    C{uppercase:80,sleep=0.01:20}.  C{CONTENIDO} is read as JSON when it
    parses (C{0.5}, C{"123"}) and as plain text otherwise; without it, a
    sleep gets L{DEFAULT_SLEEP} seconds and any other task C{text}.  The
    weight defaults to 1.

    @raise ValueError: on an empty spec or a weight that is not a positive
        integer.
    """
    kinds: List[Kind] = []
    for spec in specs:
        for item in spec.split(","):
            item = item.strip()
            if not item:
                raise ValueError(f"empty task in mix {spec!r}")
            weight = 1
            head, sep, tail = item.rpartition(":")
            if sep and tail.strip().isdigit():
                weight = int(tail)
                item = head
            if weight < 1:
                raise ValueError(f"weight must be a positive integer in {item!r}")
            tipo, eq, raw = item.partition("=")
            tipo = tipo.strip()
            if not tipo:
                raise ValueError(f"missing tipo in {item!r}")
            contenido: Any
            if eq:
                try:
                    contenido = json.loads(raw)
                except ValueError:
                    contenido = raw
            elif tipo.lower() in SLEEP_TIPOS:
                contenido = DEFAULT_SLEEP
            else:
                contenido = text
            kinds.append(Kind(tipo, contenido, weight))
    if not kinds:
        raise ValueError("the task mix is empty")
    return kinds


def schedule(kinds: Sequence[Kind]) -> List[int]:
    """
    @return: One cycle of kind indexes in which each kind appears in
        proportion to its weight, spread out evenly (not in runs).
    """
    weights = [k.weight for k in kinds]
    g = 0
    for w in weights:
        g = math.gcd(g, w)
    shares = [w // g for w in weights]
    total = sum(shares)
    cycle: List[int] = []
    given = [0] * len(shares)
    for n in range(1, total + 1):
        # the kind that is furthest behind its share after n picks
        i = max(range(len(shares)), key=lambda j: shares[j] * n / total - given[j])
        given[i] += 1
        cycle.append(i)
    return cycle


def make_text(size: int) -> str:
    """
    @return: C{size} characters of C{"hola mundo hola mundo ..."}.
    """
    unit = DEFAULT_TEXT + " "
    return (unit * (size // len(unit) + 1))[:size]


def _request_line(tarea_id: str, kind: Kind, token: Optional[str] = None) -> bytes:
    request = {"tarea_id": tarea_id, "tipo": kind.tipo, "contenido": kind.contenido}
    if token is not None:
        request["token"] = token
    return (json.dumps(request, ensure_ascii=False) + "\n").encode("utf-8")


# --- histograms -------------------------------------------------------------


def percentile(hist: Dict[int, int], fraction: float) -> float:
    """
    @param hist: Bucket index (latency / L{BUCKET}) to count.
    @param fraction: Between 0 and 1.
    @return: The latency in seconds below which C{fraction} of the samples
        fall (the middle of its bucket); 0.0 for an empty histogram.
    """
    total = sum(hist.values())
    if not total:
        return 0.0
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for key in sorted(hist):
        seen += hist[key]
        if seen >= rank:
            return (key + 0.5) * BUCKET
    raise AssertionError("unreachable")  # pragma: no cover


def merge_hist(into: Dict[int, int], other: Dict[int, int]) -> None:
    """
    Add the counts of C{other} to C{into}.
    """
    for key, n in other.items():
        into[key] = into.get(key, 0) + n


# --- results ----------------------------------------------------------------


@dataclass
class Result:
    """
    What one load process (or several, merged) saw.
    """

    connections: int = 0
    connected: int = 0
    connect_errors: int = 0
    connect_error: str = ""
    sent: int = 0
    replies: int = 0
    ok: int = 0
    errors: Dict[str, int] = field(default_factory=dict)
    unmatched: int = 0
    lost_connections: int = 0
    lost_reason: str = ""
    elapsed: float = 0.0
    client_cpu: float = 0.0
    hist: Dict[int, int] = field(default_factory=dict)

    def merge(self, other: Result) -> None:
        """
        Fold another load process's result into this one.
        """
        self.connections += other.connections
        self.connected += other.connected
        self.connect_errors += other.connect_errors
        self.connect_error = self.connect_error or other.connect_error
        self.sent += other.sent
        self.replies += other.replies
        self.ok += other.ok
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        self.unmatched += other.unmatched
        self.lost_connections += other.lost_connections
        self.lost_reason = self.lost_reason or other.lost_reason
        self.elapsed = max(self.elapsed, other.elapsed)
        self.client_cpu += other.client_cpu
        merge_hist(self.hist, other.hist)

    def summary(self) -> Dict[str, Any]:
        """
        @return: The figures as a JSON-ready dict (latencies in milliseconds).
        """
        hist = self.hist
        return {
            "connections": self.connections,
            "connected": self.connected,
            "connect_errors": self.connect_errors,
            "connect_error": self.connect_error,
            "sent": self.sent,
            "replies": self.replies,
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "error_count": sum(self.errors.values()),
            "unanswered": self.sent - self.replies,
            "unmatched": self.unmatched,
            "lost_connections": self.lost_connections,
            "lost_reason": self.lost_reason,
            "elapsed_s": round(self.elapsed, 6),
            "throughput": round(self.replies / self.elapsed, 1) if self.elapsed > 0 else 0.0,
            "latency_ms": {
                "p50": round(percentile(hist, 0.50) * 1e3, 3),
                "p90": round(percentile(hist, 0.90) * 1e3, 3),
                "p99": round(percentile(hist, 0.99) * 1e3, 3),
                "max": round(percentile(hist, 1.0) * 1e3, 3),
            },
            "client_cpu_s": round(self.client_cpu, 3),
        }


# --- the load ---------------------------------------------------------------


@dataclass
class Plan:
    """
    What one load process does.

    @ivar endpoint: Twisted client endpoint string.
    @ivar connections: Connections this process opens.
    @ivar inflight: Requests in flight per connection.
    @ivar kinds: The task mix.
    @ivar count: Requests to send in all (L{None}: until C{duration}).
    @ivar duration: Seconds to keep sending (when C{count} is L{None}).
    @ivar timeout: Give up when no reply came for this many seconds while
        requests are outstanding.
    @ivar offset: Where this process starts in the mix's cycle.
    @ivar token: A bearer token for a server that requires one.
    @ivar auth: How the token is sent: C{"connection"} (C{op: auth} once per
        connection) or C{"request"} (in every request).
    """

    endpoint: str
    connections: int
    inflight: int
    kinds: List[Kind]
    count: Optional[int]
    duration: float
    timeout: float = 30.0
    offset: int = 0
    token: Optional[str] = None
    auth: str = "connection"


class _Load:
    """
    The shared state of one load process's connections.
    """

    def __init__(self, plan: Plan, reactor: Any) -> None:
        self.plan = plan
        self.reactor = reactor
        self.result = Result(connections=plan.connections)
        tids = [f"t{s}" for s in range(plan.inflight)]
        self.slot_of = {t.encode(): s for s, t in enumerate(tids)}
        per_request = plan.token if plan.auth == "request" else None
        self.lines = [[_request_line(t, k, per_request) for t in tids] for k in plan.kinds]
        self.auth_line = b""
        if plan.token is not None and plan.auth == "connection":
            self.auth_line = (json.dumps({"op": "auth", "token": plan.token}) + "\n").encode()
        self.cycle = schedule(plan.kinds)
        self.remaining: float = plan.count if plan.count is not None else math.inf
        self.deadline = math.inf
        self.started = 0.0
        self.last_reply = 0.0
        self.protocols: List[_LoadProtocol] = []
        self.sending = False
        self.finished = False
        self.on_finish: Any = None

    def error_line(self, line: bytes) -> None:
        try:
            reply = json.loads(line)
            code = reply.get("codigo") or reply.get("estado") or "sin_codigo"
        except (ValueError, AttributeError):
            code = "respuesta_invalida"
        errors = self.result.errors
        errors[str(code)] = errors.get(str(code), 0) + 1

    def check_done(self) -> None:
        if self.finished:
            return
        if self.sending and self.remaining > 0 and time.perf_counter() < self.deadline:
            return
        if all(p.inflight == 0 for p in self.protocols):
            self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.sending = False
        end = self.last_reply or time.perf_counter()
        self.result.elapsed = max(0.0, end - self.started) if self.started else 0.0
        for p in self.protocols:
            if p.transport is not None:
                p.transport.loseConnection()
        if self.on_finish is not None:
            self.on_finish()


class _LoadProtocol(Protocol):
    """
    One connection of the load: refills each slot as its reply arrives.
    """

    def __init__(self, load: _Load, index: int) -> None:
        self.load = load
        self.index = index
        self.inflight = 0
        self.position = load.plan.offset + index
        self.starts = [0.0] * load.plan.inflight
        self.feed = LineSplitter().feed
        self.sock: Any = None
        self.lost = False
        self.authenticating = False

    def connectionMade(self) -> None:
        # On a plain TCP or UNIX connection, requests go straight to the
        # socket: a Twisted transport would buffer them until the next reactor
        # iteration and register the socket for writability each time, which
        # costs the generator more than the requests themselves.  If the
        # kernel ever takes less than everything, the rest and all later
        # requests go through the transport, so the order is kept.
        transport = self.transport
        if (
            isinstance(transport, FileDescriptor)
            and not ISSLTransport.providedBy(transport)
            and not getattr(transport, "TLS", False)
        ):
            self.sock = getattr(transport, "socket", None)
        if self.load.auth_line:
            self.authenticating = True
            self._write(self.load.auth_line)

    def _write(self, data: bytes) -> None:
        sock = self.sock
        if sock is not None:
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return  # the connection is going away; connectionLost follows
            if sent == len(data):
                return
            self.sock = None
            data = data[sent:]
        self.transport.write(data)  # type: ignore[union-attr]

    def start(self) -> None:
        load = self.load
        now = time.perf_counter()
        out = []
        cycle = load.cycle
        lines = load.lines
        for slot in range(load.plan.inflight):
            if load.remaining <= 0:
                break
            load.remaining -= 1
            out.append(lines[cycle[self.position % len(cycle)]][slot])
            self.position += 1
            self.starts[slot] = now
        self.inflight = len(out)
        load.result.sent += len(out)
        if out:
            self._write(b"".join(out))

    def dataReceived(self, data: bytes) -> None:
        now = time.perf_counter()
        load = self.load
        chunk = self.feed(data)
        result = load.result
        if self.authenticating and chunk:
            # The answer to op: auth comes first; a refusal counts as an error.
            self.authenticating = False
            answer = chunk.pop(0)
            if _OK[0] not in answer and _OK[1] not in answer:
                load.error_line(answer)
        hist = result.hist
        starts = self.starts
        slot_of = load.slot_of
        lines = load.lines
        cycle = load.cycle
        ncycle = len(cycle)
        sending = load.sending and now < load.deadline
        out = []
        replies = ok = 0
        for line in chunk:
            if not line or line.isspace():
                continue
            replies += 1
            if _OK[0] in line or _OK[1] in line:
                ok += 1
            else:
                load.error_line(line)
            i = line.find(_TID)
            if i < 0:
                result.unmatched += 1
                continue
            j = line.find(b'"', i + 10)
            slot = slot_of.get(line[j + 1:line.find(b'"', j + 1)])
            if slot is None:
                result.unmatched += 1
                continue
            key = int((now - starts[slot]) * _PER_SECOND)
            hist[key] = hist.get(key, 0) + 1
            if sending and load.remaining > 0:
                load.remaining -= 1
                out.append(lines[cycle[self.position % ncycle]][slot])
                self.position += 1
                starts[slot] = now
            else:
                self.inflight -= 1
        result.replies += replies
        result.ok += ok
        if replies:
            load.last_reply = now
        if out:
            result.sent += len(out)
            self._write(b"".join(out))
        if self.inflight <= 0:
            load.check_done()

    def connectionLost(self, reason: Any = None) -> None:
        load = self.load
        self.lost = True
        if not load.finished:
            result = load.result
            result.lost_connections += 1
            if not result.lost_reason and reason is not None:
                result.lost_reason = f"{type(reason.value).__name__}: {reason.value}"
            self.inflight = 0
            if all(p.lost for p in load.protocols):
                load.finish()
            else:
                load.check_done()


def _connect_all(load: _Load, reactor: Any) -> Any:
    """
    Open the plan's connections, at most 100 handshakes at a time.

    @return: A Deferred that fires when all are open, or fails with the
        first connection error.
    """
    from twisted.internet import defer
    from twisted.internet.endpoints import clientFromString

    endpoint = clientFromString(reactor, load.plan.endpoint)
    indexes = iter(range(load.plan.connections))

    @defer.inlineCallbacks
    def worker() -> Any:
        for index in indexes:
            proto = _LoadProtocol(load, index)
            yield endpoint.connect(_OneFactory(proto))
            load.protocols.append(proto)
            load.result.connected += 1

    workers = [worker() for _ in range(min(100, load.plan.connections))]
    return defer.gatherResults(workers, consumeErrors=True)


class _OneFactory(Factory):
    """
    Hands out one prepared protocol.
    """

    noisy = False

    def __init__(self, proto: Any) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> Any:
        return self.proto


def _cpu() -> float:
    usage_ = resource.getrusage(resource.RUSAGE_SELF)
    return usage_.ru_utime + usage_.ru_stime


def run_load(
    plan: Plan,
    ready: Any = None,
    progress: Any = None,
) -> Result:
    """
    Run one load process's share in this process, on the global reactor
    (so at most once per process).

    @param ready: Called with no argument once every connection is open and
        before the first request leaves; it may block (to start several load
        processes together) and return false to abort.
    @param progress: Called every half second of the run with the replies
        so far and the seconds since the first request left.
    @return: What the load saw.
    """
    from twisted.internet import reactor as global_reactor
    from twisted.internet.task import LoopingCall

    reactor: Any = global_reactor
    load = _Load(plan, reactor)
    load.on_finish = lambda: reactor.callLater(0, reactor.stop)
    cpu0 = _cpu()

    def connected(_: Any) -> None:
        if ready is not None and ready() is False:
            load.finish()
            return
        load.started = time.perf_counter()
        load.last_reply = 0.0
        load.sending = True
        if plan.count is None:
            load.deadline = load.started + plan.duration
            reactor.callLater(plan.duration + 0.001, load.check_done)
        for p in load.protocols:
            p.start()
        load.check_done()

    def failed(f: Any) -> None:
        err = f.value
        if hasattr(err, "subFailure"):
            err = err.subFailure.value
        load.result.connect_errors = load.result.connections - load.result.connected
        load.result.connect_error = f"{type(err).__name__}: {err}"
        if ready is not None:
            ready(failed=True)
        load.finish()

    def watchdog() -> None:
        if progress is not None and load.started and not load.finished:
            progress(load.result.replies, time.perf_counter() - load.started)
        if load.sending and not load.finished:
            quiet = time.perf_counter() - (load.last_reply or load.started)
            if quiet > plan.timeout:
                load.finish()

    d = _connect_all(load, reactor)
    d.addCallbacks(connected, failed)
    watch = LoopingCall(watchdog)
    watch.start(0.5, now=False)
    reactor.run()
    if watch.running:
        watch.stop()
    load.result.client_cpu = _cpu() - cpu0
    return load.result


# --- several load processes -------------------------------------------------


def split(total: int, parts: int) -> List[int]:
    """
    @return: C{total} split into C{parts} integers differing by at most one.
    """
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _child(plan: Plan, index: int, queue: Any, go: Any, abort: Any, counters: Any) -> None:
    def ready(failed: bool = False) -> bool:
        queue.put(("ready", index, failed))
        if failed:
            return False
        go.wait()
        return not abort.value

    def progress(replies: int, elapsed: float) -> None:
        counters[index] = replies

    result = run_load(plan, ready, progress)
    queue.put(("result", index, result))


def run_procs(plans: Sequence[Plan], progress: Any = None) -> Result:
    """
    Run each plan in its own process, started together; merge their results.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    go = ctx.Event()
    abort = ctx.Value("b", 0)
    counters = ctx.Array("q", len(plans))
    procs = [
        ctx.Process(target=_child, args=(plan, i, queue, go, abort, counters), daemon=True)
        for i, plan in enumerate(plans)
    ]
    for p in procs:
        p.start()
    results: Dict[int, Result] = {}
    readies = 0
    started = 0.0
    try:
        while len(results) < len(procs):
            try:
                message = queue.get(timeout=0.5)
            except Exception:  # nothing came within the half second
                if any(i not in results and not p.is_alive() for i, p in enumerate(procs)):
                    # a load process died without a result: release the others
                    abort.value = 1
                    go.set()
                    if all(i in results or not p.is_alive() for i, p in enumerate(procs)):
                        break
                if progress is not None and started:
                    progress(sum(counters[:]), time.perf_counter() - started)
                continue
            kind, index, payload = message
            if kind == "ready":
                readies += 1
                if payload:
                    abort.value = 1
                if readies == len(procs):
                    started = time.perf_counter()
                    go.set()
            else:
                results[index] = payload
    finally:
        go.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    merged = Result()
    for i in sorted(results):
        merged.merge(results[i])
    missing = len(plans) - len(results)
    if missing:
        merged.connect_errors += sum(pl.connections for j, pl in enumerate(plans)
                                     if j not in results)
        merged.connect_error = merged.connect_error or (
            "1 load process died" if missing == 1 else f"{missing} load processes died")
    return merged
