"""
Integration tests: a real HAProxy in front of two pfo3 servers, speaking the
PROXY protocol (v2) to their C{haproxy:} endpoints and health-checking them
with C{{"op": "ping"}}.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

import pytest

from .conftest import LineSocket, RunningServer, free_port, start_server, wait_for_port

pytestmark = pytest.mark.integration

PING_HEX = b'{"op": "ping"}\n'.hex()

CONFIG = """\
global
    maxconn 512
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend pfo3
    bind 127.0.0.1:{front}
    default_backend orchestrators

backend orchestrators
    balance roundrobin
    option tcp-check
    tcp-check send-binary {ping}
    tcp-check expect string pong
{servers}
"""

SERVER = (
    "    server {name} 127.0.0.1:{port} send-proxy-v2 check check-send-proxy "
    "inter 200ms fall 2 rise 1\n"
)


def _haproxy() -> str:
    path = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(path).exists():
        pytest.fail("haproxy is not installed (apt-get install -y haproxy); .ci/run installs it")
    return path


class Cluster:
    """
    HAProxy on C{front}, balancing over pfo3 servers named s1, s2...

    @ivar backends: The pfo3 servers started so far, by name.
    @ivar haproxy: The HAProxy process, once started.
    """

    def __init__(self, tmp_path: Path, extra_config: str = "") -> None:
        """
        @param extra_config: Appended to HAProxy's configuration.
        """
        self.tmp = tmp_path
        self.extra_config = extra_config
        self.front = free_port()
        self.stats = tmp_path / "haproxy.sock"
        self.log = tmp_path / "haproxy.log"
        self.backends: Dict[str, RunningServer] = {}
        self.haproxy: Optional[subprocess.Popen] = None

    def start(self, n: int) -> None:
        """
        Start C{n} pfo3 servers and HAProxy in front of them, and wait until
        HAProxy listens.  If any of them fails to start, whatever was started
        is stopped before the error is raised.
        """
        try:
            servers = ""
            for i in range(1, n + 1):
                name, port = f"s{i}", free_port()
                self.backends[name] = start_server(
                    self.tmp, "--log-tasks", "1",
                    port=port, endpoint=f"haproxy:tcp:{port}:interface=127.0.0.1",
                )
                servers += SERVER.format(name=name, port=port)
            cfg = self.tmp / "haproxy.cfg"
            cfg.write_text(CONFIG.format(
                stats=self.stats, front=self.front, ping=PING_HEX, servers=servers,
            ) + self.extra_config)
            with self.log.open("wb") as out:
                self.haproxy = subprocess.Popen(
                    [_haproxy(), "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                )
            try:
                wait_for_port(self.front, proc=self.haproxy)
            except RuntimeError as e:
                raise RuntimeError(f"{e}: {self.log.read_text()}") from e
        except BaseException:
            self.stop()
            raise

    def status(self) -> Dict[str, str]:
        """
        @return: HAProxy's view of each backend server: UP, DOWN...
        """
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines()[1:] if line]
        return {r[1]: r[17].split()[0] for r in rows if r[0] == "orchestrators"
                and r[1].startswith("s")}

    def wait_status(self, want: Dict[str, str], deadline: float = 10.0) -> None:
        end = time.monotonic() + deadline
        while self.status() != want:
            assert time.monotonic() < end, (self.status(), self.log.read_text())
            time.sleep(0.1)

    def stop(self) -> None:
        """
        Stop HAProxy (if it was started) and every pfo3 server started.
        """
        try:
            if self.haproxy is not None and self.haproxy.poll() is None:
                self.haproxy.terminate()
                try:
                    self.haproxy.wait(10)
                except subprocess.TimeoutExpired:
                    self.haproxy.kill()
                    self.haproxy.wait(5)
        finally:
            for backend in self.backends.values():
                backend.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """
    HAProxy in front of two pfo3 servers; all three stopped afterwards.
    """
    c = Cluster(tmp_path)
    c.start(2)
    try:
        yield c
    finally:
        c.stop()


def test_backends_stopped_when_haproxy_fails_to_start(tmp_path: Path) -> None:
    """
    When HAProxy refuses its configuration and exits, starting the cluster
    raises with HAProxy's complaint, and the two pfo3 servers it had already
    started are stopped: their processes have exited and their ports
    accept no connection.
    """
    c = Cluster(tmp_path, extra_config="\nthis-is-not-a-keyword\n")
    with pytest.raises(RuntimeError, match="this-is-not-a-keyword"):
        c.start(2)
    assert c.haproxy is not None and c.haproxy.poll() not in (None, 0)
    assert sorted(c.backends) == ["s1", "s2"]
    for backend in c.backends.values():
        assert backend.proc.poll() is not None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", backend.port), timeout=1).close()


def test_balanced_with_real_client_addresses(cluster: Cluster) -> None:
    """
    Through HAProxy, tasks are answered by both pfo3 servers (round robin),
    both pass the ping health check, and each server logs the client's own
    address and port (read from the PROXY v2 header), not HAProxy's.
    """
    cluster.wait_status({"s1": "UP", "s2": "UP"})
    ports = []
    for i in range(6):
        c = LineSocket(cluster.front)
        ports.append(c.sock.getsockname()[1])
        c.send_json({"tarea_id": f"t{i}", "tipo": "uppercase", "contenido": f"hola {i}"})
        assert c.read_json() == {"estado": "ok", "resultado": f"HOLA {i}",
                                 "tarea_id": f"t{i}", "worker": 0}
        c.close()
    logs = {name: b.log.read_text() for name, b in cluster.backends.items()}
    for name, text in logs.items():
        assert "tarea t" in text, name
    for i, port in enumerate(ports):
        [text] = [t for t in logs.values() if f"tarea t{i} " in t]
        assert f"peer=127.0.0.1:{port}" in text


def test_failover_when_a_server_stops(cluster: Cluster) -> None:
    """
    When one pfo3 server stops, HAProxy's ping check marks it DOWN and every
    new connection is served by the other.
    """
    cluster.wait_status({"s1": "UP", "s2": "UP"})
    cluster.backends["s1"].stop()
    cluster.wait_status({"s1": "DOWN", "s2": "UP"})
    for i in range(4):
        c = LineSocket(cluster.front)
        c.send_json({"tarea_id": f"f{i}", "tipo": "reverse", "contenido": "abc"})
        assert c.read_json()["resultado"] == "cba"
        c.close()
    assert "tarea f3 " in cluster.backends["s2"].log.read_text()


def test_half_close_through_haproxy(cluster: Cluster) -> None:
    """
    Piped netcat (nc -N) through HAProxy to a haproxy: endpoint gets every
    reply, a sleep's included: HAProxy passes the end of input on, and the
    PROXY wrapper hands it to pfo3 instead of closing the connection.
    """
    cluster.wait_status({"s1": "UP", "s2": "UP"})
    nc = shutil.which("nc")
    if nc is None:
        pytest.fail("netcat is not installed (apt-get install -y netcat-openbsd)")
    piped = (b'{"tarea_id": "s", "tipo": "sleep", "contenido": 0.3}\n'
             b'{"tarea_id": "u", "tipo": "upper", "contenido": "hola"}\n'
             b'{"op": "ping", "tarea_id": "p"}\n')
    out = subprocess.run([nc, "-N", "127.0.0.1", str(cluster.front)], input=piped,
                         capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    replies = {r["tarea_id"]: r["resultado"] for r in map(json.loads, out.stdout.splitlines())}
    assert replies == {"s": "Esperé 0.3 segundos", "u": "HOLA", "p": "pong"}
