"""
Integration test: the README's "TLS in four steps" recipe, run as written.

Each step of the recipe is a fenced block right after an HTML comment
C{<!-- tls-recipe: NAME -->}.  The test runs the blocks in a temporary folder
with the real C{pfo3-certs}, C{twistd}, C{pfo3-client} and C{openssl
s_client}, changing only the port (a free one instead of 9443).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import stat
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from .conftest import ROOT, free_port, shell_env, wait_for_port

pytestmark = pytest.mark.integration

README = ROOT / "README.md"
RECIPE_PORT = "9443"
BLOCK = re.compile(r"<!-- tls-recipe: ([\w-]+) -->\n```\w*\n(.*?)\n```", re.DOTALL)


def recipe() -> Dict[str, str]:
    """
    @return: The README's recipe blocks by name, in the order they appear.
    """
    blocks = dict(BLOCK.findall(README.read_text(encoding="utf-8")))
    assert list(blocks) == ["ca", "server-cert", "server", "client", "s_client",
                            "client-cert", "mtls-server", "mtls-client"], list(blocks)
    return blocks


def read_lines(proc: subprocess.Popen, n: int, deadline: float = 15.0) -> List[bytes]:
    """
    Read C{n} lines from C{proc}'s standard output, failing after
    C{deadline} seconds.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    end = time.monotonic() + deadline
    buf = b""
    while buf.count(b"\n") < n:
        left = end - time.monotonic()
        assert left > 0, f"after {deadline}s only read {buf!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"output ended after {buf!r}"
            buf += chunk
    return buf.splitlines()[:n]


class Recipe:
    """
    The README's blocks, run in one folder against one port.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.blocks = recipe()
        self.port = str(free_port())
        self.env = shell_env()

    def step(self, name: str) -> str:
        return self.blocks[name].replace(RECIPE_PORT, self.port)

    def run(self, name: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-euo", "pipefail", "-c", self.step(name)],
                              cwd=self.folder, env=self.env, capture_output=True, text=True,
                              timeout=60)

    def must_run(self, name: str) -> subprocess.CompletedProcess:
        done = self.run(name)
        assert done.returncode == 0, (name, done.stderr)
        return done

    @contextmanager
    def server(self, name: str) -> Iterator[None]:
        """
        Run the server block C{name} while the body runs; check it then
        shuts down cleanly.
        """
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            server = subprocess.Popen(["bash", "-c", "exec " + self.step(name)],
                                      cwd=self.folder, env=self.env, stdout=out,
                                      stderr=subprocess.STDOUT)
        try:
            try:
                wait_for_port(int(self.port), proc=server)
            except RuntimeError as e:
                raise AssertionError(log.read_text()) from e
            yield
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(5)
        assert "Server Shut Down." in log.read_text(), log.read_text()


def reply_of(done: subprocess.CompletedProcess) -> Dict[str, Any]:
    """
    @return: The reply C{pfo3-client} printed, checked to answer its request.
    """
    printed = json.loads(done.stdout)
    reply: Dict[str, Any] = printed["respuesta"]
    assert reply["tarea_id"] == printed["solicitud"]["tarea_id"]
    return reply


def test_readme_tls_recipe_works_as_written(tmp_path: Path) -> None:
    """
    The README's TLS commands, run in order in an empty folder, make a CA and
    a server certificate whose subjectAltName names localhost and 127.0.0.1,
    with private keys readable by their owner only;
    a C{twistd pfo3} started with the README's command serves TLS with them;
    C{pfo3-client} with the README's C{trustRoots} verifies the certificate
    and prints the right reply; and C{openssl s_client}, with the README's
    options and the README's request line, verifies it and gets exactly the
    reply the README shows.
    """
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is not installed (apt-get install -y openssl)")
    from cryptography import x509

    steps = Recipe(tmp_path)
    steps.must_run("ca")
    steps.must_run("server-cert")
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sorted(p.name for p in (tmp_path / "tls" / "ca").iterdir()) == ["ca.pem"]
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((tmp_path / "tls" / key).stat().st_mode) == 0o600, key

    with steps.server("server"):
        done = steps.must_run("client")
        assert reply_of(done) == {
            "estado": "ok", "resultado": "HOLA TLS",
            "tarea_id": reply_of(done)["tarea_id"], "worker": 0,
        }

        command, *session = steps.step("s_client").splitlines()
        assert command.startswith("$ openssl s_client ")
        requests = [line for line in session if '"estado"' not in line]
        replies = [line for line in session if '"estado"' in line]
        assert len(requests) == len(replies) == 1
        s_client = subprocess.Popen(
            ["bash", "-c", "exec " + command[2:]], cwd=tmp_path, env=steps.env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            assert s_client.stdin is not None
            s_client.stdin.write(requests[0].encode() + b"\n")
            s_client.stdin.flush()
            [reply] = read_lines(s_client, 1)
            assert json.loads(reply) == json.loads(replies[0])
            s_client.stdin.close()
            assert s_client.wait(15) == 0
            assert s_client.stderr is not None
            assert "Verification: OK" in s_client.stderr.read().decode()
        finally:
            if s_client.poll() is None:
                s_client.kill()
                s_client.wait(5)


def test_readme_mutual_tls_recipe_works_as_written(tmp_path: Path) -> None:
    """
    After the CA and server steps, the README's mutual TLS commands make
    alice's certificate (subject CN=alice) and start a server that requires
    one: the README's plain TLS client, which has none, is refused with one
    [ERROR] line and exit status 1, and the README's client with alice's
    certificate gets its reply.
    """
    from cryptography import x509

    steps = Recipe(tmp_path)
    for name in ("ca", "server-cert", "client-cert"):
        steps.must_run(name)
    cert = x509.load_pem_x509_certificate(
        (tmp_path / "tls" / "clients" / "alice.pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=alice"
    with steps.server("mtls-server"):
        refused = steps.run("client")
        assert refused.returncode == 1 and refused.stdout == "", refused
        [line] = refused.stderr.splitlines()
        assert line.startswith("[ERROR] ") and "certificado de cliente" in line, line
        assert reply_of(steps.must_run("mtls-client"))["resultado"] == "HOLA MTLS"
