"""
Integration tests of the web gateway: a real C{twistd -n pfo3 --web
tcp:PORT}, HTTP with urllib, WebSockets with the C{websockets} package's
client, and TCP clients of the same server alongside.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from pfo3.web.testing import frame

from .conftest import (
    LineSocket,
    RunningServer,
    TLSFiles,
    free_port,
    start_server,
    wait_for_port,
)

pytestmark = pytest.mark.integration

SECRET = "s" * 32


class Web:
    """
    A running server with a --web port.
    """

    def __init__(self, server: RunningServer, port: int) -> None:
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/ws"

    def request(self, method: str, path: str, body: Any = None,
                headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, Any]]:
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def ws(self, **kwargs: Any) -> ClientConnection:
        return connect(self.ws_url, open_timeout=10, **kwargs)


def start_web(tmp_path: Path, *extra: str) -> Web:
    port = free_port()
    server = start_server(tmp_path, "--web", f"tcp:{port}:interface=127.0.0.1", *extra)
    try:
        wait_for_port(port, proc=server.proc)
    except Exception:
        server.stop()
        raise
    return Web(server, port)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    running = start_web(tmp_path, "--max-line", "4096")
    try:
        yield running
    finally:
        running.server.stop()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Web]:
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    running = start_web(tmp_path, "--jwt-secret-file", str(secret))
    try:
        yield running
    finally:
        running.server.stop()


def recv_json(ws: ClientConnection) -> Dict[str, Any]:
    reply: Dict[str, Any] = json.loads(ws.recv(timeout=10))
    return reply


def close_code(ws: ClientConnection) -> Optional[int]:
    try:
        ws.recv(timeout=10)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd is not None else None
    raise AssertionError("the connection stayed open")


def test_http_tcp_and_websocket_share_one_orchestrator(web: Web) -> None:
    """
    A task submitted over HTTP is seen by op: estado over TCP and over the
    WebSocket: one server, one store, one set of rules.
    """
    status, reply = web.request("POST", "/tareas", {"tarea_id": "h1", "tipo": "1",
                                                    "contenido": "hola"})
    assert (status, reply) == (200, {"estado": "ok", "resultado": "HOLA", "tarea_id": "h1",
                                     "worker": 0})
    tcp = LineSocket(web.server.port)
    tcp.send_json({"op": "estado", "tarea_id": "h1"})
    assert tcp.read_json()["resultado"]["resultado"] == "HOLA"
    with web.ws() as ws:
        ws.send(json.dumps({"op": "estado", "tarea_id": "h1"}))
        assert recv_json(ws)["resultado"]["estado"] == "ok"
    assert web.request("GET", "/tareas/h1")[1]["resultado"]["resultado"] == "HOLA"
    tcp.close()


def test_http_background_task(web: Web) -> None:
    """
    "esperar": false is 202 aceptada; GET /tareas/{id} shows it running,
    then done.
    """
    status, reply = web.request("POST", "/tareas", {"tarea_id": "bg", "tipo": "sleep",
                                                    "contenido": 0.3, "esperar": False})
    assert (status, reply["estado"]) == (202, "aceptada")
    assert web.request("GET", "/tareas/bg")[1]["resultado"]["estado"] == "en_curso"
    time.sleep(0.6)
    assert web.request("GET", "/tareas/bg")[1]["resultado"]["estado"] == "ok"


def test_http_bad_input(web: Web) -> None:
    """
    Invalid JSON is 400, an oversize body 413, an unknown task 404; the
    server goes on answering.
    """
    assert web.request("POST", "/tareas", b"{bad") == (400, {
        "estado": "error", "codigo": "json_invalido", "tarea_id": None,
        "mensaje": web.request("POST", "/tareas", b"{bad")[1]["mensaje"]})
    status, reply = web.request("POST", "/tareas", {"tipo": "upper", "contenido": "x" * 10_000})
    assert (status, reply["codigo"]) == (413, "linea_demasiado_larga")
    assert web.request("GET", "/tareas/nada")[0] == 404
    assert web.request("GET", "/tipos")[0] == 200


def test_websocket_pipelining_and_bad_input(web: Web) -> None:
    """
    Over a real socket: replies in completion order; invalid JSON answered
    and the connection goes on; a binary message closes with 1003 and an
    oversize one with 1009, and neither disturbs another client.
    """
    with web.ws() as ws, web.ws() as other:
        other.send(json.dumps({"tarea_id": "o", "tipo": "sleep", "contenido": 0.5}))
        ws.send(json.dumps({"tarea_id": "slow", "tipo": "sleep", "contenido": 0.3}))
        ws.send(json.dumps({"tarea_id": "fast", "tipo": "upper", "contenido": "x"}))
        ws.send("{bad")
        replies = [recv_json(ws) for _ in range(3)]
        assert [r["tarea_id"] for r in replies] == ["fast", None, "slow"]
        assert replies[1]["codigo"] == "json_invalido"
        with web.ws() as binary:
            binary.send(b"\x00\x01")
            assert close_code(binary) == 1003
        with web.ws(max_size=None) as big:
            big.send("x" * 5000)
            assert close_code(big) == 1009
        assert recv_json(other)["tarea_id"] == "o"


def raw_websocket(port: int) -> socket.socket:
    """
    A WebSocket opened by hand on a plain socket, to send frames without a
    client library reading anything.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_websocket_slow_client(web: Web) -> None:
    """
    A client that sends many requests and reads none of its replies stalls
    only itself: the server stops reading it (the client's sends block), and
    another WebSocket client and a TCP client are answered at once.
    """
    slow = raw_websocket(web.port)
    slow.settimeout(2)
    message = frame(json.dumps({"tipo": "reverse", "contenido": "x" * 4000}).encode())
    sent = 0
    try:
        for _ in range(20_000):
            slow.sendall(message)
            sent += 1
    except socket.timeout:
        pass
    assert sent < 20_000, "the server kept reading a client that reads nothing"
    with web.ws() as quick:
        started = time.monotonic()
        quick.send(json.dumps({"tarea_id": "q", "tipo": "upper", "contenido": "x"}))
        assert recv_json(quick)["resultado"] == "X"
        assert time.monotonic() - started < 2
    tcp = LineSocket(web.server.port)
    tcp.send_json({"op": "ping"})
    assert tcp.read_json()["resultado"] == "pong"
    tcp.close()
    slow.close()


def test_tokens(secured: Web) -> None:
    """
    On a server that requires tokens: HTTP without one is 401
    token_faltante, with a forged one 401 token_invalido, with a good one
    200; a WebSocket upgrade with a forged bearer header is refused (401),
    one with op: auth works.
    """
    task = {"tipo": "upper", "contenido": "x"}
    assert secured.request("POST", "/tareas", task)[1]["codigo"] == "token_faltante"
    forged = jwt.encode({"sub": "eve", "exp": int(time.time()) + 60}, "f" * 32, algorithm="HS256")
    good = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    status, reply = secured.request("POST", "/tareas", task,
                                    {"Authorization": f"Bearer {forged}"})
    assert (status, reply["codigo"]) == (401, "token_invalido")
    status, reply = secured.request("POST", "/tareas", task, {"Authorization": f"Bearer {good}"})
    assert (status, reply["resultado"]) == (200, "X")
    with pytest.raises(InvalidStatus) as refused:
        secured.ws(additional_headers={"Authorization": f"Bearer {forged}"})
    assert refused.value.response.status_code == 401
    with secured.ws() as ws:
        ws.send(json.dumps(dict(task, tarea_id="a")))
        assert recv_json(ws)["codigo"] == "token_faltante"
        ws.send(json.dumps({"op": "auth", "token": good}))
        assert recv_json(ws)["resultado"]["identidad"] == "alice"
        ws.send(json.dumps(dict(task, tarea_id="b")))
        assert recv_json(ws)["resultado"] == "X"


def test_sigterm_answers_websocket_tasks_then_closes(web: Web) -> None:
    """
    On SIGTERM, a WebSocket's task in flight is answered, then the
    connection is closed with 1001 (going away) and the server shuts down
    cleanly (twistd then ends by the signal it got).
    """
    with web.ws() as ws:
        ws.send(json.dumps({"tarea_id": "s", "tipo": "sleep", "contenido": 0.5}))
        time.sleep(0.2)
        web.server.proc.terminate()
        assert recv_json(ws)["tarea_id"] == "s"
        assert close_code(ws) == 1001
    assert web.server.proc.wait(15) == -signal.SIGTERM
    log = web.server.log.read_text()
    assert "pfo3 stopped after" in log and "Server Shut Down." in log
    assert "Traceback" not in log


def test_https_and_wss(tmp_path: Path) -> None:
    """
    --web ssl:PORT:... serves the API over HTTPS and the WebSocket over
    wss:, with the server's certificate.
    """
    (tmp_path / "ca").mkdir()
    files = TLSFiles(tmp_path / "ca")
    port = free_port()
    server = start_server(tmp_path, "--web", files.endpoint(port))
    try:
        wait_for_port(port, proc=server.proc)
        tls = ssl.create_default_context(cafile=str(files.ca))
        req = urllib.request.Request(
            f"https://localhost:{port}/tareas", method="POST",
            data=json.dumps({"tipo": "upper", "contenido": "tls"}).encode())
        with urllib.request.urlopen(req, timeout=10, context=tls) as response:
            assert json.loads(response.read())["resultado"] == "TLS"
        with connect(f"wss://localhost:{port}/ws", ssl=tls, open_timeout=10) as ws:
            ws.send(json.dumps({"tarea_id": "w", "tipo": "upper", "contenido": "wss"}))
            assert recv_json(ws)["resultado"] == "WSS"
    finally:
        server.stop()


def test_dashboard_and_panel(web: Web) -> None:
    """
    / serves the dashboard page and /panel its figures.
    """
    with urllib.request.urlopen(web.url + "/", timeout=10) as response:
        assert b"<form" in response.read()
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    status, reply = web.request("GET", "/panel")
    assert status == 200 and "tareas_por_segundo" in reply["resultado"]


def test_http_client_that_does_not_read(tmp_path: Path) -> None:
    """
    A client that pipelines 1000 requests with 32 KiB replies and reads
    none: once its replies fill the socket, the server answers (and reads)
    no more of its requests, so it holds about one reply for it, not the
    32 MiB of them; another client is answered meanwhile, and the server
    goes on once the slow one leaves.
    """
    import psutil

    web = start_web(tmp_path)  # the default --max-line: 32 KiB bodies are accepted
    server = psutil.Process(web.server.proc.pid)
    body = json.dumps({"tipo": "uppercase", "contenido": "a" * 32768}).encode()
    request = (b"POST /tareas HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body)
    stream = memoryview(request * 1000)
    rss = server.memory_info().rss
    slow = socket.create_connection(("127.0.0.1", web.port))
    slow.setblocking(False)
    sent = 0
    stalled_since = None
    try:
        # Send what the kernel takes (its buffers may take it all).
        while sent < len(stream):
            try:
                sent += slow.send(stream[sent:sent + 65536])
                stalled_since = None
            except BlockingIOError:
                now = time.monotonic()
                stalled_since = stalled_since or now
                if now - stalled_since > 2:
                    break
                time.sleep(0.05)
        time.sleep(2)  # time to answer them all, were it to
        status, panel = web.request("GET", "/panel")
        answered = panel["resultado"]["web"]["http"]
        assert answered < 500, f"{answered} of the 1000 requests answered"
        grown = server.memory_info().rss - rss
        assert grown < 16 * 2**20, f"the server grew by {grown} bytes"
        status, reply = web.request("GET", "/tipos")
        assert status == 200 and reply["estado"] == "ok"
        slow.close()
        assert web.request("POST", "/tareas", {"tipo": "uppercase", "contenido": "x"})[0] == 200
    finally:
        slow.close()
        web.server.stop()
