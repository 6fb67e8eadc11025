"""
Shared test helpers for pfo3.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """
    @return: A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, deadline: float = 15.0, proc: Optional[subprocess.Popen] = None
) -> None:
    """
    Wait until something accepts connections on 127.0.0.1:port.
    """
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {deadline}s")


def twistd_command(*args: str) -> List[str]:
    """
    @return: The command line that runs C{twistd -n pfo3 ARGS} with this
        interpreter.
    """
    twistd = Path(sys.executable).parent / "twistd"
    return [str(twistd), "-n", "--pidfile=", "pfo3", *args]


def server_env() -> Dict[str, str]:
    """
    @return: An environment in which C{twistd} finds this checkout's pfo3
        and its plugin first.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class RunningServer:
    """
    A C{twistd -n pfo3} process and the port it listens on.
    """

    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_server(tmp_path: Path, *extra: str, port: Optional[int] = None) -> RunningServer:
    """
    Start C{twistd -n pfo3} on a free loopback port and wait until it accepts.
    """
    port = port or free_port()
    log = tmp_path / f"pfo3-{port}.log"
    proc = subprocess.Popen(
        twistd_command("--port", f"tcp:{port}:interface=127.0.0.1", *extra),
        cwd=tmp_path, env=server_env(),
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError(log.read_text())
    return RunningServer(proc, port, log)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    """
    A real C{twistd -n pfo3} on its defaults, on a free port.
    """
    running = start_server(tmp_path)
    try:
        yield running
    finally:
        running.stop()


class LineSocket:
    """
    A blocking socket client that speaks lines, as netcat would.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_json(self, obj: Any) -> None:
        self.send(json.dumps(obj).encode() + b"\n")

    def read_line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; unread: {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def read_json(self) -> Dict[str, Any]:
        obj: Dict[str, Any] = json.loads(self.read_line())
        return obj

    def read_many(self, n: int) -> List[Dict[str, Any]]:
        return [self.read_json() for _ in range(n)]

    def close(self) -> None:
        self.sock.close()


def pairs(items: Sequence[Tuple[Any, Any]]) -> List[Any]:
    return [pytest.param(a, b, id=str(a)[:40]) for a, b in items]
