"""
Integration tests: a real C{twistd -n pfo3} process, real loopback sockets,
clients that write raw lines exactly as netcat would.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from .conftest import LineSocket, RunningServer, TLSFiles, free_port, start_server
from .test_wire import BAD_LINES

pytestmark = pytest.mark.integration


def test_seed_client_lines(server: RunningServer) -> None:
    """
    The seed client's request, sent as raw bytes, gets the seed's reply shape
    back as one line; so does each seed task type and alias.
    """
    c = LineSocket(server.port)
    c.send(b'{"tarea_id": "4cbc8d09", "tipo": "uppercase", "contenido": "hola mundo"}\n')
    assert c.read_line() == (
        b'{"estado": "ok", "resultado": "HOLA MUNDO", "tarea_id": "4cbc8d09", "worker": 0}'
    )
    for tipo, contenido, resultado in [
        ("1", "hola", "HOLA"), ("invertir", "hola", "aloh"), (3, "a b c", 3),
        ("sleep", "0.1", "Esperé 0.1 segundos"),
    ]:
        c.send_json({"tarea_id": "t", "tipo": tipo, "contenido": contenido})
        assert c.read_json() == {"estado": "ok", "resultado": resultado, "tarea_id": "t",
                                 "worker": 0}
    c.close()


def test_pipelined_replies_in_completion_order(server: RunningServer) -> None:
    """
    Requests pipelined on one socket are answered as they finish, not in the
    order sent.
    """
    c = LineSocket(server.port)
    c.send(b"".join(
        json.dumps({"tarea_id": tid, "tipo": "sleep", "contenido": s}).encode() + b"\n"
        for tid, s in [("slow", 0.9), ("mid", 0.6), ("fast", 0.3)]
    ) + b'{"tarea_id": "now", "tipo": "upper", "contenido": "x"}\r\n')
    assert [r["tarea_id"] for r in c.read_many(4)] == ["now", "fast", "mid", "slow"]
    c.close()


def test_400_concurrent_sleeps(server: RunningServer) -> None:
    """
    400 one-second sleeps over 20 connections run at once: all are answered
    in well under the 400 s a one-at-a-time server would need (< 3 s).
    """
    socks = [LineSocket(server.port) for _ in range(20)]
    started = time.monotonic()
    for n, c in enumerate(socks):
        c.send(b"".join(
            json.dumps({"tarea_id": f"{n}-{i}", "tipo": "sleep", "contenido": 1}).encode() + b"\n"
            for i in range(20)
        ))
    got: List[Dict[str, Any]] = []
    for c in socks:
        got.extend(c.read_many(20))
    elapsed = time.monotonic() - started
    assert len({r["tarea_id"] for r in got}) == 400
    assert all(r["estado"] == "ok" for r in got)
    assert elapsed < 3.0, elapsed
    for c in socks:
        c.close()


def test_bad_inputs_do_not_disturb_others(server: RunningServer) -> None:
    """
    Every bad input of the table gets its error code over a real socket, on
    one connection, while another client's task completes undisturbed.
    """
    other = LineSocket(server.port)
    other.send_json({"tarea_id": "bystander", "tipo": "sleep", "contenido": 0.5})
    bad = LineSocket(server.port)
    for line, codigo in BAD_LINES:
        bad.send(line + b"\n")
        assert bad.read_json()["codigo"] == codigo, line[:60]
    bad.send(b"x" * (1024 * 1024 + 10) + b"\n")
    assert bad.read_json()["codigo"] == "linea_demasiado_larga"
    bad.send_json({"tarea_id": "after", "tipo": "reverse", "contenido": "ok"})
    assert bad.read_json()["resultado"] == "ko"
    assert other.read_json() == {"estado": "ok", "resultado": "Esperé 0.5 segundos",
                                 "tarea_id": "bystander", "worker": 0}
    bad.close()
    other.close()


def test_sigterm_lets_tasks_finish(server: RunningServer) -> None:
    """
    On SIGTERM the server stops accepting connections, still answers the task
    in flight, closes the connection and shuts down cleanly (twistd then
    ends by the signal it got, as its exit status shows).
    """
    c = LineSocket(server.port)
    c.send_json({"tarea_id": "last", "tipo": "sleep", "contenido": 1})
    time.sleep(0.2)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    assert c.read_json()["tarea_id"] == "last"
    assert c.sock.recv(10) == b""
    assert server.proc.wait(10) == -signal.SIGTERM
    log = server.log.read_text()
    assert "waiting up to 10.0s for 1 task in flight" in log
    assert "pfo3 stopped after 1 task" in log and "Server Shut Down." in log


def test_dropped_client_is_not_leaked(server: RunningServer) -> None:
    """
    A client that disconnects with tasks in flight costs the server nothing
    after: the server keeps serving and logs no error.
    """
    for _ in range(5):
        c = LineSocket(server.port)
        c.send(b'{"tipo": "sleep", "contenido": 0.3}\n' * 50)
        c.close()
    time.sleep(0.6)
    c = LineSocket(server.port)
    c.send_json({"tipo": "upper", "contenido": "vivo", "tarea_id": "v"})
    assert c.read_json()["resultado"] == "VIVO"
    c.close()
    server.stop()
    log = server.log.read_text()
    assert "Server Shut Down." in log and "Traceback" not in log


def test_tls_and_unix_endpoints(tmp_path: Path) -> None:
    """
    A server listening on TLS (verified against its CA) and one on a UNIX
    socket, both given as endpoint strings, serve the protocol.
    """
    tls = TLSFiles(tmp_path)
    port = free_port()
    secure = start_server(tmp_path, port=port, endpoint=tls.endpoint(port))
    sock_path = tmp_path / "pfo3.sock"
    local = start_server(tmp_path, unix=sock_path)
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
                conn.sendall(b'{"tarea_id": "tls", "tipo": 1, "contenido": "seguro"}\n')
                assert json.loads(conn.recv(4096))["resultado"] == "SEGURO"
        with socket.socket(socket.AF_UNIX) as u:
            u.settimeout(10)
            u.connect(str(sock_path))
            u.sendall(b'{"tarea_id": "unix", "tipo": 2, "contenido": "local"}\n')
            assert json.loads(u.recv(4096))["resultado"] == "lacol"
    finally:
        secure.stop()
        local.stop()
    assert "Server Shut Down." in secure.log.read_text()


def test_idle_tls_connection_is_closed(tmp_path: Path) -> None:
    """
    Over TLS, a connection idle for --idle-timeout is closed cleanly (the
    client sees the end of the stream) after getting its reply.
    """
    tls = TLSFiles(tmp_path)
    port = free_port()
    running = start_server(tmp_path, "--idle-timeout", "1", port=port,
                           endpoint=tls.endpoint(port))
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        with socket.create_connection(("127.0.0.1", port), timeout=6) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
                conn.sendall(b'{"tarea_id": "a", "tipo": 1, "contenido": "hola"}\n')
                data = b""
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        assert json.loads(data)["resultado"] == "HOLA"
    finally:
        running.stop()


def test_slow_reader_is_not_idle(tmp_path: Path) -> None:
    """
    A client that sends large tasks and then reads nothing for longer than
    --idle-timeout is not idle (the server stopped reading it, not the other
    way round): once it reads, every reply arrives; then, idle for real, the
    connection is closed after the last reply.
    """
    # Idle timeout 2 s, client silent for 4 s: twice the timeout, with room
    # for a loaded machine to schedule the client's sending thread late.
    running = start_server(tmp_path, "--idle-timeout", "2")
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", running.port))
        body = b"".join(
            json.dumps({"tarea_id": str(i), "tipo": 1, "contenido": "a" * 60_000}).encode()
            + b"\n" for i in range(40))
        sender = threading.Thread(target=sock.sendall, args=(body,), daemon=True)
        sender.start()
        time.sleep(4)
        sock.settimeout(10)
        data = b""
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        sender.join(10)
        assert not sender.is_alive()
        replies = [json.loads(line) for line in data.splitlines()]
        assert sorted(int(r["tarea_id"]) for r in replies) == list(range(40))
        assert all(r["resultado"] == "A" * 60_000 for r in replies)
        sock.close()
    finally:
        running.stop()


def test_many_clients_at_once(server: RunningServer) -> None:
    """
    50 threads, each with its own connection pipelining 200 mixed tasks, all
    get every reply exactly once with the right result.
    """
    errors: List[BaseException] = []

    def client(n: int) -> None:
        try:
            c = LineSocket(server.port)
            c.send(b"".join(
                json.dumps({"tarea_id": f"{n}.{i}", "tipo": 1 + i % 3,
                            "contenido": f"tarea {n} {i}"}).encode() + b"\n"
                for i in range(200)
            ))
            got = {r["tarea_id"]: r["resultado"] for r in c.read_many(200)}
            assert len(got) == 200
            assert got[f"{n}.0"] == f"TAREA {n} 0"
            assert got[f"{n}.1"] == f"tarea {n} 1"[::-1]
            assert got[f"{n}.2"] == 3
            c.close()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert errors == []
