"""
Large payloads end to end, on real processes: SeaweedFS's S3 (checking
signatures, see L{tests.s3server}), C{twistd pfo3} with C{--blobs s3://...}
and C{pfo3-client --contenido-archivo}; in distributed mode with the real
RabbitMQ on 127.0.0.1:5672 and a real C{twistd pfo3-worker}, a 50 MB content
goes client → storage → worker → storage → client with its SHA-256 intact
while the orchestrator's memory does not grow by the payload.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from .conftest import LineSocket, free_port, server_env, wait_for_port
from .s3server import S3Server, s3_server  # noqa: F401
from .test_distributed import Cluster, _blocking_channel

pytestmark = pytest.mark.integration

CLIENT = str(Path(sys.executable).parent / "pfo3-client")


class BlobCluster(Cluster):
    """
    L{Cluster}, its processes holding the storage's credentials in their
    environment (as an operator gives them), never on their command line.
    """

    def __init__(self, tmp_path: Path, s3: S3Server) -> None:
        super().__init__(tmp_path)
        self.s3 = s3
        self.credentials: Dict[str, str] = {}

    def _start(self, args: List[str], log: Path) -> subprocess.Popen:
        env = server_env()
        env.update(self.s3.env(**self.credentials))
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", *args],
            cwd=self.tmp, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def local_server(self, *extra: str) -> Tuple[int, subprocess.Popen]:
        port = free_port()
        proc = self._start(["pfo3", "--port", f"tcp:{port}:interface=127.0.0.1", *extra],
                           self.tmp / "local.log")
        wait_for_port(port, proc=proc)
        return port, proc


@pytest.fixture
def blob_cluster(tmp_path: Path, s3_server: S3Server) -> Iterator[BlobCluster]:  # noqa: F811
    c = BlobCluster(tmp_path, s3_server)
    try:
        yield c
    finally:
        c.stop()


def make_text(path: Path, size: int) -> Tuple[int, str]:
    """
    Write C{size} bytes of words into C{path}, in chunks.

    @return: The number of words and the SHA-256 of the text upper-cased.
    """
    word = b"palabra "
    chunk = word * (1 << 17)  # 1 MiB
    h = hashlib.sha256()
    written = 0
    with path.open("wb") as f:
        while written < size:
            piece = chunk[: size - written]
            f.write(piece)
            h.update(piece.upper())
            written += len(piece)
    return size // len(word), h.hexdigest()


def client(port: int, *args: str, env: Dict[str, str] | None = None) -> Dict:
    out = subprocess.run(
        [CLIENT, "--port", str(port), "--timeout", "120", *args],
        capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr + out.stdout
    return json.loads(out.stdout)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_client_uploads_a_file_local_mode(blob_cluster: BlobCluster, tmp_path: Path) -> None:
    """
    C{pfo3-client --contenido-archivo} uploads a file with the presigned
    URL of C{op: subir} and runs the task on it; with
    C{--resultado-archivo} a large result comes back as C{resultado_ref} and
    is downloaded with its SHA-256 checked.  The server's credentials come
    from its environment only; the client needs none.
    """
    port, _ = blob_cluster.local_server("--blobs", blob_cluster.s3.url,
                                        "--blob-threshold", "1000")
    src = tmp_path / "texto.txt"
    words, upper = make_text(src, 3_000_000)
    doc = client(port, "--tipo", "word_count", "--contenido-archivo", str(src))
    assert doc["respuesta"]["resultado"] == words
    assert doc["solicitud"]["bytes"] == 3_000_000
    out = tmp_path / "resultado.txt"
    doc = client(port, "--tipo", "uppercase", "--contenido-archivo", str(src),
                 "--resultado-archivo", str(out))
    ref = doc["respuesta"]["resultado_ref"]
    assert (ref["bytes"], ref["sha256"]) == (3_000_000, upper)
    assert doc["resultado_archivo"]["sha256"] == upper
    assert hashlib.sha256(out.read_bytes()).hexdigest() == upper


def test_50_mb_end_to_end_distributed(blob_cluster: BlobCluster, tmp_path: Path) -> None:
    """
    Distributed mode: a 50 MB content goes client → S3 → worker → S3 →
    client with the SHA-256 of the result intact, only references travel
    through RabbitMQ, and the orchestrator's resident memory does not grow
    by the payload (it grows by less than a fifth of it).
    """
    _blocking_channel()[0].close()
    url = blob_cluster.s3.url
    port = blob_cluster.orchestrator("--blobs", url, "--timeout", "120")
    blob_cluster.worker("w1", "--blobs", url, "--timeout", "120")
    orch = blob_cluster.procs[0]
    size = 50_000_000
    src = tmp_path / "grande.txt"
    words, upper = make_text(src, size)
    # Warm up (imports, connections, the worker's storage), then measure.
    small = tmp_path / "corto.txt"
    small.write_text("hola")
    assert client(port, "--tipo", "uppercase", "--contenido-archivo",
                  str(small))["respuesta"]["resultado"] == "HOLA"
    before = rss_kib(orch.pid)
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(orch.pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = tmp_path / "resultado.txt"
    started = time.monotonic()
    try:
        doc = client(port, "--tipo", "uppercase", "--contenido-archivo", str(src),
                     "--resultado-archivo", str(out))
    finally:
        done.set()
        watcher.join()
    seconds = time.monotonic() - started
    ref = doc["respuesta"]["resultado_ref"]
    assert (ref["bytes"], ref["sha256"]) == (size, upper)
    assert doc["respuesta"]["worker"].startswith("w1/")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == upper
    grown = (peak[0] - before) * 1024
    print(f"\n50 MB end to end (upload, uppercase on the worker, download): {seconds:.2f} s, "
          f"{size / 1e6 / seconds:.1f} MB/s of content ({4 * size / 1e6 / seconds:.1f} MB/s "
          f"moved to and from the storage); orchestrator RSS {before / 1024:.1f} "
          f"MiB before, {peak[0] / 1024:.1f} MiB peak (+{grown / 1e6:.2f} MB); upload "
          f"{doc['solicitud']['segundos_subida']:.2f} s")
    assert grown < size / 5, f"orchestrator RSS grew by {grown} bytes"
    doc = client(port, "--tipo", "word_count", "--contenido-archivo", str(src))
    assert doc["respuesta"]["resultado"] == words


def test_storage_down_and_wrong_credentials(blob_cluster: BlobCluster, tmp_path: Path) -> None:
    """
    A real server whose storage is down still answers C{subir} (presigning
    needs no request to the storage), answers a reference task with
    C{almacen_objetos_no_disponible} and keeps serving; one
    started with a wrong secret key hands out upload URLs (presigning is
    local) that the storage refuses, and answers a reference task with
    C{almacen_objetos_denegado}.
    """
    dead = f"s3://{blob_cluster.s3.bucket}?endpoint=http://127.0.0.1:{free_port()}"
    port, _ = blob_cluster.local_server("--blobs", dead)
    sock = LineSocket(port)
    try:
        sock.send_json({"op": "subir", "bytes": 10, "tarea_id": "s"})
        sock.send_json({"tipo": "uppercase", "contenido_ref": "u" + "0" * 32,
                        "tarea_id": "t"})
        sock.send_json({"tipo": "uppercase", "contenido": "sigo", "tarea_id": "p"})
        got = {r["tarea_id"]: r for r in sock.read_many(3)}
    finally:
        sock.close()
    assert got["s"]["resultado"]["url"].startswith(f"http://127.0.0.1:{dead.rsplit(':', 1)[1]}/")
    assert got["t"]["codigo"] == "almacen_objetos_no_disponible"
    assert got["p"]["resultado"] == "SIGO"

    blob_cluster.credentials = {"secret": "not-the-secret"}
    port, _ = blob_cluster.local_server("--blobs", blob_cluster.s3.url)
    sock = LineSocket(port)
    try:
        sock.send_json({"op": "subir", "bytes": 4, "tarea_id": "s"})
        slot = sock.read_json()["resultado"]
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(slot["url"], data=b"hola",
                                                          method="PUT"))
        assert info.value.code == 403
        sock.send_json({"tipo": "uppercase", "contenido_ref": slot["ref"], "tarea_id": "t"})
        reply = sock.read_json()
    finally:
        sock.close()
    assert reply["codigo"] == "almacen_objetos_denegado"


def test_readme_s3_recipe_runs_as_written(tmp_path: Path) -> None:
    """
    The README's "large word count in three commands" works as written (the
    storage on its default ports, in a folder of the test's; pfo3 on a free
    port): the word count of a 2.4 MB file comes back through S3.
    """
    import re
    import shutil

    from .conftest import ROOT, shell_env

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- s3-recipe -->\n```bash\n(.*?)\n```", readme, re.DOTALL)
    assert block is not None
    lines = block.group(1).splitlines()
    assert len(lines) == 4 and lines[1].startswith("weed mini ")
    for busy in (8333, 9333, 8888):
        try:
            wait_for_port(busy, deadline=0.2)
        except RuntimeError:
            continue
        pytest.fail(f"port {busy}, which the recipe's storage takes, is in use")
    port = str(free_port())
    data = tmp_path / "data"
    script = "\n".join([
        lines[0],
        lines[1].replace("/tmp/pfo3-s3", str(data)).replace(" &", " > weed.log 2>&1 &"),
        "for i in $(seq 120); do (exec 3<>/dev/tcp/127.0.0.1/8333) 2>/dev/null && break; "
        "sleep 0.25; done",
        lines[2].replace("pfo3 --blobs", f"pfo3 --port tcp:{port} --blobs")
        .replace(" &", " > pfo3.log 2>&1 &"),
        f"for i in $(seq 120); do (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && break; "
        "sleep 0.25; done",
        "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT",
        lines[3].replace("pfo3-client ", f"pfo3-client --port {port} "),
    ])
    (tmp_path / "libro.txt").write_text(" ".join(["palabra"] * 300_000))
    env = shell_env()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name, None)
    try:
        done = subprocess.run(["bash", "-ec", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    assert done.returncode == 0, (done.stderr, (tmp_path / "weed.log").read_text()[-2000:])
    assert json.loads(done.stdout)["respuesta"]["resultado"] == 300_000
