"""
Integration tests: a real C{twistd -n pfo3} on an C{ssl:} port, with and
without mutual TLS (C{--tls-client-ca}), against real clients over real
sockets: C{pfo3-client}, L{pfo3.client.BlockingClient} and Python's C{ssl}.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from .conftest import (
    LineSocket,
    RunningServer,
    TLSFiles,
    free_port,
    read_to_end,
    server_env,
    start_server,
    wait_for_port,
)

pytestmark = pytest.mark.integration

REQUEST = {"tarea_id": "t1", "tipo": "uppercase", "contenido": "hola"}


def tls_server(tmp_path: Path, *extra: str) -> Tuple[RunningServer, TLSFiles]:
    """
    Start a server on an C{ssl:} port with a certificate from a new CA.

    @param extra: More C{twistd pfo3} options; C{CA} stands for the folder
        of that CA's certificate.
    """
    (tmp_path / "server-ca").mkdir()
    files = TLSFiles(tmp_path / "server-ca")
    port = free_port()
    options = [str(files.ca_dir) if option == "CA" else option for option in extra]
    return start_server(tmp_path, *options, port=port, endpoint=files.endpoint(port)), files


def foreign(tmp_path: Path) -> TLSFiles:
    """
    @return: Another CA, which the server knows nothing of, and its own
        server certificate.
    """
    (tmp_path / "foreign-ca").mkdir()
    return TLSFiles(tmp_path / "foreign-ca")


def context(files: TLSFiles, identity: str = "") -> ssl.SSLContext:
    """
    @return: A client context trusting C{files}' CA, presenting the client
        certificate of C{identity} when given.
    """
    ctx = ssl.create_default_context(cafile=str(files.ca))
    if identity:
        client = files.client(identity)
        ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


def cli(endpoint: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pfo3.cli", "--endpoint", endpoint, "--tipo", "uppercase",
         "--contenido", "hola"],
        capture_output=True, text=True, timeout=60, env=server_env())


def assert_refused(out: subprocess.CompletedProcess, *words: str) -> str:
    """
    Check that C{pfo3-client} failed the expected way: nothing on stdout,
    exactly one C{[ERROR]} line on stderr, exit status 1.

    @return: The error line.
    """
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[ERROR] "), out.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def assert_serves(running: RunningServer, files: TLSFiles, identity: str = "") -> None:
    """
    A new TLS connection to C{running} gets its task done.
    """
    conn = LineSocket(running.port, tls=context(files, identity))
    try:
        conn.send_json(REQUEST)
        assert conn.read_json()["resultado"] == "HOLA"
    finally:
        conn.close()


def assert_clean_log(running: RunningServer) -> None:
    log = running.log.read_text()
    assert "Traceback" not in log and "Unhandled" not in log, log


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[Tuple[RunningServer, TLSFiles]]:
    """
    A server on TLS only, that asks for no client certificate.
    """
    running, files = tls_server(tmp_path)
    try:
        yield running, files
    finally:
        running.stop()


@pytest.fixture
def mtls(tmp_path: Path) -> Iterator[Tuple[RunningServer, TLSFiles]]:
    """
    A server on TLS that requires a client certificate from its own CA.
    """
    running, files = tls_server(tmp_path, "--tls-client-ca", "CA")
    try:
        yield running, files
    finally:
        running.stop()


def test_tls_round_trip(tls: Tuple[RunningServer, TLSFiles]) -> None:
    """
    Over TLS, verified against the CA and the host name, several requests on
    one connection come back right, and pfo3-client does the same through
    a tls: endpoint.
    """
    running, files = tls
    conn = LineSocket(running.port, tls=context(files))
    try:
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        conn.send(b'{"tarea_id": "a", "tipo": "reverse", "contenido": "hola"}\n'
                  b'{"tarea_id": "b", "tipo": "word_count", "contenido": "a b c"}\n')
        replies = {r["tarea_id"]: r["resultado"] for r in conn.read_many(2)}
        assert replies == {"a": "aloh", "b": 3}
    finally:
        conn.close()
    out = cli(files.client_endpoint(running.port))
    assert out.returncode == 0, out.stderr
    assert '"HOLA"' in out.stdout


def test_plaintext_client_fails_cleanly(tls: Tuple[RunningServer, TLSFiles]) -> None:
    """
    A client that sends a plain JSON line to the TLS port gets no reply, only
    the end of the connection (at most a TLS alert record) within seconds;
    a TLS client connected before it keeps working, a new one is served, and
    the server logs no traceback.
    """
    running, files = tls
    bystander = LineSocket(running.port, tls=context(files))
    try:
        plain = LineSocket(running.port)
        plain.send(b'{"tarea_id": "p", "tipo": "uppercase", "contenido": "hola"}\n')
        answer = read_to_end(plain.sock, deadline=10)
        plain.close()
        assert b"estado" not in answer
        assert answer == b"" or answer[:1] == b"\x15", answer  # 0x15: an alert record
        bystander.send_json(REQUEST)
        assert bystander.read_json()["resultado"] == "HOLA"
    finally:
        bystander.close()
    assert_serves(running, files)
    assert running.proc.poll() is None
    assert_clean_log(running)


def test_client_trusting_another_ca_is_refused(
    tls: Tuple[RunningServer, TLSFiles], tmp_path: Path,
) -> None:
    """
    pfo3-client trusting a CA that did not sign the server's certificate
    refuses the server with one [ERROR] line saying the certificate could
    not be verified, exit status 1, and no task reaches the server.
    """
    running, _ = tls
    other = foreign(tmp_path)
    assert_refused(cli(other.client_endpoint(running.port)), "certificate verify failed")
    assert "tarea" not in running.log.read_text()


def test_mtls_refuses_a_client_without_certificate(
    mtls: Tuple[RunningServer, TLSFiles],
) -> None:
    """
    With --tls-client-ca, a client that presents no certificate gets no
    reply: pfo3-client prints one [ERROR] line saying the server wants a
    client certificate and exits 1; a raw TLS client's request is never
    answered; the server then still serves a client with a good
    certificate, and logs no traceback.
    """
    running, files = mtls
    assert f"requires client certificates from {files.ca_dir}" in running.log.read_text()
    assert_refused(cli(files.client_endpoint(running.port)),
                   "exige un certificado de cliente", "certificate=")
    conn = LineSocket(running.port, tls=context(files))
    try:
        conn.send_json(REQUEST)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            conn.read_line()
    finally:
        conn.close()
    assert_serves(running, files, "alice")
    assert "tarea" not in running.log.read_text()
    assert_clean_log(running)


def test_mtls_refuses_a_certificate_from_another_ca(
    mtls: Tuple[RunningServer, TLSFiles], tmp_path: Path,
) -> None:
    """
    With --tls-client-ca, a client certificate signed by another CA (with
    any name in it) is refused: one [ERROR] line, exit status 1, nothing
    run; even with the very name a good client has.
    """
    running, files = mtls
    other = foreign(tmp_path)
    for identity in ("mallory", "alice"):
        other.client(identity)
        theirs = other.client_endpoint(running.port, identity)
        # Trust the server's CA, present the foreign certificate.
        endpoint = theirs.replace(f"trustRoots={other.ca_dir}", f"trustRoots={files.ca_dir}")
        assert_refused(cli(endpoint), "rechazó el certificado de cliente")
    assert "tarea" not in running.log.read_text()
    assert_serves(running, files, "alice")


BLOCKING = """
import sys
from pfo3.client import BlockingClient
with BlockingClient(sys.argv[1], timeout=10) as c:
    print(c.submit("uppercase", "hola")["resultado"])
"""


def test_mtls_serves_a_client_with_a_good_certificate(
    mtls: Tuple[RunningServer, TLSFiles],
) -> None:
    """
    With --tls-client-ca, a client presenting a certificate from that CA is
    served: through pfo3-client's --endpoint with certificate= and
    privateKey=, and through BlockingClient with the same description.
    """
    running, files = mtls
    files.client("alice")
    endpoint = files.client_endpoint(running.port, "alice")
    out = cli(endpoint)
    assert out.returncode == 0, out.stderr
    assert '"HOLA"' in out.stdout
    done = subprocess.run([sys.executable, "-c", BLOCKING, endpoint], capture_output=True,
                          text=True, timeout=60, env=server_env())
    assert done.stdout.strip() == "HOLA", done


HAPROXY_CONFIG = """\
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend pfo3
    bind 127.0.0.1:{front}
    default_backend orchestrators

backend orchestrators
    server s1 127.0.0.1:{port} send-proxy-v2
"""


def test_mtls_behind_a_real_haproxy(tmp_path: Path) -> None:
    """
    Behind a real HAProxy in mode tcp with send-proxy-v2 (the PROXY header
    in clear, then the client's TLS passed through), a haproxy:ssl: port
    with --tls-client-ca serves a client with a good certificate and logs
    the client's own address and port from the header; a client without a
    certificate is refused.
    """
    from .test_haproxy import _haproxy

    (tmp_path / "server-ca").mkdir()
    files = TLSFiles(tmp_path / "server-ca")
    port, front = free_port(), free_port()
    running = start_server(
        tmp_path, "--tls-client-ca", str(files.ca_dir), "--log-tasks", "1", port=port,
        endpoint="haproxy:" + files.endpoint(port))
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(front=front, port=port))
    log = tmp_path / "haproxy.log"
    with log.open("wb") as out:
        haproxy = subprocess.Popen([_haproxy(), "-db", "-f", str(config)], stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for_port(front, proc=haproxy)
        conn = LineSocket(front, tls=context(files, "alice"))
        try:
            client_port = conn.sock.getsockname()[1]
            conn.send_json(REQUEST)
            assert conn.read_json()["resultado"] == "HOLA"
        finally:
            conn.close()
        anonymous = LineSocket(front, tls=context(files))
        try:
            anonymous.send_json({**REQUEST, "tarea_id": "t2"})
            with pytest.raises((ssl.SSLError, ConnectionError)):
                anonymous.read_line()
        finally:
            anonymous.close()
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        running.stop()
    text = running.log.read_text()
    assert f"peer=127.0.0.1:{client_port}" in text, text
    assert "tarea t2" not in text
