"""
The live fuzz run: mutated and random lines against a real C{twistd pfo3}
over TCP, TLS and a C{haproxy:} (PROXY protocol) endpoint.

Each connection carries a batch of lines: valid requests, requests with a
field mutated or of the wrong type, huge numbers, deep nesting, invalid
UTF-8, lone surrogates, non-objects, random bytes, blank and over-long
lines.  Most batches are written whole and the connection half-closed (over
TLS, which has no half-close, the client reads until it has every reply);
some are written a byte at a time; some connections are dropped in the
middle of a line, by a close or a reset.  Every complete line that is not
blank must get exactly one reply, valid UTF-8 JSON with a documented
C{estado} and C{codigo}.  Afterwards the server must answer a ping at once,
hold as many file descriptors as before, be back near its resident memory
of before, and have logged no traceback.
"""

from __future__ import annotations

import json
import random
import socket
import ssl
import struct
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from pfo3.chaos._process import (
    BROKER,
    Process,
    ThrowawayCA,
    delete_broker_objects,
    free_port,
)
from pfo3.errors import ERROR_CODES

#: The server's --max-line in a fuzz run: small enough that an over-long
#: line is cheap to send, large enough for deep nesting.
MAX_LINE = 65536

#: The server's --timeout: a fuzzed C{sleep} runs for less than this.
TIMEOUT = 0.5

TEXTS = ["hola mundo", "", " ", "ñandú café", "日本語のテキスト", "a b  c\td", "x" * 300,
         "emoji 😀 ok", "\u0000nul", "\\", "\"quoted\"", "línea\r", "\u2028sep"]
TIPOS: List[Any] = ["uppercase", "reverse", "word_count", "1", "2", "3", 1, 2, 3, "mayus",
                    " Invertir ", "contar"]
WRONG: List[Any] = [None, True, False, 0, -1, 3.5, "", " ", [], {}, [1, [2]], {"a": {}},
                    "sleep", "zzz", 10**20, -(10**20), 1e300, -0.0, "\ud800", "NaN",
                    "estado", "ping", ["uppercase"], "9" * 40]
FIELDS = ["tarea_id", "tipo", "contenido", "esperar", "op"]
BAD_UTF8 = [b"\xff", b"\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xe2\x82",
            b"\xf4\x90\x80\x80", b"\x80", b"\xf8\x88\x80\x80\x80"]
SURROGATES = ["\\ud800", "\\udfff", "\\ud83d", "\\ude00\\ud83d", "a\\udbffb"]
OTHER_JSON = [b"[]", b"[1,2,3]", b'"hola"', b"42", b"null", b"true", b"NaN", b"Infinity",
              b"-Infinity", b"1e999", b"{}", b'{"op"}', b"{,}", b'{"a":1,}', b"{'a': 1}"]
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _blank(line: bytes) -> bool:
    """
    Whether the server skips a line without a reply (as C{pfo3.protocol}
    decides): empty or all ASCII whitespace once a trailing C{\\r} goes.
    """
    if line[-1:] == b"\r":
        line = line[:-1]
    return not line or line.isspace()


class LineMaker:
    """
    Makes fuzz lines (without their C{\\n}) from a seeded random source.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.kinds: List[Tuple[str, Callable[[], bytes], int]] = [
            ("valid", self.valid, 20), ("field", self.field, 20), ("huge", self.huge, 5),
            ("nesting", self.nesting, 3), ("utf8", self.utf8, 8),
            ("surrogate", self.surrogate, 5), ("mutated", self.mutated, 15),
            ("random", self.random_bytes, 8), ("not_object", self.not_object, 5),
            ("blank", self.blank, 3),
        ]
        self._weights = [w for _, _, w in self.kinds]

    def make(self) -> Tuple[str, bytes]:
        """
        @return: A kind of line and the line.
        """
        name, make, _ = self.rng.choices(self.kinds, self._weights)[0]
        line = make()
        if self.rng.random() < 0.1:
            line += b"\r"
        return name, line

    def _id(self) -> str:
        return f"f{self.rng.getrandbits(48):x}"

    def _request(self) -> Dict[str, Any]:
        rng = self.rng
        r = rng.random()
        if r < 0.08:
            return {"op": rng.choice(["ping", "tipos"]), "tarea_id": self._id()}
        if r < 0.14:
            return {"op": "estado", "tarea_id": self._id()}
        req: Dict[str, Any] = {"tarea_id": self._id(), "tipo": rng.choice(TIPOS),
                               "contenido": rng.choice(TEXTS)}
        if r < 0.2:
            req["tipo"], req["contenido"] = rng.choice([4, "sleep", "espera"]), rng.choice(
                [0, 0.001, "0.01", 0.02])
        if rng.random() < 0.1:
            req["esperar"] = rng.random() < 0.5
        if rng.random() < 0.1:
            del req["tarea_id"]
        return req

    def _dump(self, obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=self.rng.random() < 0.5).encode(
            "utf-8", "backslashreplace")

    def valid(self) -> bytes:
        return self._dump(self._request())

    def field(self) -> bytes:
        req = self._request()
        rng = self.rng
        name = rng.choice(FIELDS + ["extra"])
        if rng.random() < 0.15:
            req.pop(name, None)
        else:
            req[name] = rng.choice(WRONG + [self._request(), rng.random() * 1e6])
        return self._dump(req)

    def huge(self) -> bytes:
        rng = self.rng
        digits = rng.choice([20, 400, 4300, 4301, 6000])
        number = (b"-" if rng.random() < 0.3 else b"") + b"9" * digits
        number = rng.choice([number, number + b".5", b"1e400", b"-1e400", b"1e-400",
                             b"0." + b"0" * digits + b"1"])
        name = rng.choice(FIELDS).encode()
        return b'{"tarea_id": "' + self._id().encode() + b'", "tipo": 4, "' + name + b'": ' \
            + number + b"}"

    def nesting(self) -> bytes:
        rng = self.rng
        depth = rng.choice([10, 100, 999, 1000, 5000, 30000])
        opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        close = closer * depth if rng.random() < 0.7 else b""
        return b'{"tipo": "1", "contenido": ' + opener * depth + b"1" + close + b"}"

    def utf8(self) -> bytes:
        line = bytearray(self.valid())
        for _ in range(self.rng.randint(1, 3)):
            at = self.rng.randrange(len(line) + 1)
            line[at:at] = self.rng.choice(BAD_UTF8)
        return bytes(line)

    def surrogate(self) -> bytes:
        s = self.rng.choice(SURROGATES)
        where = self.rng.choice(["tarea_id", "contenido", "tipo", "op"])
        req = self._request()
        req.pop("op", None)
        text = self._dump(req).decode()
        return (text[:-1] + f', "{where}": "{s}"' + "}").encode()

    def mutated(self) -> bytes:
        line = bytearray(self.valid())
        for _ in range(self.rng.randint(1, 4)):
            if not line:
                break
            at = self.rng.randrange(len(line))
            op = self.rng.random()
            if op < 0.4:
                line[at] = self.rng.randrange(256)
            elif op < 0.7:
                del line[at]
            elif op < 0.9:
                line[at:at] = bytes([self.rng.randrange(256)])
            else:
                del line[at:]
        return bytes(line).replace(b"\n", b"")

    def random_bytes(self) -> bytes:
        n = self.rng.randint(1, 200)
        return self.rng.randbytes(n).replace(b"\n", b"")

    def not_object(self) -> bytes:
        return self.rng.choice(OTHER_JSON)

    def blank(self) -> bytes:
        return self.rng.choice([b"", b" ", b"\t", b"   \t ", b"\r"])

    def too_long(self) -> bytes:
        return b'{"tipo": 1, "contenido": "' + b"y" * (MAX_LINE + 10) + b'"}'


def proxy_header(rng: random.Random, valid: bool) -> bytes:
    """
    A PROXY protocol header, version 1 or 2, or (when not C{valid}) one
    that is broken in some way.
    """
    src = bytes([10, rng.randrange(256), rng.randrange(256), rng.randrange(1, 255)])
    sport, dport = rng.randrange(1024, 65536), 9000
    kind = rng.choice(["v1", "v1-6", "v2", "v2-local"])
    if kind == "v1":
        header = b"PROXY TCP4 %s 127.0.0.1 %d %d\r\n" % (
            socket.inet_ntoa(src).encode(), sport, dport)
    elif kind == "v1-6":
        header = b"PROXY TCP6 fd00::%x ::1 %d %d\r\n" % (rng.randrange(65536), sport, dport)
    elif kind == "v2":
        addr = src + socket.inet_aton("127.0.0.1") + struct.pack("!HH", sport, dport)
        header = V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addr)) + addr
    else:
        header = V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    if valid:
        return header
    broken = rng.choice(["garbage", "truncated", "flipped", "json-first"])
    if broken == "garbage":
        return rng.randbytes(rng.randint(1, 40)).replace(b"\n", b"") + b"\r\n"
    if broken == "truncated":
        return header[: rng.randrange(1, len(header))]
    if broken == "flipped":
        b = bytearray(header)
        b[rng.randrange(len(b))] ^= 0xFF
        return bytes(b)
    return b'{"op": "ping"}\n'


@dataclass
class Tally:
    """
    What a set of connections sent and got back.
    """

    lines: int = 0
    bytes: int = 0
    #: Complete non-blank lines on connections read to the end, and the
    #: replies they got.
    expected: int = 0
    replied: int = 0
    connections: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    transports: Counter[str] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    problems: List[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.lines += other.lines
        self.bytes += other.bytes
        self.expected += other.expected
        self.replied += other.replied
        self.connections += other.connections
        self.kinds.update(other.kinds)
        self.replies.update(other.replies)
        self.transports.update(other.transports)
        self.modes.update(other.modes)
        self.closes.update(other.closes)
        self.problems.extend(other.problems)


@dataclass
class Target:
    """
    Where the server listens.
    """

    tcp: int
    tls: int
    proxy: int
    ca: Path


def _connect(target: Target, transport: str, timeout: float) -> socket.socket:
    port = {"tcp": target.tcp, "tls": target.tls, "proxy": target.proxy}[transport]
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if transport == "tls":
        ctx = ssl.create_default_context(cafile=str(target.ca))
        return ctx.wrap_socket(sock, server_hostname="localhost")
    return sock


def _read(sock: socket.socket, want: Optional[int], deadline: float) -> Tuple[bytes, str]:
    """
    Read until C{want} lines have come (C{None}: until the server closes).

    @return: What was read, and how the reading ended: C{"eof"},
        C{"reset"}, C{"timeout"} or C{"enough"}.
    """
    data = b""
    end = time.monotonic() + deadline
    while want is None or data.count(b"\n") < want:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return data, "timeout"
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return data, "reset"
        if not chunk:
            return data, "eof"
        data += chunk
    return data, "enough"


def _read_until(sock: socket.socket, marker: bytes, deadline: float) -> Tuple[bytes, str]:
    """
    Read until a complete line holding C{marker} has come.

    @return: What was read, and how the reading ended (as L{_read}).
    """
    data = b""
    while True:
        more, how = _read(sock, data.count(b"\n") + 1, deadline)
        data += more
        if how != "enough" or any(marker in x for x in data.split(b"\n")[:-1]):
            return data, how


def _check_ids(data: bytes, lines: List[bytes], tally: Tally, where: str,
               sentinel: str) -> None:
    """
    Note a C{tarea_id} answered more often than the lines sent could name
    it (once, for an id the server made up): an extra reply that a count
    alone could hide behind a missing one.
    """
    seen: Counter[str] = Counter()
    for raw in data.split(b"\n")[:-1]:
        try:
            tarea_id = json.loads(raw).get("tarea_id")
        except (ValueError, AttributeError):
            continue
        if isinstance(tarea_id, str):
            seen[tarea_id] += 1
    for tarea_id, n in seen.items():
        if n == 1:
            continue
        # As the lines may write it: a JSON string, escaped or not.
        forms = {json.dumps(tarea_id, ensure_ascii=False).encode("utf-8", "backslashreplace"),
                 json.dumps(tarea_id).encode()}
        named = 1 if tarea_id == sentinel else sum(
            1 for x in lines if any(f in x for f in forms))
        if n > max(named, 1):
            tally.problems.append(
                f"{where}: {tarea_id!r} answered {n} times, named by {named} lines")


def _check_replies(data: bytes, tally: Tally, where: str) -> int:
    """
    Count the replies by code; note any that is not a documented reply.

    @return: How many complete reply lines there were.
    """
    lines = data.split(b"\n")
    if lines[-1]:
        tally.problems.append(f"{where}: a reply without its newline: {lines[-1][:80]!r}")
    n = 0
    for raw in lines[:-1]:
        n += 1
        try:
            reply = json.loads(raw.decode("utf-8"))
            estado = reply["estado"]
        except (ValueError, KeyError, TypeError):
            tally.problems.append(f"{where}: not a reply: {raw[:120]!r}")
            continue
        if estado == "error":
            codigo = reply.get("codigo")
            if codigo not in ERROR_CODES or not reply.get("mensaje"):
                tally.problems.append(f"{where}: undocumented error: {raw[:160]!r}")
            if codigo == "error_interno":
                tally.problems.append(f"{where}: internal error: {raw[:160]!r}")
            tally.replies[str(codigo)] += 1
        elif estado in ("ok", "aceptada"):
            tally.replies[estado] += 1
        else:
            tally.problems.append(f"{where}: unknown estado: {raw[:120]!r}")
    return n


def run_connection(target: Target, seed: int, size: int) -> Tally:
    """
    One fuzzed connection.  Its transport, its way of writing and its lines
    all come from C{seed}, so a failing connection can be replayed.
    """
    rng = random.Random(seed)
    maker = LineMaker(rng)
    tally = Tally(connections=1)
    transport = rng.choices(["tcp", "tls", "proxy"], [6, 2, 2])[0]
    mode = rng.choices(["batch", "trickle", "drop", "reset"], [88, 3, 5, 4])[0]
    tally.transports[transport] += 1
    tally.modes[mode] += 1
    where = f"seed {seed} ({transport}, {mode})"
    made = [maker.make() for _ in range(size)]
    if rng.random() < 0.01:
        made.append(("too_long", maker.too_long()))
    lines = [line for _, line in made]
    expected = sum(1 for x in lines if not _blank(x))
    payload = b"".join(x + b"\n" for x in lines)
    header = b""
    bad_header = False
    if transport == "proxy":
        bad_header = rng.random() < 0.05
        header = proxy_header(rng, valid=not bad_header)
    if mode in ("drop", "reset"):
        cut = rng.randrange(1, len(payload)) if len(payload) > 1 else 1
        payload = payload[:cut]
        if payload.endswith(b"\n"):
            payload += b'{"tipo": "1", "conte'

    def written(data: bytes) -> None:
        # Count what went out whole: the complete lines of C{data}, which
        # are the first lines of the batch, and their kinds.
        n = data.count(b"\n")
        tally.lines += n
        tally.kinds.update(kind for kind, _ in made[:n])
        tally.bytes += len(data)

    try:
        sock = _connect(target, transport, 20.0)
    except (OSError, ssl.SSLError) as e:
        tally.problems.append(f"{where}: cannot connect: {e}")
        return tally
    try:
        if header:
            sock.sendall(header)
            tally.bytes += len(header)
            if bad_header:
                # A header cut short may be waiting for its end: end the
                # input, after which the server must close at once.  The
                # batch is not sent: it counts for nothing.
                sock.shutdown(socket.SHUT_WR)
                data, how = _read(sock, None, 10.0)
                tally.closes[f"bad PROXY header: closed by the server ({how})"] += 1
                if data:
                    tally.problems.append(f"{where}: a reply to a bad PROXY header: {data!r}")
                return tally
        if mode == "trickle":
            # The first few lines a byte at a time, the rest at once.
            slow = len(b"".join(x + b"\n" for x in lines[:4]))
            for i in range(slow):
                sock.sendall(payload[i:i + 1])
            sock.sendall(payload[slow:])
        else:
            sock.sendall(payload)
        written(payload)
        if mode in ("drop", "reset"):
            if mode == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            tally.closes[f"dropped by the client mid-line ({mode})"] += 1
            return tally
        sentinel = f"fin-{seed}"
        if transport == "tls":
            # TLS has no half-close: after the expected replies, a ping
            # with an id of its own, and everything up to its pong.  An
            # extra reply shows as one line too many before it.
            data, how = _read(sock, expected, 20.0)
            sock.sendall(b'{"op": "ping", "tarea_id": "%s"}\n' % sentinel.encode())
            more, how = _read_until(sock, sentinel.encode(), 10.0)
            data += more
            mark = b'"tarea_id": "%s"' % sentinel.encode()
            kept = [x for x in data.split(b"\n") if mark not in x]
            if data.count(b"\n") - len(kept) + 1 != 1:
                tally.problems.append(f"{where}: the closing ping was not answered once")
            data = b"\n".join(kept)
        else:
            sock.shutdown(socket.SHUT_WR)
            data, how = _read(sock, None, 20.0)
        got = _check_replies(data, tally, where)
        tally.replied += got
        tally.expected += expected
        if got != expected:
            tally.problems.append(f"{where}: {expected} lines, {got} replies ({how})")
        _check_ids(data, lines, tally, where, sentinel)
        if transport == "tls":
            tally.closes["TLS: closed by the client once every reply came"] += 1
        elif how == "eof":
            tally.closes["closed by the server after the end of input, all answered"] += 1
        else:
            tally.closes[f"connection ended: {how}"] += 1
    except (OSError, ssl.SSLError) as e:
        tally.problems.append(f"{where}: {type(e).__name__}: {e}")
    finally:
        sock.close()
    return tally


def probe(target: Target) -> float:
    """
    Ask a fresh TCP connection for real work: an C{uppercase}, a C{sleep}
    of 0 seconds (through the reactor's timers) and a ping.

    @return: Seconds until all three were answered, each once, rightly.
    @raise RuntimeError: on any other answer.
    """
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", target.tcp), timeout=5) as sock:
        sock.sendall(b'{"tarea_id": "probe-u", "tipo": "uppercase", "contenido": "vivo"}\n'
                     b'{"tarea_id": "probe-s", "tipo": "sleep", "contenido": 0}\n'
                     b'{"op": "ping", "tarea_id": "probe-p"}\n')
        sock.shutdown(socket.SHUT_WR)
        data, how = _read(sock, None, 5.0)
    replies = {}
    for raw in data.split(b"\n")[:-1]:
        reply = json.loads(raw)
        if reply.get("tarea_id") in replies:
            raise RuntimeError(f"answered twice: {reply!r}")
        replies[reply.get("tarea_id")] = reply
    want = {"probe-u": "VIVO", "probe-p": "pong"}
    if (set(replies) != {"probe-u", "probe-s", "probe-p"}
            or any(replies[k].get("resultado") != v for k, v in want.items())
            or replies["probe-s"].get("estado") != "ok"):
        raise RuntimeError(f"a valid request answered wrongly ({how}): {data[:600]!r}")
    return time.monotonic() - started


def start_server(workdir: Path, broker: Optional[str] = None) -> Tuple[Process, Target]:
    """
    Start a C{twistd pfo3} listening on TCP, TLS and PROXY-protocol TCP.

    @param broker: A queue prefix: run in distributed mode on that prefix
        (a worker must consume from it).
    """
    ca = ThrowawayCA(workdir)
    target = Target(free_port(), free_port(), free_port(), ca.ca)
    extra = [] if broker is None else [
        "--broker", BROKER, "--broker-prefix", broker, "--name", "o1"]
    proc = Process(workdir, "pfo3-fuzz", "pfo3", [
        "--port", f"tcp:{target.tcp}:interface=127.0.0.1",
        "--port", ca.endpoint(target.tls),
        "--port", f"haproxy:tcp:{target.proxy}:interface=127.0.0.1",
        "--timeout", str(TIMEOUT), "--max-line", str(MAX_LINE),
        "--store-max-records", "2000", "--workers", "2", *extra,
    ], wait_port=target.tcp, wait_log=None if broker is None else "Connected to the broker")
    return proc, target


def _settle(read: Callable[[], int], want: int, deadline: float) -> int:
    end = time.monotonic() + deadline
    value = read()
    while value > want and time.monotonic() < end:
        time.sleep(0.1)
        value = read()
    return value


def fuzz(lines: int = 100_000, seed: int = 1, concurrency: int = 6, batch: int = 200,
         rss_slack_kib: int = 32 * 1024, rss_growth_kib: int = 6 * 1024,
         workdir: Optional[Path] = None, broker: bool = False) -> Dict[str, Any]:
    """
    Run the fuzz against a server of its own: two equal passes of at least
    C{lines} lines sent each.

    @param rss_slack_kib: How far over its baseline (after a warm-up) the
        server's resident memory may be after the first pass, which grows
        the heap once.
    @param rss_growth_kib: How much more it may grow in the second pass;
        if it grows more, a third pass runs, and the run fails only if that
        one grows it by more again: a leak per request grows the heap on
        every pass, the allocator settling does not.
    @param broker: Run the server in distributed mode, with one
        C{pfo3-worker}, on RabbitMQ (L{BROKER}); the worker's log must hold
        no traceback either.
    @return: The figures, with C{"ok"} telling whether every check passed
        and C{"problems"} what failed.
    """
    with tempfile.TemporaryDirectory(prefix="pfo3-fuzz-") as tmp:
        directory = workdir or Path(tmp)
        prefix = f"pfo3fuzz{uuid.uuid4().hex[:8]}" if broker else None
        worker = None
        try:
            if prefix is not None:
                worker = Process(directory, "w1", "pfo3-worker", [
                    "--broker", BROKER, "--broker-prefix", prefix, "--name", "w1",
                    "--timeout", str(TIMEOUT)], wait_log="Connected to the broker")
            proc, target = start_server(directory, prefix)
            try:
                figures = _fuzz(proc, target, lines, seed, concurrency, batch, rss_slack_kib,
                                rss_growth_kib)
            finally:
                proc.stop()
            figures["mode"] = "distributed" if broker else "local"
            if worker is not None and worker.tracebacks():
                figures["ok"] = False
                figures["problems"].append(
                    f"tracebacks in the worker's log: {worker.tracebacks()[:3]}")
            return figures
        finally:
            if worker is not None:
                worker.stop()
            if prefix is not None:
                delete_broker_objects(prefix, ["o1"])


def run_pass(target: Target, lines: int, seed: int, concurrency: int, batch: int) -> Tally:
    """
    Fuzzed connections, C{concurrency} at a time, until at least C{lines}
    lines have been sent.
    """
    tally = Tally()
    lock = threading.Lock()
    count = [0]

    def worker() -> None:
        while True:
            with lock:
                if tally.lines >= lines:
                    return
                i = count[0]
                count[0] += 1
            t = run_connection(target, seed * 1_000_003 + i, batch)
            with lock:
                tally.add(t)

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return tally


def _fuzz(proc: Process, target: Target, lines: int, seed: int, concurrency: int,
          batch: int, rss_slack_kib: int, rss_growth_kib: int) -> Dict[str, Any]:
    # Warm up with valid traffic on every transport, so that the baseline
    # counts what any server holds once it has served (caches, TLS context).
    warm = Tally()
    for i in range(30):
        rng = random.Random(-i)
        maker = LineMaker(rng)
        s = _connect(target, ["tcp", "tls"][i % 2], 10)
        s.sendall(b"".join(maker.valid() + b"\n" for _ in range(50)))
        data, _ = _read(s, 50, 10)
        _check_replies(data, warm, "warm-up")
        s.close()
    time.sleep(0.5)
    rss_before, fds_before = proc.rss_kib(), proc.fd_count()
    problems = list(warm.problems)
    started = time.monotonic()
    tally = run_pass(target, lines, seed, concurrency, batch)
    elapsed = time.monotonic() - started
    rss_first = _settle(proc.rss_kib, rss_before + rss_slack_kib, 5.0)
    # The same pass again: the heap has grown to what it needs, so what
    # it grows now is kept per request.
    second = run_pass(target, lines, seed, concurrency, batch)
    rss_after = _settle(proc.rss_kib, rss_first + rss_growth_kib, 5.0)
    passes = [tally, second]
    rss_third: Optional[int] = None
    if rss_after > rss_first + rss_growth_kib:
        # The allocator may still be settling (arenas, fragments of the
        # huge lines): growth once more is no proof.  A leak per request
        # grows the heap on every pass; a third one tells them apart.
        third = run_pass(target, lines, seed, concurrency, batch)
        passes.append(third)
        rss_third = _settle(proc.rss_kib, rss_after + rss_growth_kib, 5.0)
    for t in passes:
        problems += t.problems
    try:
        probe_s: Optional[float] = probe(target)
    except (OSError, ValueError, RuntimeError) as e:
        probe_s = None
        problems.append(f"afterwards, a valid request: {e}")
    fds_after = _settle(proc.fd_count, fds_before, 10.0)
    tracebacks = proc.tracebacks()
    for t in passes:
        if sum(t.kinds.values()) != t.lines:
            problems.append(f"lines by kind add up to {sum(t.kinds.values())}, "
                            f"not to the {t.lines} lines sent")
        if t.lines < lines:
            problems.append(f"a pass sent {t.lines} lines, fewer than {lines}")
    if probe_s is not None and probe_s > 1.0:
        problems.append(f"the server took {probe_s:.2f}s to answer valid requests afterwards")
    if fds_after > fds_before:
        problems.append(f"file descriptors: {fds_before} before, {fds_after} after")
    if rss_first > rss_before + rss_slack_kib:
        problems.append(f"resident memory: {rss_before} KiB before, {rss_first} KiB after "
                        f"the first pass (more than {rss_slack_kib} KiB over)")
    if rss_third is not None and rss_third > rss_after + rss_growth_kib:
        problems.append(f"resident memory grew in the second and the third pass: {rss_first} "
                        f"-> {rss_after} -> {rss_third} KiB (more than {rss_growth_kib} KiB "
                        "each time): a leak per request")
    if tracebacks:
        problems.append(f"{len(tracebacks)} traceback lines in the log: {tracebacks[:3]}")
    if not proc.alive():
        problems.append("the server died")
    return {
        "ok": not problems, "seed": seed, "lines": tally.lines, "bytes": tally.bytes,
        "connections": tally.connections, "seconds": round(elapsed, 2),
        "lines_per_second": round(tally.lines / elapsed) if elapsed else 0,
        "expected_replies": tally.expected, "replied": tally.replied,
        "kinds": dict(tally.kinds.most_common()),
        "replies": dict(tally.replies.most_common()),
        "transports": dict(tally.transports.most_common()),
        "modes": dict(tally.modes.most_common()),
        "closes": dict(tally.closes.most_common()),
        "second_pass": {"lines": second.lines, "replied": second.replied,
                        "expected_replies": second.expected},
        "probe_seconds": None if probe_s is None else round(probe_s, 4),
        "rss_kib": {"before": rss_before, "first_pass": rss_first, "after": rss_after,
                    "third_pass": rss_third},
        "fds": {"before": fds_before, "after": fds_after},
        "tracebacks": len(tracebacks), "problems": problems[:50],
    }


def report(figures: Dict[str, Any]) -> str:
    """
    @return: The figures of a fuzz run, for people.
    """
    probe_s = figures["probe_seconds"]
    rss = figures["rss_kib"]
    out = [
        f"fuzz ({figures.get('mode', 'local')} mode): {figures['lines']} lines sent "
        f"({figures['bytes']} bytes) on "
        f"{figures['connections']} connections in {figures['seconds']} s "
        f"({figures['lines_per_second']} lines/s), seed {figures['seed']}",
        "  transports: " + ", ".join(f"{k} {v}" for k, v in figures["transports"].items()),
        "  writes: " + ", ".join(f"{k} {v}" for k, v in figures["modes"].items()),
        "  lines sent by kind: " + ", ".join(f"{k} {v}" for k, v in figures["kinds"].items()),
        f"  replies by code (to the {figures['expected_replies']} complete non-blank lines "
        "of the connections read to the end):",
        *(f"    {k:<24} {v}" for k, v in figures["replies"].items()),
        f"    {'(total)':<24} {sum(figures['replies'].values())}",
        "  connections ended:",
        *(f"    {v:>6}  {k}" for k, v in figures["closes"].items()),
        f"  second, equal pass: {figures['second_pass']['lines']} lines sent, "
        f"{figures['second_pass']['replied']} replies of "
        f"{figures['second_pass']['expected_replies']} expected",
        "  afterwards: uppercase, sleep 0 and ping answered in "
        + ("(failed)" if probe_s is None else f"{probe_s * 1000:.1f} ms")
        + f"; RSS {rss['before']} -> {rss['first_pass']} (first pass) -> {rss['after']} KiB "
        "(second pass)"
        + ("" if rss.get("third_pass") is None
           else f" -> {rss['third_pass']} KiB (a third pass, the second having grown it)")
        + f"; fds {figures['fds']['before']} -> {figures['fds']['after']}; "
        f"tracebacks in the log: {figures['tracebacks']}",
    ]
    if figures["problems"]:
        out.append("PROBLEMS:")
        out.extend(f"  {p}" for p in figures["problems"])
    out.append("fuzz: " + ("PASS" if figures["ok"] else "FAIL"))
    return "\n".join(out)
