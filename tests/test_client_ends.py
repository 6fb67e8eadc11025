"""
Integration tests: a real C{twistd pfo3} and the ways a client ends its side
of a connection (half-close with C{shutdown(SHUT_WR)} or C{nc -N}), and
the ways the server ends it (SIGTERM on TCP and TLS, a second SIGTERM).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from .conftest import RunningServer, TLSFiles, free_port, read_to_end, start_server

pytestmark = pytest.mark.integration

#: One task of each kind the server runs: inline (or on the pool with
#: --no-inline), a timer, and a control request; the sleep finishes last.
REQUESTS = [
    {"tarea_id": "s", "tipo": "sleep", "contenido": 0.3},
    {"tarea_id": "u", "tipo": "uppercase", "contenido": "hola"},
    {"tarea_id": "r", "tipo": "reverse", "contenido": "abc"},
    {"op": "ping", "tarea_id": "p"},
]
EXPECTED = {"s": "Esperé 0.3 segundos", "u": "HOLA", "r": "cba", "p": "pong"}
PIPED = b"".join(json.dumps(r).encode() + b"\n" for r in REQUESTS)


def results(data: bytes) -> Dict[str, Any]:
    assert data.endswith(b"\n"), data
    return {r["tarea_id"]: r.get("resultado", r.get("codigo")) for r in map(
        json.loads, data.splitlines())}


@pytest.fixture(params=["inline", "pool"])
def server(request: Any, tmp_path: Path) -> Iterator[RunningServer]:
    """
    A real server running the text tasks inline, or on its thread pool.
    """
    extra = ["--no-inline"] if request.param == "pool" else []
    running = start_server(tmp_path, *extra)
    try:
        yield running
    finally:
        running.stop()


def test_half_close_gets_every_reply(server: RunningServer) -> None:
    """
    A client that sends its lines and then shuts down its sending side gets
    a reply to every task (inline or pooled, a sleep, a ping) and then the
    server closes the connection.
    """
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(PIPED)
        sock.shutdown(socket.SHUT_WR)
        assert results(read_to_end(sock)) == EXPECTED


def test_half_close_answers_a_last_line_without_newline(server: RunningServer) -> None:
    """
    A last request not ended by a newline before the end of input is still
    answered.
    """
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(PIPED + b'{"tarea_id": "ultima", "tipo": "upper", "contenido": "fin"}')
        sock.shutdown(socket.SHUT_WR)
        assert results(read_to_end(sock)) == dict(EXPECTED, ultima="FIN")


def test_piped_netcat(server: RunningServer) -> None:
    """
    printf '...' | nc -N HOST PORT prints every reply and exits by itself.
    """
    nc = shutil.which("nc")
    if nc is None:
        pytest.fail("netcat is not installed (apt-get install -y netcat-openbsd)")
    out = subprocess.run(
        [nc, "-N", "127.0.0.1", str(server.port)], input=PIPED, capture_output=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert results(out.stdout) == EXPECTED


def test_half_close_over_unix_socket(tmp_path: Path) -> None:
    """
    The same half-close on a UNIX socket endpoint gets every reply.
    """
    path = tmp_path / "pfo3.sock"
    running = start_server(tmp_path, unix=path)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(PIPED)
            sock.shutdown(socket.SHUT_WR)
            assert results(read_to_end(sock)) == EXPECTED
    finally:
        running.stop()


def test_half_close_then_reset_leaves_the_server_healthy(server: RunningServer) -> None:
    """
    A client that half-closes with tasks in flight and then resets the
    connection costs the server nothing: the next client is served.
    """
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b'{"tipo": "sleep", "contenido": 0.5}\n')
    sock.shutdown(socket.SHUT_WR)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # RST
    with socket.create_connection(("127.0.0.1", server.port)) as other:
        other.sendall(PIPED)
        other.shutdown(socket.SHUT_WR)
        assert results(read_to_end(other)) == EXPECTED


def _tls_server(tmp_path: Path, *extra: str) -> Tuple[RunningServer, TLSFiles]:
    files = TLSFiles(tmp_path)
    port = free_port()
    return start_server(tmp_path, *extra, port=port, endpoint=files.endpoint(port)), files


def test_sigterm_on_tls_delivers_the_last_reply(tmp_path: Path) -> None:
    """
    On SIGTERM with tasks in flight on a TLS connection, every task's reply,
    including the one whose completion ends the drain, reaches the client
    before the server closes the connection, and the server stops cleanly
    (twistd ends by the signal it got).
    """
    running, files = _tls_server(tmp_path)
    context = ssl.create_default_context(cafile=str(files.ca))
    try:
        with socket.create_connection(("127.0.0.1", running.port)) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                for i, seconds in enumerate((0.2, 0.4, 0.6)):
                    sock.sendall(json.dumps(
                        {"tarea_id": f"t{i}", "tipo": "sleep", "contenido": seconds}
                    ).encode() + b"\n")
                sock.sendall(b'{"op": "ping", "tarea_id": "p"}\n')
                first = b""
                while not first.endswith(b"\n"):
                    first += sock.recv(65536)  # the ping's reply: all are accepted
                running.proc.send_signal(signal.SIGTERM)
                rest = b""
                sock.settimeout(10)
                while True:
                    try:
                        chunk = sock.recv(65536)
                    except ssl.SSLEOFError:
                        break
                    if not chunk:
                        break
                    rest += chunk
        assert results(first + rest) == {
            "p": "pong", "t0": "Esperé 0.2 segundos", "t1": "Esperé 0.4 segundos",
            "t2": "Esperé 0.6 segundos",
        }
        assert running.proc.wait(15) == -signal.SIGTERM
        log = running.log.read_text()
        assert "pfo3 stopped after 3 tasks" in log and "dropping" not in log, log
    finally:
        running.stop()


def test_second_sigterm_cancels_the_rest_quietly(tmp_path: Path) -> None:
    """
    A second SIGTERM while the server waits for tasks in flight cancels
    them at once (their clients get 'apagando') instead of waiting out the
    shutdown timeout, and the log shows no traceback.
    """
    running = start_server(tmp_path, "--shutdown-timeout", "25")
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=20) as sock:
            sock.sendall(b'{"tarea_id": "larga", "tipo": "sleep", "contenido": 20}\n'
                         b'{"op": "ping"}\n')
            assert b"pong" in sock.recv(65536)
            running.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert running.proc.poll() is None  # still waiting for the sleep
            started = time.monotonic()
            running.proc.send_signal(signal.SIGTERM)
            reply = json.loads(read_to_end(sock, 15))
        assert reply["tarea_id"] == "larga" and reply["codigo"] == "apagando"
        assert running.proc.wait(15) == -signal.SIGTERM
        assert time.monotonic() - started < 15  # not the 25 s shutdown timeout
        log = running.log.read_text()
        assert "Traceback" not in log and "ReactorNotRunning" not in log, log
    finally:
        running.stop()


def _listen_backlog(port: int) -> List[int]:
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    # For a listening socket, Send-Q is the backlog it was given (capped by
    # net.core.somaxconn).
    return [int(line.split()[2]) for line in out.splitlines() if line.strip()]


def test_listen_backlog(tmp_path: Path) -> None:
    """
    The listening socket gets --backlog (default 1024, capped by the
    kernel's somaxconn) instead of Twisted's 50; an endpoint's own backlog=
    wins.
    """
    if shutil.which("ss") is None:
        pytest.fail("ss (iproute2) is not installed")
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    for extra, endpoint, expected in [
        ((), None, 1024),
        (("--backlog", "300"), None, 300),
        ((), "tcp:{port}:interface=127.0.0.1:backlog=77", 77),
    ]:
        port = free_port()
        running = start_server(
            tmp_path, *extra, port=port,
            endpoint=endpoint.format(port=port) if endpoint else None)
        try:
            assert _listen_backlog(port) == [min(expected, somaxconn)]
        finally:
            running.stop()
