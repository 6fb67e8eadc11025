"""
Integration tests: the client refuses a TLS server whose certificate does
not prove the host name it connected to, with a one-line error, both from
C{pfo3-client} and from L{pfo3.client.BlockingClient}.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import pytest

from .conftest import RunningServer, TLSFiles, free_port, server_env, start_server

pytestmark = pytest.mark.integration


def tls_server(tmp_path: Path, san: Optional[List[str]]) -> Tuple[RunningServer, Path]:
    files = TLSFiles(tmp_path, san)
    port = free_port()
    return start_server(tmp_path, port=port, endpoint=files.endpoint(port)), files.ca_dir


@pytest.fixture(params=[None, ["otherhost.example"], ["localhost"]],
                ids=["no-san", "other-name", "right-name"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tuple[str, Any]]:
    running, ca_dir = tls_server(tmp_path, request.param)
    try:
        yield request.node.callspec.id, (running, ca_dir)
    finally:
        running.stop()


def run_cli(port: int, ca_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pfo3.cli", "--endpoint",
         f"tls:localhost:{port}:trustRoots={ca_dir}", "--tipo", "uppercase",
         "--contenido", "hola"],
        capture_output=True, text=True, timeout=30, env=server_env())


def test_cli_verifies_the_host_name(server: Tuple[str, Tuple[RunningServer, Path]]) -> None:
    """
    pfo3-client over TLS: a certificate without subjectAltName, or for
    another name, is refused with exactly one '[ERROR]' line that says the
    server's identity could not be verified, and exit status 1; the right
    certificate works.
    """
    case, (running, ca_dir) = server
    out = run_cli(running.port, ca_dir)
    if case == "right-name":
        assert out.returncode == 0, out.stderr
        assert '"HOLA"' in out.stdout
        return
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[ERROR]"), out.stderr
    assert "identidad del servidor" in lines[0], lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""


BLOCKING = """
import sys
from pfo3.client import BlockingClient
try:
    with BlockingClient(sys.argv[1], timeout=10) as c:
        print("OK", c.submit("uppercase", "hola")["resultado"])
except Exception as e:
    print("FAILED", type(e).__name__, e)
"""


def test_blocking_client_verifies_the_host_name(
    server: Tuple[str, Tuple[RunningServer, Path]],
) -> None:
    """
    BlockingClient over TLS raises on a certificate that does not prove the
    host name (before any request is sent), and works with the right one.
    """
    case, (running, ca_dir) = server
    out = subprocess.run(
        [sys.executable, "-c", BLOCKING, f"tls:localhost:{running.port}:trustRoots={ca_dir}"],
        capture_output=True, text=True, timeout=30, env=server_env())
    if case == "right-name":
        assert out.stdout.strip() == "OK HOLA", out
    else:
        assert out.stdout.startswith("FAILED "), out
        assert "no se pudo verificar la identidad del servidor" in out.stdout, out
    log = running.log.read_text()
    assert "tarea" not in log or case == "right-name"
