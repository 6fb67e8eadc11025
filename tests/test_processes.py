"""
C{twistd pfo3 --processes N}: one server on N processes sharing its
listening sockets (L{pfo3.processes}), and its counts added up over them
(L{pfo3.processes.counts}).

The option's validation and the pieces are tested in memory; the rest runs
real C{twistd} processes on real sockets (marked C{integration}).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest
from twisted.python import usage

from pfo3.processes import ChildRole, Supervisor, child_arguments
from pfo3.processes.counts import SharedStats, SnapshotFolder, add_up, counts_as_json
from pfo3.processes.ports import Binder, shareable
from pfo3.service import TaskServerService
from pfo3.stats import Counts
from pfo3.tally import Tally
from pfo3.tap import Options, makeService
from pfo3.testing import FakeReactor, make_server

from .conftest import (
    LineSocket,
    RunningServer,
    TLSFiles,
    free_port,
    server_env,
    start_server,
    twistd_command,
)

integration = pytest.mark.integration


def options(*args: str) -> Options:
    o = Options()
    o.parseOptions(list(args))
    return o


# -- options ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-2"])
def test_processes_below_one_refused(value: str) -> None:
    """
    --processes must be at least 1: 0 or a negative count is a usage error
    that names the option.
    """
    with pytest.raises(usage.UsageError, match="--processes must be at least 1"):
        options("--processes", value)


def test_processes_not_a_number_refused() -> None:
    """
    --processes takes a whole number; anything else is a usage error.
    """
    with pytest.raises(usage.UsageError, match="two"):
        options("--processes", "two")


def test_processes_default_is_one_and_builds_one_server() -> None:
    """
    Without --processes (or with --processes 1) makeService builds the very
    server a single process always ran: a TaskServerService, no supervisor.
    """
    for args in ([], ["--processes", "1"]):
        o = options(*args)
        assert o["processes"] == 1
        assert isinstance(makeService(o), TaskServerService)


def test_processes_builds_a_supervisor_with_the_children_options() -> None:
    """
    With --processes 3 makeService builds the parent: a Supervisor of 3
    children, each given the same options without --processes.
    """
    o = options("--processes=3", "--port", "tcp:0:interface=127.0.0.1", "-w", "2")
    service = makeService(o)
    assert isinstance(service, Supervisor)
    assert service.count == 3
    assert service.arguments == ["--port", "tcp:0:interface=127.0.0.1", "-w", "2"]


@pytest.mark.parametrize("option, description", [
    ("--port", "systemd:domain=INET:index=0"),
    ("--web", "systemd:domain=INET:index=1"),
    ("--metrics", "haproxy:systemd:domain=INET:index=2"),
])
def test_endpoints_that_cannot_be_shared_are_refused(option: str, description: str) -> None:
    """
    With --processes 2, an endpoint whose socket the parent cannot open for
    its children (systemd:, also behind haproxy:) is a usage error naming
    the option and why; one process is not refused for that reason.
    """
    with pytest.raises(usage.UsageError, match=f"{option} .* cannot be shared by --processes"):
        options("--processes", "2", option, description)
    try:
        options(option, description)  # refused, if at all, for another reason
    except usage.UsageError as e:
        assert "--processes" not in str(e)


@pytest.mark.parametrize("description", [
    "tcp:9000", "tcp6:9000", "ssl:9443:privateKey=k.pem", "unix:/tmp/s.sock",
    "haproxy:tcp:9001", "haproxy:ssl:9443", "HAProxy:TCP:9001",
])
def test_shareable_endpoint_kinds(description: str) -> None:
    """
    tcp:, tcp6:, ssl:, unix: and those behind haproxy: are shared.
    """
    assert shareable(description)


def test_child_arguments_strip_both_spellings() -> None:
    """
    A child's options are the parent's with --processes removed, whether
    written as two words or with '='; other options, also ones that merely
    start alike, are kept in order.
    """
    assert child_arguments(["--processes", "4", "-p", "tcp:1", "--processes=2", "-w", "3"]) \
        == ["-p", "tcp:1", "-w", "3"]


def test_help_explains_processes() -> None:
    """
    twistd pfo3 --help documents --processes and what it shares.
    """
    text = str(Options())
    assert "--processes=" in text
    assert "sharing" in text and "docs/processes.md" in text


def test_child_role_round_trips_through_the_environment() -> None:
    """
    What the parent puts in a child's environment is what the child reads
    back; without it a process is no child.
    """
    role = ChildRole(1, 2, [(("tcp", 0, "127.0.0.1"), 4), (("unix", "/tmp/s"), 5)],
                     Path("/tmp/stats"))
    assert ChildRole.from_environment({"PFO3_PROCESS": role.as_environment()}) == role
    assert ChildRole.from_environment({}) is None


# -- opening the sockets ------------------------------------------------------------


@integration
def test_binder_opens_one_reuseport_socket_per_child_on_one_port(tmp_path: Path) -> None:
    """
    The parent opens a TCP endpoint as one listening socket per child, all
    with SO_REUSEPORT on the same port (the one the kernel chose for port
    0), and a UNIX endpoint as one socket they share, with the endpoint's
    mode and lock file; stopping removes the socket file and the lock.
    """
    binder = Binder(3)
    tcp = binder.listenTCP(0, None, 10, "127.0.0.1")  # type: ignore[arg-type]
    ports = {s.getsockname() for s in tcp.sockets}
    assert len(tcp.sockets) == 3 and len(ports) == 1
    assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in tcp.sockets)
    path = tmp_path / "s.sock"
    unix = binder.listenUNIX(str(path), None, mode=0o600, wantPID=1)  # type: ignore[arg-type]
    assert len(unix.sockets) == 1 and unix.for_child(2) is unix.sockets[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (tmp_path / "s.sock.lock").is_symlink()  # lockfile=1, as Twisted locks it
    binder.stop()
    assert not path.exists() and not (tmp_path / "s.sock.lock").exists()
    assert all(s.fileno() == -1 for s in tcp.sockets)


# -- adding up the counts -----------------------------------------------------------


def _counts(tally: Tally, **levels: Any) -> Counts:
    values: Dict[str, Any] = dict(
        in_flight=0, connections=0, threads=4, running=0, abandoned=0, store_pending=0,
        store_dropped=0, draining=False, started=100.0)
    values.update(levels)
    return Counts(tally=tally, **values)


def test_add_up_sums_every_count_exactly() -> None:
    """
    Two processes' snapshots add up: tasks by type and state, errors,
    histogram buckets, durations, levels; the earliest start counts, and
    the recent durations of both feed the percentiles.
    """
    a, b = Tally(), Tally()
    a.ok["uppercase"] += 5
    a.ended("sleep", "ok", 0.2, 110.0)
    a.errors["json_invalido"] += 1
    b.ok["uppercase"] += 7
    b.ended("sleep", "timeout", 30.5, 111.0)
    b.errors["timeout"] += 1
    total = add_up([
        counts_as_json(_counts(a, in_flight=2, connections=3, store_dropped=2), 1, 112.0),
        counts_as_json(_counts(b, in_flight=1, connections=4, started=90.0, store_pending=6,
                               store_dropped=3), 2, 112.0),
    ])
    t = total.tally
    assert t.by_outcome() == {("uppercase", "ok"): 12, ("sleep", "ok"): 1,
                              ("sleep", "timeout"): 1}
    assert t.total() == 14 and dict(t.errors) == {"json_invalido": 1, "timeout": 1}
    assert t.timed == 2 and t.total_seconds == pytest.approx(30.7)
    assert sum(t.buckets) == 2 and t.histogram()[1] == 14
    assert (total.in_flight, total.connections, total.threads) == (3, 7, 8)
    assert (total.store_pending, total.store_dropped) == (6, 5)
    assert total.started == 90.0
    assert t.percentiles(112.0)["tareas"] == 2


def test_shared_stats_answers_for_every_process(tmp_path: Path) -> None:
    """
    op: stats in one process of several reports its own live counts plus
    the last snapshot each other process wrote, says which process answered
    and what each one counted; the other's snapshot is exact once written.
    """
    clock = FakeReactor()
    clock.advance(1000)
    factory = make_server(reactor=clock)
    factory.orchestrator.tally.ok["uppercase"] += 3
    other = Tally()
    other.ok["reverse"] += 4
    SnapshotFolder(tmp_path, 1).write(counts_as_json(_counts(other), 4242, clock.seconds()))
    stats = SharedStats(factory, SnapshotFolder(tmp_path, 0), clock)
    summary = stats.snapshot()
    assert summary["total"] == 7
    assert summary["tareas"] == {"reverse": {"ok": 4}, "uppercase": {"ok": 3}}
    assert summary["proceso"] == os.getpid()
    assert {(p["pid"], p["total"]) for p in summary["procesos"]} == {
        (os.getpid(), 3), (4242, 4)}
    stats.start()
    factory.orchestrator.tally.ok["uppercase"] += 1
    clock.advance(0.5)
    written = json.loads((tmp_path / "0.json").read_text())
    assert written["tally"]["ok"] == {"uppercase": 4}
    stats.stop()


def test_totals_never_go_down_between_processes(tmp_path: Path) -> None:
    """
    Two processes answering in turn never report a smaller total than the
    answer before, even when one counted more since its last periodic
    snapshot: answering writes the answering process's counts first.
    """
    clock = FakeReactor()
    a, b = make_server(reactor=clock), make_server(reactor=clock)
    stats_a = SharedStats(a, SnapshotFolder(tmp_path, 0), clock)
    stats_b = SharedStats(b, SnapshotFolder(tmp_path, 1), clock)
    a.orchestrator.tally.ok["uppercase"] += 3
    stats_a.write()  # a periodic snapshot
    a.orchestrator.tally.ok["uppercase"] += 7
    b.orchestrator.tally.ok["reverse"] += 1
    answers = [stats_a.snapshot()["total"], stats_b.snapshot()["total"]]
    b.orchestrator.tally.ok["reverse"] += 1
    answers += [stats_b.snapshot()["total"], stats_a.snapshot()["total"]]
    assert answers == [10, 11, 12, 12]


# -- real processes --------------------------------------------------------------


def _pids(server: RunningServer, count: int = 2) -> List[int]:
    """
    @return: The children's pids, from the parent's start-up log line.
    """
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = re.search(r"pfo3 started (\d+) processes: ([\d, ]+) \(parent (\d+)\)",
                      server.log.read_text())
        if m:
            assert int(m.group(1)) == count and int(m.group(3)) == server.proc.pid
            return [int(p) for p in m.group(2).split(", ")]
        time.sleep(0.05)
    raise AssertionError(server.log.read_text())


def _gone(pid: int, within: float = 15.0) -> bool:
    """
    @return: Whether process C{pid} exits within C{within} seconds (a
        zombie has exited: reaping it is its parent's business, or init's).
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def _serve_through(connect: Any, n: int = 30) -> Set[int]:
    """
    Open C{n} connections with C{connect}, run a task and C{op: stats} on
    each.

    @return: The pids of the processes that answered.
    """
    served: Set[int] = set()
    socks = [connect() for _ in range(n)]
    for i, c in enumerate(socks):
        c.send_json({"tarea_id": f"t{i}", "tipo": "uppercase", "contenido": "hola"})
        c.send_json({"op": "stats", "tarea_id": f"s{i}"})
    for i, c in enumerate(socks):
        assert c.read_json() == {"estado": "ok", "resultado": "HOLA", "tarea_id": f"t{i}",
                                 "worker": 0}
        served.add(c.read_json()["resultado"]["proceso"])
        c.close()
    return served


def _stats(port: int) -> Dict[str, Any]:
    c = LineSocket(port)
    c.send_json({"op": "stats"})
    summary: Dict[str, Any] = c.read_json()["resultado"]
    c.close()
    return summary


@integration
def test_tcp_tasks_served_by_both_processes(tmp_path: Path) -> None:
    """
    With --processes 2 on a tcp: port the parent starts two children, logs
    their pids, and connections are spread over both: each answers tasks,
    and op: stats says which one did.
    """
    server = start_server(tmp_path, "--processes", "2")
    try:
        pids = _pids(server)
        assert _serve_through(lambda: LineSocket(server.port)) == set(pids)
    finally:
        assert server.stop() == -signal.SIGTERM
    assert all(_gone(pid) for pid in pids)


@integration
def test_children_start_no_children_of_their_own(tmp_path: Path) -> None:
    """
    The option abbreviated as getopt allows (--proc=2), which a child's
    command line still carries, starts two children and no grandchildren.
    """
    server = start_server(tmp_path, "--proc=2")
    try:
        pids = _pids(server)
        assert _serve_through(lambda: LineSocket(server.port)) == set(pids)
        for pid in pids:
            assert Path(f"/proc/{pid}/task/{pid}/children").read_text().split() == []
    finally:
        server.stop()


@integration
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_say_which_process(tmp_path: Path, log_format: str) -> None:
    """
    Every process logs to the parent's standard output in the chosen format,
    and the children's events say which child logged them: a C{pid} field
    in JSON lines, C{pid N} in the system of text lines.
    """
    server = start_server(tmp_path, "--processes", "2", "--log-format", log_format)
    try:
        pids = _pids(server)
        assert _serve_through(lambda: LineSocket(server.port), n=10)
    finally:
        server.stop()
    lines = server.log.read_text().splitlines()
    for pid in pids:
        if log_format == "json":
            events = [json.loads(line) for line in lines]
            mine = [e for e in events if e.get("pid") == pid]
            assert any(e["message"].startswith("pfo3 stopped after") for e in mine)
        else:
            assert any(re.search(rf"\[pfo3#info pid {pid}\] pfo3 stopped after", line)
                       for line in lines)


@integration
def test_ssl_tasks_served_by_both_processes(tmp_path: Path) -> None:
    """
    An ssl: port works with --processes 2, TLS handshakes included, and
    both processes serve it.
    """
    files = TLSFiles(tmp_path)
    port = free_port()
    server = start_server(tmp_path, "--processes", "2", port=port,
                          endpoint=files.endpoint(port))
    ctx = ssl.create_default_context(cafile=str(files.ca))
    try:
        pids = _pids(server)
        assert _serve_through(lambda: LineSocket(port, tls=ctx)) == set(pids)
    finally:
        server.stop()


@integration
def test_tcp6_tasks_served_by_both_processes(tmp_path: Path) -> None:
    """
    A tcp6: port on ::1 works with --processes 2, and both processes serve
    it.
    """
    port = free_port()
    log = tmp_path / "tcp6.log"
    proc = subprocess.Popen(
        twistd_command("--processes", "2", "--port", f"tcp6:{port}:interface=\\:\\:1"),
        cwd=tmp_path, env=server_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = RunningServer(proc, port, log)

    class IPv6Line(LineSocket):
        def __init__(self) -> None:
            self.sock = socket.create_connection(("::1", port), timeout=10)
            self.buf = b""

    try:
        pids = _pids(server)
        assert _serve_through(IPv6Line) == set(pids)
    finally:
        server.stop()


@integration
def test_unix_tasks_served_with_two_processes(tmp_path: Path) -> None:
    """
    A unix: port works with --processes 2: the two processes share one
    socket, which keeps its place and is removed when the server stops.
    """
    path = tmp_path / "pfo3.sock"
    server = start_server(tmp_path, "--processes", "2", unix=path)

    class UnixLine(LineSocket):
        def __init__(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(10)
            self.sock.connect(str(path))
            self.buf = b""

    try:
        pids = _pids(server)
        assert _serve_through(UnixLine, n=10) <= set(pids)
    finally:
        server.stop()
    assert not path.exists()


@integration
def test_haproxy_port_with_two_processes(tmp_path: Path) -> None:
    """
    A haproxy: port works with --processes 2 and keeps its strict PROXY
    header check in every process: a connection with a header is served,
    one without is closed unanswered.
    """
    port = free_port()
    server = start_server(tmp_path, "--processes", "2", port=port,
                          endpoint=f"haproxy:tcp:{port}:interface=127.0.0.1")
    try:
        _pids(server)
        for i in range(6):
            c = LineSocket(port)
            c.send(b"PROXY TCP4 198.51.100.7 127.0.0.1 4000 9000\r\n")
            c.send_json({"tarea_id": f"h{i}", "tipo": "reverse", "contenido": "abc"})
            assert c.read_json()["resultado"] == "cba"
            c.close()
            bare = LineSocket(port)
            bare.send_json({"tipo": "reverse", "contenido": "abc"})
            assert bare.sock.recv(100) == b""
            bare.close()
    finally:
        server.stop()


@integration
def test_proxy_header_before_tls_with_client_certificates(tmp_path: Path) -> None:
    """
    haproxy:ssl: with --tls-client-ca works with --processes 2: after the
    PROXY header in clear, a client presenting a certificate from the CA
    is served by either process; one without a certificate fails the
    handshake.
    """
    files = TLSFiles(tmp_path)
    client = files.client("alice")
    port = free_port()
    server = start_server(tmp_path, "--processes", "2", "--tls-client-ca", str(files.ca_dir),
                          port=port, endpoint="haproxy:" + files.endpoint(port))

    def connect(certificate: bool) -> LineSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 4000 9000\r\n")
        ctx = ssl.create_default_context(cafile=str(files.ca))
        if certificate:
            ctx.load_cert_chain(str(client.cert), str(client.key))
        line = LineSocket.__new__(LineSocket)
        line.sock, line.buf = ctx.wrap_socket(raw, server_hostname="localhost"), b""
        return line

    try:
        pids = _pids(server)
        assert _serve_through(lambda: connect(True)) == set(pids)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            c = connect(False)
            c.send_json({"tipo": "reverse", "contenido": "abc"})
            c.read_json()
    finally:
        server.stop()


@integration
def test_totals_add_up_over_processes(tmp_path: Path) -> None:
    """
    After a load over 20 connections spread on 2 processes settles, op:
    stats (whichever process answers) and /metrics report exactly the tasks
    sent, each process's share adds up to them, and both had a share.
    """
    metrics = free_port()
    server = start_server(tmp_path, "--processes", "2",
                          "--metrics", f"tcp:{metrics}:interface=127.0.0.1")
    try:
        _pids(server)
        socks = [LineSocket(server.port) for _ in range(20)]
        for c in socks:
            c.send(b"".join(json.dumps({"tipo": tipo, "contenido": arg}).encode() + b"\n"
                            for tipo, arg in [("uppercase", "a"), ("reverse", "b"),
                                              ("sleep", 0.01)] * 50))
            c.send(b"not json\n")
        for c in socks:
            assert len(c.read_many(151)) == 151
            c.close()
        time.sleep(1.0)  # every process has written its counts since
        for _ in range(6):
            summary = _stats(server.port)
            assert summary["total"] == 3000
            assert summary["tareas"] == {"uppercase": {"ok": 1000}, "reverse": {"ok": 1000},
                                         "sleep": {"ok": 1000}}
            assert summary["errores"] == {"json_invalido": 20}
            shares = [p["total"] for p in summary["procesos"]]
            assert len(shares) == 2 and sum(shares) == 3000 and min(shares) > 0
        for _ in range(4):
            text = urllib.request.urlopen(
                f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
            tasks = re.findall(r'^pfo3_tasks_total\{estado="ok",tipo="(\w+)"\} (\S+)$', text,
                               re.M)
            assert {t: float(n) for t, n in tasks} == {
                "uppercase": 1000.0, "reverse": 1000.0, "sleep": 1000.0}
            assert re.search(r'^pfo3_errors_total\{codigo="json_invalido"\} 20.0$', text, re.M)
            assert re.search(r"^pfo3_task_duration_seconds_count 3000.0$", text, re.M)
    finally:
        server.stop()


@integration
def test_web_shared_by_processes(tmp_path: Path) -> None:
    """
    --web is shared too: its HTTP API answers tasks with --processes 2.
    """
    web = free_port()
    server = start_server(tmp_path, "--processes", "2", "--web", f"tcp:{web}:interface=127.0.0.1")
    try:
        _pids(server)
        for i in range(4):
            request = urllib.request.Request(
                f"http://127.0.0.1:{web}/tareas", method="POST",
                data=json.dumps({"tarea_id": f"w{i}", "tipo": "1", "contenido": "hola"}).encode())
            reply = json.loads(urllib.request.urlopen(request, timeout=10).read())
            assert reply["resultado"] == "HOLA"
    finally:
        server.stop()


@integration
def test_distributed_mode_gives_each_process_its_reply_queue(tmp_path: Path) -> None:
    """
    In distributed mode with an explicit --name, each of 2 processes gets
    its own reply queue (NAME-0, NAME-1): tasks sent through both processes
    to a real RabbitMQ and a pfo3-worker all come back to the process that
    sent them.
    """
    from .test_distributed import Cluster, _blocking_channel

    _blocking_channel()[0].close()  # fail early if there is no broker
    cluster = Cluster(tmp_path)
    cluster.names += ["op-0", "op-1"]
    try:
        cluster.worker("w1")
        port = cluster.orchestrator("--processes", "2", name="op")
        cluster.wait_log("op.log", "Connected to the broker", count=2)
        served: Set[int] = set()
        socks = [LineSocket(port) for _ in range(30)]
        for i, c in enumerate(socks):
            c.send_json({"tarea_id": f"d{i}", "tipo": "uppercase", "contenido": "hola"})
            c.send_json({"op": "stats", "tarea_id": f"s{i}"})
        for i, c in enumerate(socks):
            replies = {r["tarea_id"]: r for r in c.read_many(2)}
            assert replies[f"d{i}"]["resultado"] == "HOLA"
            served.add(replies[f"s{i}"]["resultado"]["proceso"])
            c.close()
        assert len(served) == 2
    finally:
        cluster.stop()


@integration
def test_sigterm_drains_every_process(tmp_path: Path) -> None:
    """
    SIGTERM to the parent of 2 processes with sleeps in flight on both:
    the ports close at once, every task is answered ok, each connection then
    closes, every process exits, and the parent ends by SIGTERM as a single
    process does.
    """
    server = start_server(tmp_path, "--processes", "2")
    pids = _pids(server)
    socks = [LineSocket(server.port) for _ in range(20)]
    for n, c in enumerate(socks):
        c.send(b"".join(
            json.dumps({"tarea_id": f"{n}-{i}", "tipo": "sleep", "contenido": 1.5}).encode()
            + b"\n" for i in range(10)) + b'{"op": "stats"}\n')
    served = {c.read_json()["resultado"]["proceso"] for c in socks}
    assert served == set(pids)  # both have sleeps in flight
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    for c in socks:
        replies = c.read_many(10)
        assert all(r["estado"] == "ok" for r in replies)
        assert c.sock.recv(10) == b""
        c.close()
    assert server.proc.wait(15) == -signal.SIGTERM
    assert all(_gone(pid) for pid in pids)
    log = server.log.read_text()
    assert log.count("pfo3 stopped after") == 2
    assert "pfo3 stopped: all 2 processes exited" in log and "Traceback" not in log


@integration
def test_second_sigterm_cancels_in_every_process(tmp_path: Path) -> None:
    """
    A second SIGTERM to the parent while its 2 processes drain cancels their
    tasks in flight at once (apagando), as with one process.
    """
    server = start_server(tmp_path, "--processes", "2")
    pids = _pids(server)
    socks = [LineSocket(server.port) for _ in range(10)]
    for c in socks:
        c.send(b'{"tipo": "sleep", "contenido": 20}\n{"op": "stats"}\n')
    assert {c.read_json()["resultado"]["proceso"] for c in socks} == set(pids)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    for c in socks:
        assert c.read_json()["codigo"] == "apagando"
        c.close()
    assert server.proc.wait(15) == -signal.SIGTERM
    assert time.monotonic() - started < 8
    assert all(_gone(pid) for pid in pids)


@integration
def test_ctrl_c_to_the_group_drains_without_cancelling(tmp_path: Path) -> None:
    """
    Ctrl-C in a terminal sends SIGINT to every process of the group: the
    children leave it to the parent, which drains them once, so the tasks in
    flight are answered ok rather than cancelled.
    """
    port = free_port()
    log = tmp_path / "group.log"
    proc = subprocess.Popen(
        twistd_command("--processes", "2", "--port", f"tcp:{port}:interface=127.0.0.1"),
        cwd=tmp_path, env=server_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    server = RunningServer(proc, port, log)
    try:
        pids = _pids(server)
        socks = [LineSocket(port) for _ in range(10)]
        for c in socks:
            c.send(b'{"tipo": "sleep", "contenido": 1.5}\n{"op": "stats"}\n')
        assert {c.read_json()["resultado"]["proceso"] for c in socks} == set(pids)
        os.killpg(proc.pid, signal.SIGINT)
        for c in socks:
            assert c.read_json()["estado"] == "ok"
            c.close()
        assert proc.wait(15) == -signal.SIGINT
        assert all(_gone(pid) for pid in pids)
    finally:
        server.stop()


@integration
def test_children_do_not_outlive_a_killed_parent(tmp_path: Path) -> None:
    """
    When the parent is killed (SIGKILL: no chance to stop anything), its
    children notice and exit, and the last one removes the folder of
    counts that the parent would have removed.
    """
    port = free_port()
    log = tmp_path / "orphans.log"
    (tmp_path / "tmp").mkdir()
    env = server_env()
    env["TMPDIR"] = str(tmp_path / "tmp")
    proc = subprocess.Popen(
        twistd_command("--processes", "2", "--port", f"tcp:{port}:interface=127.0.0.1"),
        cwd=tmp_path, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = RunningServer(proc, port, log)
    try:
        pids = _pids(server)
        assert _serve_through(lambda: LineSocket(port), n=20) == set(pids)
        assert len(list((tmp_path / "tmp").glob("pfo3-stats-*"))) == 1
        proc.kill()
        proc.wait(5)
        assert all(_gone(pid) for pid in pids), log.read_text()
    finally:
        server.stop()
    assert log.read_text().count("the parent process is gone") == 2, log.read_text()
    assert list((tmp_path / "tmp").iterdir()) == [], log.read_text()


@integration
def test_a_child_dying_stops_the_server_with_failure(tmp_path: Path) -> None:
    """
    A child that dies unexpectedly is logged; the parent stops the other
    one (draining it) and exits with status 1.
    """
    server = start_server(tmp_path, "--processes", "2")
    pids = _pids(server)
    os.kill(pids[0], signal.SIGKILL)
    assert server.proc.wait(15) == 1
    assert all(_gone(pid) for pid in pids)
    log = server.log.read_text()
    assert f"pfo3 process {pids[0]} ended unexpectedly (signal 9)" in log
    assert "pfo3 stopped: a process failed" in log


@integration
def test_one_process_has_no_children(tmp_path: Path) -> None:
    """
    With --processes 1 the process tree is as it always was: twistd serves
    by itself and starts no other process.
    """
    server = start_server(tmp_path, "--processes", "1")
    try:
        c = LineSocket(server.port)
        c.send_json({"op": "stats"})
        summary = c.read_json()["resultado"]
        assert "procesos" not in summary and "proceso" not in summary
        c.close()
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
        assert children.read_text().split() == []
    finally:
        server.stop()


@integration
def test_port_in_use_is_refused_before_any_child_starts(tmp_path: Path) -> None:
    """
    A port in use stops the parent at start, with the error, before it
    runs any child, as it stops a single process: even when the program
    holding it set SO_REUSEPORT, the server does not join its group.
    """
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "refused.log"
        proc = subprocess.run(
            twistd_command("--processes", "2", "--port", f"tcp:{port}:interface=127.0.0.1"),
            cwd=tmp_path, env=server_env(), stdout=log.open("wb"),
            stderr=subprocess.STDOUT, timeout=30)
    assert proc.returncode != 0
    text = log.read_text()
    assert "Address already in use" in text and "pfo3 started" not in text
