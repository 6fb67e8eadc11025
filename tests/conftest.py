"""
Shared test helpers for pfo3.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from pfo3.chaos._process import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent


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


def shell_env() -> Dict[str, str]:
    """
    @return: The environment a README's commands run in: this venv's
        commands first on C{PATH}, as after C{. .venv/bin/activate}, and
        this checkout's pfo3 plugin visible to C{twistd}.
    """
    env = server_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
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


def start_server(
    workdir: Path, *extra: str, port: Optional[int] = None, endpoint: Optional[str] = None,
    unix: Optional[Path] = None,
) -> RunningServer:
    """
    Start C{twistd -n pfo3} and wait until it accepts connections.

    @param extra: More C{twistd pfo3} options.
    @param port: The TCP port to listen and wait on (a free one by default).
    @param endpoint: The C{--port} endpoint, when it is not plain loopback TCP
        on C{port} (C{ssl:PORT:...}).
    @param unix: Listen on this UNIX socket instead, and wait for it.
    """
    port = port or free_port()
    if unix is not None:
        endpoint = f"unix:{unix}"
    log = workdir / f"pfo3-{port}.log"
    proc = subprocess.Popen(
        twistd_command("--port", endpoint or f"tcp:{port}:interface=127.0.0.1", *extra),
        cwd=workdir, env=server_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        if unix is None:
            wait_for_port(port, proc=proc)
        else:
            deadline = time.monotonic() + 15
            while not unix.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no socket at {unix}")
                time.sleep(0.05)
    except Exception:
        proc.kill()
        proc.wait(5)
        raise RuntimeError(log.read_text())
    return RunningServer(proc, port, log)


class TLSFiles:
    """
    A throwaway certificate authority and a C{localhost} server certificate
    it signed, as files, made by L{pfo3.certs} (what C{pfo3-certs} runs).

    @ivar folder: The folder C{pfo3-certs --dir} would name.
    @ivar ca_dir: A directory holding only the CA certificate (C{ca.pem}),
        for Twisted's C{trustRoots} and the server's C{--tls-client-ca}.
    @ivar ca: The CA certificate file, for L{ssl.create_default_context}.
    @ivar key: The server's private key.
    @ivar cert: The server's certificate.
    """

    def __init__(self, directory: Path, san: Optional[Sequence[str]] = ("localhost",)) -> None:
        """
        @param san: The host names and addresses of the server certificate's
            subjectAltName; L{None} for a certificate without one (its
            subject is C{CN=localhost} all the same).
        """
        from pfo3.certs import make_ca, make_server

        self.folder = directory
        ca = make_ca(directory)
        self.ca_dir, self.ca = ca.directory, ca.cert
        server = make_server(directory, list(san or []), common_name="localhost")
        self.key, self.cert = server.key, server.cert

    def client(self, identity: str) -> Any:
        """
        Make a client certificate with subject C{CN=identity}, signed by
        this CA (a new one each time).

        @return: Its L{pfo3.certs.KeyPairFiles}.
        """
        from pfo3.certs import make_client

        return make_client(self.folder, identity, force=True)

    def endpoint(self, port: int) -> str:
        """
        @return: The C{ssl:} server endpoint for this certificate on C{port}.
        """
        return f"ssl:{port}:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"

    def client_endpoint(self, port: int, identity: Optional[str] = None) -> str:
        """
        @param identity: Present the client certificate of this identity
            (made first with L{client}).
        @return: The C{tls:} client endpoint that trusts this CA and
            connects to C{localhost:port}.
        """
        description = f"tls:localhost:{port}:trustRoots={self.ca_dir}"
        if identity is not None:
            from pfo3.certs import client_files

            files = client_files(self.folder, identity)
            description += f":certificate={files.cert}:privateKey={files.key}"
        return description


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

    def __init__(
        self, port: int, host: str = "127.0.0.1", timeout: float = 10.0,
        tls: Optional[ssl.SSLContext] = None, server_hostname: str = "localhost",
    ) -> None:
        """
        @param tls: Speak TLS with this context, checking the server's
            certificate for C{server_hostname}.
        """
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=server_hostname)
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


def connect_transport(factory: Any, peer: Any = None) -> Tuple[Any, Any]:
    """
    A server protocol from C{factory} connected to an in-memory
    L{StringTransport}.

    @return: The protocol and its transport.
    """
    from twisted.internet.testing import StringTransport

    proto = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer) if peer is not None else StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def take_replies(transport: Any) -> List[Dict[str, Any]]:
    """
    Decode and clear what the server wrote; every line must end with \\n.
    """
    data = transport.value()
    transport.clear()
    assert data == b"" or data.endswith(b"\n"), data
    return [json.loads(line) for line in data.splitlines()]


def read_to_end(sock: Any, deadline: float = 10.0) -> bytes:
    """
    Read from a socket until the other side closes the connection.
    """
    sock.settimeout(deadline)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def b64(data: bytes) -> str:
    """
    Base64url without padding, as JWTs write it.
    """
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade_token(header: Dict[str, Any], claims: Dict[str, Any], key: Optional[bytes]) -> str:
    """
    A JWT built by hand, as an attacker would: any header, signed with
    HMAC-SHA256 over C{key} (no signature when L{None}).
    """
    import hashlib
    import hmac

    signing = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    sig = "" if key is None else b64(hmac.new(key, signing.encode(), hashlib.sha256).digest())
    return signing + "." + sig


def stop_processes(procs: Sequence[Any], grace: float) -> None:
    """
    Ask every one of C{procs} (L{subprocess.Popen}s) to stop (SIGTERM),
    give each C{grace} seconds to exit, then kill those still running.
    """
    import subprocess

    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

