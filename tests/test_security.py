"""
Integration tests of authentication and abuse limits against a real
C{twistd -n pfo3}: JWT through C{pfo3-client}, netcat and the client library
over TCP, UNIX sockets and TLS; RS256 keys; PROXY headers believed only from
trusted proxies; connection caps and the authentication deadline; refused
tokens closing a connection; UNIX-socket clients and the per-peer limit.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .conftest import (
    ROOT,
    LineSocket,
    TLSFiles,
    free_port,
    handmade_token,
    read_to_end,
    server_env,
    shell_env,
    start_server,
    wait_for_port,
)

pytestmark = pytest.mark.integration

SECRET = "pfo3-test-secret-of-at-least-32-bytes!"


def mint(*args: str) -> str:
    """
    A token from the C{pfo3-token} command.
    """
    out = subprocess.run(
        [sys.executable, "-m", "pfo3.tokens", *args], env=server_env(),
        capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip()


def client(*args: str, token: Optional[str] = None) -> subprocess.CompletedProcess:
    env = server_env()
    env.pop("PFO3_TOKEN", None)
    if token is not None:
        env["PFO3_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "pfo3.cli", *args], env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    return path


def replies(data: bytes) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


def test_open_server_says_so(tmp_path: Path) -> None:
    """
    Without a key the server runs open and its start-up log says so.
    """
    server = start_server(tmp_path)
    try:
        time.sleep(0.2)
        assert "authentication off" in server.log.read_text()
    finally:
        server.stop()


def forge(token: str) -> str:
    """
    C{token} with another signature of the same length.
    """
    head, body, sig = token.split(".")
    return f"{head}.{body}.{sig[::-1] if sig[::-1] != sig else 'A' + sig[1:]}"


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_jwt_through_the_client_command(tmp_path: Path, secret_file: Path, transport: str) -> None:
    """
    With --jwt-secret-file: pfo3-client with PFO3_TOKEN (or --token) gets
    its result; without a token, or with an expired or forged one, it prints
    one [ERROR] line with the code and exits 1.  Neither the secret nor the
    token reach the log.
    """
    sock = tmp_path / "pfo3.sock"
    server = start_server(tmp_path, "--jwt-secret-file", str(secret_file), "--jwt-leeway", "0",
                          unix=sock if transport == "unix" else None)
    where = (["--endpoint", f"unix:path={sock}"] if transport == "unix"
             else ["--port", str(server.port)])
    try:
        token = mint("--sub", "alice", "--secret-file", str(secret_file))
        expired = mint("--sub", "alice", "--secret-file", str(secret_file), "--ttl", "1")
        ok = client(*where, "--tipo", "1", "--contenido", "hola", token=token)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["respuesta"]["resultado"] == "HOLA"
        flag = client(*where, "--tipo", "2", "--contenido", "hola", "--token", token)
        assert json.loads(flag.stdout)["respuesta"]["resultado"] == "aloh"
        time.sleep(2.1)
        for bad, code in ((None, "token_faltante"), (expired, "token_expirado"),
                          (forge(token), "token_invalido")):
            run = client(*where, "--tipo", "1", "--contenido", "hola", token=bad)
            assert refused_with(run, code), (code, run.stdout, run.stderr)
        log = server.log.read_text()
        assert "authentication on" in log
        assert SECRET not in log and token not in log
    finally:
        server.stop()


def test_jwt_piped_through_netcat(tmp_path: Path, secret_file: Path) -> None:
    """
    C{op: auth} then tasks, piped through C{nc -N}: every reply comes back;
    a task sent before authenticating is refused and does not run.
    """
    nc = shutil.which("nc")
    assert nc is not None, "netcat is not installed (apt-get install -y netcat-openbsd)"
    server = start_server(tmp_path, "--jwt-secret-file", str(secret_file))
    try:
        token = mint("--sub", "bob", "--secret-file", str(secret_file), "--tipos", "uppercase")
        lines = [
            {"tarea_id": "antes", "tipo": "1", "contenido": "x"},
            {"op": "auth", "token": token},
            {"tarea_id": "a", "tipo": "mayus", "contenido": "hola"},
            {"tarea_id": "b", "tipo": "reverse", "contenido": "hola"},
            {"op": "estado", "tarea_id": "antes"},
        ]
        piped = "".join(json.dumps(x) + "\n" for x in lines).encode()
        out = subprocess.run([nc, "-N", "127.0.0.1", str(server.port)], input=piped,
                             capture_output=True, timeout=20)
        got = replies(out.stdout)
        assert [r.get("codigo") for r in got] == [
            "token_faltante", None, None, "prohibido", "tarea_desconocida"], got
        assert got[1]["resultado"]["identidad"] == "bob"
        assert got[2]["resultado"] == "HOLA"
    finally:
        server.stop()


def run_task(*where: str, token: Optional[str]) -> subprocess.CompletedProcess:
    return client(*where, "--tipo", "reverse", "--contenido", "abc", token=token)


def refused_with(run: subprocess.CompletedProcess, code: str) -> bool:
    lines = run.stderr.strip().splitlines()
    return run.returncode == 1 and len(lines) == 1 and code in lines[0]


def test_jwt_over_tls(tmp_path: Path, secret_file: Path) -> None:
    """
    Over an ssl: endpoint the client verifies the server, then
    authenticates; a forged token is a refused connection.
    """
    tls = TLSFiles(tmp_path)
    port = free_port()
    server = start_server(tmp_path, "--jwt-secret-file", str(secret_file),
                          port=port, endpoint=tls.endpoint(port))
    where = ("--endpoint", f"tls:localhost:{port}:trustRoots={tls.ca_dir}")
    try:
        token = mint("--sub", "carla", "--secret-file", str(secret_file))
        ok = run_task(*where, token=token)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["respuesta"]["resultado"] == "cba"
        assert refused_with(run_task(*where, token=forge(token)), "token_invalido")
    finally:
        server.stop()


def test_rs256_public_key(tmp_path: Path) -> None:
    """
    With --jwt-public-key (RSA), --jwt-issuer and --jwt-audience: tokens
    signed with the private key for that issuer and audience pass; an HS256
    token whose secret is the public key's text, or one for another
    audience, do not.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = tmp_path / "jwt.key", tmp_path / "jwt.pub"
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    server = start_server(tmp_path, "--jwt-public-key", str(public),
                          "--jwt-issuer", "pfo3-dev", "--jwt-audience", "pfo3")
    where = ("--port", str(server.port))
    try:
        good = mint("--sub", "dana", "--private-key", str(private),
                    "--iss", "pfo3-dev", "--aud", "pfo3")
        ok = run_task(*where, token=good)
        assert ok.returncode == 0, ok.stderr
        claims = {"sub": "dana", "exp": int(time.time()) + 600, "iss": "pfo3-dev", "aud": "pfo3"}
        confused = handmade_token({"alg": "HS256", "typ": "JWT"}, claims, public.read_bytes())
        wrong_aud = mint("--sub", "dana", "--private-key", str(private),
                         "--iss", "pfo3-dev", "--aud", "otro")
        for bad in (confused, wrong_aud):
            assert refused_with(run_task(*where, token=bad), "token_invalido")
    finally:
        server.stop()


def proxied_ping(port: int, source: str) -> LineSocket:
    """
    A connection to a haproxy: port that claims, in a PROXY v1 header, to
    come from C{source}, and sends C{op: ping}.
    """
    s = LineSocket(port)
    s.send(f"PROXY TCP4 {source} 127.0.0.1 40000 {port}\r\n".encode() + b'{"op": "ping"}\n')
    return s


def test_proxy_header_only_from_trusted_proxies(tmp_path: Path) -> None:
    """
    A haproxy: endpoint believes PROXY headers from loopback by default;
    with --proxy-from naming another network, a loopback client is
    disconnected without an answer, and the server goes on serving.
    """
    port = free_port()
    default = start_server(tmp_path, port=port, endpoint=f"haproxy:tcp:{port}:interface=127.0.0.1")
    try:
        s = proxied_ping(port, "198.51.100.7")
        assert s.read_json()["resultado"] == "pong"
        s.close()
    finally:
        default.stop()
    port = free_port()
    strict = start_server(tmp_path, "--proxy-from", "10.0.0.0/8", port=port,
                          endpoint=f"haproxy:tcp:{port}:interface=127.0.0.1")
    try:
        s = proxied_ping(port, "198.51.100.7")
        try:
            assert read_to_end(s.sock) == b""  # closed without a word...
        except ConnectionResetError:
            pass  # ...or reset: either way, nothing answered
        s.close()
        assert "not a trusted proxy" in strict.log.read_text()
    finally:
        strict.stop()


def test_per_address_limit_behind_a_proxy(tmp_path: Path) -> None:
    """
    --max-connections-per-peer counts the address in the PROXY header: a
    second connection claiming the same client is refused, another client
    is served.
    """
    port = free_port()
    server = start_server(tmp_path, "--max-connections-per-peer", "1", port=port,
                          endpoint=f"haproxy:tcp:{port}:interface=127.0.0.1")
    try:
        first = proxied_ping(port, "203.0.113.7")
        assert first.read_json()["resultado"] == "pong"
        second = proxied_ping(port, "203.0.113.7")
        assert replies(read_to_end(second.sock))[0]["codigo"] == "demasiadas_conexiones"
        other = proxied_ping(port, "203.0.113.8")
        assert other.read_json()["resultado"] == "pong"
        for s in (first, second, other):
            s.close()
    finally:
        server.stop()


def test_connection_caps_and_the_authentication_deadline(
    tmp_path: Path, secret_file: Path
) -> None:
    """
    --max-unauthenticated refuses a third silent connection; --auth-timeout
    closes the silent ones with token_faltante; --max-connections refuses
    past the total; an authenticated connection is untouched throughout.
    """
    server = start_server(tmp_path, "--jwt-secret-file", str(secret_file),
                          "--max-unauthenticated", "2", "--auth-timeout", "2",
                          "--max-connections", "4")
    port = server.port
    try:
        token = mint("--sub", "eva", "--secret-file", str(secret_file))
        member = LineSocket(port)
        member.send_json({"op": "auth", "token": token})
        assert member.read_json()["resultado"]["identidad"] == "eva"
        silent = [LineSocket(port), LineSocket(port)]
        time.sleep(0.3)
        third = LineSocket(port)
        assert replies(read_to_end(third.sock))[0]["codigo"] == "demasiadas_conexiones"
        for s in silent:
            got = replies(read_to_end(s.sock, deadline=6))
            assert [r["codigo"] for r in got] == ["token_faltante"], got
        # Room again: four connections in all, the fifth is refused.
        more = [LineSocket(port) for _ in range(3)]
        time.sleep(0.3)
        fifth = LineSocket(port)
        assert replies(read_to_end(fifth.sock))[0]["codigo"] == "demasiadas_conexiones"
        member.send_json({"tipo": "1", "contenido": "sigo"})
        assert member.read_json()["resultado"] == "SIGO"
        for s in [member, third, fifth, *silent, *more]:
            s.close()
    finally:
        server.stop()


def test_client_certificate_is_the_identity(tmp_path: Path, secret_file: Path) -> None:
    """
    With --tls-client-ca and JWT both on, a verified client certificate
    authenticates the connection: its tasks run without a token and are
    recorded under the certificate's subject, which another identity
    cannot read.
    """
    import ssl

    tls = TLSFiles(tmp_path)
    port = free_port()
    server = start_server(tmp_path, "--jwt-secret-file", str(secret_file),
                          "--tls-client-ca", str(tls.ca_dir), "--log-tasks", "1",
                          port=port, endpoint=tls.endpoint(port))
    try:
        tls.client("sensor-7")

        def connect(identity: str) -> LineSocket:
            ctx = ssl.create_default_context(cafile=str(tls.ca))
            cert = tls.client(identity)
            ctx.load_cert_chain(str(cert.cert), str(cert.key))
            return LineSocket(port, tls=ctx)

        conn = connect("sensor-7")
        conn.send_json({"tarea_id": "m1", "tipo": "1", "contenido": "sin token"})
        assert conn.read_json()["resultado"] == "SIN TOKEN"
        conn.send_json({"op": "estado", "tarea_id": "m1"})
        assert conn.read_json()["resultado"]["estado"] == "ok"
        conn.close()
        other = connect("sensor-8")
        other.send_json({"op": "estado", "tarea_id": "m1"})
        assert other.read_json()["codigo"] == "tarea_desconocida"
        other.close()
        time.sleep(0.2)
        assert "identidad=sensor-7" in server.log.read_text()
    finally:
        server.stop()


def test_readme_recipe_runs_as_written(tmp_path: Path) -> None:
    """
    The README's "Authentication in three steps" works as written (only
    the port changed): the secret is private to its owner, the server
    starts with it, and the client's task gets its result with the minted
    token, while the same client without it is refused.
    """
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = dict(re.findall(r"<!-- jwt-recipe: ([\w-]+) -->\n```\w*\n(.*?)\n```", readme,
                             re.DOTALL))
    assert list(blocks) == ["secret", "server", "client"], list(blocks)
    port = str(free_port())
    env = shell_env()

    def on_port(text: str) -> str:
        return text.replace("9000", port).replace("pfo3-client ", f"pfo3-client --port {port} ")

    def sh(text: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-ec", on_port(text)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)

    assert sh(blocks["secret"]).returncode == 0
    assert (tmp_path / "jwt.secret").stat().st_mode & 0o077 == 0
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(["bash", "-ec", "exec " + on_port(blocks["server"])],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(int(port), proc=server)
        done = sh(blocks["client"])
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["respuesta"]["resultado"] == "HOLA JWT"
        without = sh(blocks["client"].splitlines()[-1])
        assert without.returncode == 1 and "token_faltante" in without.stderr
    finally:
        server.terminate()
        server.wait(timeout=15)
        log.close()


def closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """
    @return: Whether the server closed (or reset) C{sock} within
        C{deadline} seconds, whatever it wrote first.
    """
    sock.settimeout(deadline)
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        return False
    except ConnectionResetError:
        pass
    return True


def test_silent_tls_connections_do_not_keep_their_places(
    tmp_path: Path, secret_file: Path
) -> None:
    """
    On an ssl: port with JWT on, raw sockets that never start TLS are
    refused past --max-connections and closed after --auth-timeout all the
    same (a TLS close cannot complete with them, so they are dropped after
    a grace period); then a real client is served.
    """
    import ssl

    tls = TLSFiles(tmp_path)
    port = free_port()
    server = start_server(tmp_path, "--jwt-secret-file", str(secret_file),
                          "--auth-timeout", "1", "--max-connections", "2",
                          port=port, endpoint=tls.endpoint(port))
    try:
        hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        assert all(closed_by_server(h, 8) for h in hogs)
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        s = LineSocket(port, tls=ctx)
        s.send_json({"op": "ping"})
        assert s.read_json()["resultado"] == "pong"
        s.close()
        for h in hogs:
            h.close()
    finally:
        server.stop()


def test_proxy_header_before_tls_only_from_trusted_proxies(tmp_path: Path) -> None:
    """
    On a haproxy:ssl: port (PROXY header in clear, then TLS), a header from
    outside --proxy-from is not believed either: the connection is dropped
    and logged, and no request on it is answered.
    """
    import ssl

    tls = TLSFiles(tmp_path)
    port = free_port()
    server = start_server(tmp_path, "--proxy-from", "10.0.0.0/8", port=port,
                          endpoint="haproxy:" + tls.endpoint(port))
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.sendall(f"PROXY TCP4 198.51.100.7 127.0.0.1 40000 {port}\r\n".encode())
        answer = b""
        try:
            conn = ctx.wrap_socket(raw, server_hostname="localhost")
            conn.sendall(b'{"op": "ping"}\n')
            answer = conn.recv(4096)
        except (ssl.SSLError, OSError):
            pass
        assert answer == b""
        raw.close()
        assert "not a trusted proxy" in server.log.read_text()
    finally:
        server.stop()


def test_refused_tokens_close_the_connection(tmp_path: Path, secret_file: Path) -> None:
    """
    Fifty forged tokens sent at once get five replies, the fifth saying the
    connection closes, and the server closes it; a good connection beside
    it is served.
    """
    server = start_server(tmp_path, "--jwt-secret-file", str(secret_file))
    try:
        other = tmp_path / "other"
        other.write_text("another-secret-of-at-least-32-bytes!!")
        forged = mint("--sub", "eva", "--secret-file", str(other))
        guesser = LineSocket(server.port)
        guesser.send(b"".join(
            json.dumps({"tarea_id": str(i), "tipo": "1", "contenido": "x", "token": forged}
                       ).encode() + b"\n" for i in range(50)))
        got = replies(read_to_end(guesser.sock))
        assert [(r["tarea_id"], r["codigo"]) for r in got] == [
            (str(i), "token_invalido") for i in range(5)]
        assert "se cierra la conexión" in got[-1]["mensaje"]
        member = LineSocket(server.port)
        member.send_json({"tipo": "1", "contenido": "sigo",
                          "token": mint("--sub", "eva", "--secret-file", str(secret_file))})
        assert member.read_json()["resultado"] == "SIGO"
        for s in (guesser, member):
            s.close()
    finally:
        server.stop()


def test_unix_clients_are_not_one_peer(tmp_path: Path) -> None:
    """
    With --max-connections-per-peer 1 on a UNIX socket, where clients have
    no address, several clients are served at once.
    """
    path = tmp_path / "pfo3.sock"
    server = start_server(tmp_path, "--max-connections-per-peer", "1", unix=path)
    try:
        clients = []
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(str(path))
            clients.append(s)
        for i, s in enumerate(clients):
            s.sendall(json.dumps({"tarea_id": str(i), "op": "ping"}).encode() + b"\n")
        for i, s in enumerate(clients):
            reply = json.loads(s.makefile("rb").readline())
            assert (reply["tarea_id"], reply["resultado"]) == (str(i), "pong"), reply
        for s in clients:
            s.close()
    finally:
        server.stop()
