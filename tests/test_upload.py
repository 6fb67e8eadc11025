"""
C{pfo3-client --contenido-archivo} and C{--resultado-archivo}: their
options, the progress bar, and the streamed HTTP transfers against a real
local HTTP server (the end-to-end runs are in L{tests.test_blobs_e2e}).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
from pathlib import Path
from typing import Any, Iterator, List

import pytest
from twisted.python import usage

from pfo3.cli import Options
from pfo3.client import ClientError
from pfo3.upload import Progress, get_file, put_file


@pytest.mark.parametrize("argv", [
    ["--contenido-archivo", "/nonexistent", "--tipo", "1"],
    ["--contenido-archivo", "{f}"],
    ["--contenido-archivo", "{f}", "--tipo", "1", "--contenido", "x"],
    ["--contenido-archivo", "{f}", "--batch"],
    ["--resultado-archivo", "out"],
])
def test_bad_options(argv: List[str], tmp_path: Path) -> None:
    """
    A missing file, no C{--tipo}, C{--contenido} or C{--batch} with it, or
    C{--resultado-archivo} alone, are usage errors.
    """
    f = tmp_path / "a.txt"
    f.write_text("x")
    with pytest.raises(usage.UsageError):
        Options().parseOptions([a.replace("{f}", str(f)) for a in argv])


def test_good_options(tmp_path: Path) -> None:
    """
    C{--tipo} with C{--contenido-archivo} (and C{--resultado-archivo}) parse.
    """
    f = tmp_path / "a.txt"
    f.write_text("x")
    o = Options()
    o.parseOptions(["--tipo", "uppercase", "--contenido-archivo", str(f),
                    "--resultado-archivo", str(tmp_path / "r")])
    assert o["contenido-archivo"] == str(f)


def test_progress_bar() -> None:
    """
    The bar shows the share done and the megabytes, and ends its line when
    done; without a terminal it writes nothing.
    """
    out = io.StringIO()
    p = Progress(out, "subiendo", 2_000_000)
    p(2_000_000)
    text = out.getvalue()
    assert "100.0%" in text and "2.0/2.0 MB" in text and text.endswith("\n")
    Progress(None, "x", 10)(10)


class _Handler(http.server.BaseHTTPRequestHandler):
    store: dict = {}

    def do_PUT(self) -> None:  # noqa: N802
        n = int(self.headers["Content-Length"])
        self.store[self.path] = self.rfile.read(n)
        self.send_response(200 if "deny" not in self.path else 403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        data = self.store.get(self.path)
        self.send_response(200 if data is not None else 404)
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.integration
def test_put_and_get_stream(http_url: str, tmp_path: Path) -> None:
    """
    L{put_file} sends a file with its length and reports its SHA-256 and
    progress; L{get_file} writes a download into a file with its SHA-256; a
    refusal is a L{ClientError} naming the HTTP status.
    """
    src = tmp_path / "a.bin"
    data = bytes(range(256)) * 20_000
    src.write_bytes(data)
    seen: List[int] = []
    size, digest = put_file(http_url + "/obj?firma=1", str(src), seen.append)
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert seen[-1] == len(data)
    dst = tmp_path / "b.bin"
    assert get_file(http_url + "/obj?firma=1", str(dst), len(data), lambda n: None) == (
        len(data), digest)
    assert dst.read_bytes() == data
    with pytest.raises(ClientError, match="403"):
        put_file(http_url + "/deny", str(src), lambda n: None)
    with pytest.raises(ClientError, match="404"):
        get_file(http_url + "/nada", str(dst), 0, lambda n: None)
