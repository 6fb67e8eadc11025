"""
Large contents from C{pfo3-client}: C{--contenido-archivo PATH} uploads a
file straight to the server's object storage with the presigned URL of
C{op: subir}, streamed, then sends the task with its reference;
C{--resultado-archivo PATH} asks for a result reference and downloads the
result into PATH, checking its SHA-256 (C{docs/blobs.md}).

The HTTP transfers are blocking (C{http.client}, in chunks, never the whole
file in memory) and run on a thread, with a progress bar on stderr when it
is a terminal.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import uuid
from typing import IO, Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from twisted.internet.defer import TimeoutError
from twisted.python import usage

from pfo3.client import ClientError, TaskClient, explain
from pfo3.errors import Pfo3Error, error_reply

#: Bytes sent or received per write/read.
CHUNK = 1 << 20

UPLOAD_PARAMETERS: List[List[Any]] = [
    ["contenido-archivo", None, None,
     "Send this file as the task's content through the server's object storage "
     "(op 'subir', then an HTTP PUT straight to the storage, then the task with its "
     "reference). Needs --tipo and a server with --blobs s3://..."],
    ["resultado-archivo", None, None,
     "Ask for a large result as a reference (\"refs\": true) and download it into this "
     "file, checking its SHA-256."],
]


def check_upload_options(options: usage.Options) -> None:
    """
    Validate the upload options (in C{postOptions}).
    """
    path = options["contenido-archivo"]
    if path is None:
        if options["resultado-archivo"] is not None:
            raise usage.UsageError("--resultado-archivo needs --contenido-archivo")
        return
    if options["contenido"] is not None:
        raise usage.UsageError("--contenido-archivo cannot be used with --contenido")
    if options["batch"]:
        raise usage.UsageError("--contenido-archivo cannot be used with --batch")
    if options["tipo"] is None:
        raise usage.UsageError("--contenido-archivo needs --tipo")
    if not os.path.isfile(path):
        raise usage.UsageError(f"--contenido-archivo: {path!r} is not a readable file")


class Progress:
    """
    A one-line progress bar, redrawn at most ten times a second.
    """

    def __init__(self, stream: Optional[IO[str]], label: str, total: int) -> None:
        self.stream = stream
        self.label = label
        self.total = total
        self.started = time.monotonic()
        self._drawn = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.stream is None or (now - self._drawn < 0.1 and done < self.total):
            return
        self._drawn = now
        share = done / self.total if self.total else 1.0
        width = 30
        bar = "#" * int(share * width)
        speed = done / max(now - self.started, 1e-6) / 1e6
        self.stream.write(f"\r{self.label} [{bar:<{width}}] {share:6.1%} "
                          f"{done / 1e6:8.1f}/{self.total / 1e6:.1f} MB {speed:7.1f} MB/s")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def _connection(url: str) -> Tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientError(f"URL de almacén no soportada: {parts.scheme}://")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=60)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return conn, target


def put_file(url: str, path: str, progress: Callable[[int], None]) -> Tuple[int, str]:
    """
    Upload a file with an HTTP C{PUT}, in chunks (blocking).

    @return: Its size and hex SHA-256.
    @raise ClientError: when the storage refuses it.
    """
    size = os.path.getsize(path)
    conn, target = _connection(url)
    h = hashlib.sha256()
    try:
        conn.putrequest("PUT", target, skip_accept_encoding=True)
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        sent = 0
        with open(path, "rb") as f:
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                conn.send(chunk)
                h.update(chunk)
                sent += len(chunk)
                progress(sent)
        response = conn.getresponse()
        body = response.read(2000)
        if response.status >= 300:
            raise ClientError(f"El almacén de objetos rechazó la subida: HTTP {response.status} "
                              f"{body[:300].decode('utf-8', 'replace')}")
    except OSError as e:
        raise ClientError(f"No se pudo subir el archivo al almacén de objetos: {e}") from e
    finally:
        conn.close()
    return size, h.hexdigest()


def get_file(url: str, path: str, total: int,
             progress: Callable[[int], None]) -> Tuple[int, str]:
    """
    Download a URL into a file, in chunks (blocking).

    @return: The size and hex SHA-256 of what was written.
    """
    conn, target = _connection(url)
    h = hashlib.sha256()
    size = 0
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        if response.status != 200:
            raise ClientError(f"El almacén de objetos no entregó el resultado: HTTP "
                              f"{response.status}")
        with open(path, "wb") as out:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                h.update(chunk)
                size += len(chunk)
                progress(size)
    except OSError as e:
        raise ClientError(f"No se pudo descargar el resultado: {e}") from e
    finally:
        conn.close()
    return size, h.hexdigest()


async def run_upload(options: usage.Options, console: Any, client: TaskClient,
                     where: Tuple[Any, Any]) -> int:
    """
    C{pfo3-client --contenido-archivo PATH}: upload, submit, print the
    reply (and download the result with C{--resultado-archivo}).

    @return: The exit status.
    """
    timeout = options["timeout"]
    path = options["contenido-archivo"]
    result_path = options["resultado-archivo"]
    tarea_id = options["tarea-id"] or str(uuid.uuid4())
    tty = console.stderr if _isatty(console.stderr) else None
    size = os.path.getsize(path)
    document: Dict[str, Any] = {"servidor": where[0], "puerto": where[1]}
    try:
        slot = await client.upload_slot(size, timeout)
        started = time.monotonic()
        sent, digest = await console.in_thread(
            put_file, slot["url"], path, Progress(tty, "subiendo", size))
        upload_seconds = time.monotonic() - started
        respuesta = await client.submit_ref(options["tipo"], slot["ref"], tarea_id, timeout,
                                            refs=result_path is not None)
        problem = None
    except Pfo3Error as e:
        if e.tarea_id != tarea_id:
            console.error(explain(e))
            return 1
        respuesta = error_reply(e)
        problem = explain(e)
    except (ClientError, TimeoutError) as e:
        console.error(explain(e))
        return 1
    document["solicitud"] = {"tarea_id": tarea_id, "tipo": options["tipo"],
                             "contenido_ref": slot["ref"], "contenido_archivo": path,
                             "bytes": sent, "sha256": digest,
                             "segundos_subida": round(upload_seconds, 3)}
    document["respuesta"] = respuesta
    ref = respuesta.get("resultado_ref") if problem is None else None
    if result_path is not None and problem is None:
        try:
            if ref is not None:
                if not ref.get("url"):
                    raise ClientError("El almacén de objetos del servidor no da URLs de "
                                      "descarga (--blobs memory: o file:).")
                got, got_digest = await console.in_thread(
                    get_file, ref["url"], result_path, int(ref["bytes"]),
                    Progress(tty, "bajando ", int(ref["bytes"])))
                if ref.get("sha256") and got_digest != ref["sha256"]:
                    raise ClientError(f"El resultado descargado no coincide con su SHA-256 "
                                      f"({got_digest} != {ref['sha256']}).")
            else:
                # A short result came inline: write it out all the same.
                data = _as_text(respuesta.get("resultado")).encode("utf-8")
                with open(result_path, "wb") as out:
                    out.write(data)
                got, got_digest = len(data), hashlib.sha256(data).hexdigest()
            document["resultado_archivo"] = {"ruta": result_path, "bytes": got,
                                             "sha256": got_digest}
        except ClientError as e:
            console.error(explain(e))
            return 1
    import json

    try:
        console.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        console.stdout.flush()
    except OSError:
        return 1
    if problem is not None:
        console.error(problem)
        return 1
    return 0


def _as_text(resultado: Any) -> str:
    import json

    return resultado if isinstance(resultado, str) else json.dumps(resultado,
                                                                   ensure_ascii=False)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False
