"""
The baseline: the seed prototype's architecture, rewritten for the benchmark.

The prototype pfo3 grew from ran each connection in its own thread and its
tasks on a fixed pool of worker threads fed by one shared C{queue.Queue}:

  - the main thread accepts and starts a thread per connection;
  - a connection thread reads one line, validates it, puts C{(task,
    reply_queue)} on the shared queue and blocks on its reply queue until the
    answer arrives; only then does it write the reply and read the next line;
  - four worker threads loop on C{get(timeout=0.5)} (so they notice a stop
    request), run the task (a sleep blocks its worker) and put the reply on
    the task's reply queue, naming themselves 1 to 4 in C{worker}.

It speaks the same JSON-lines protocol and task types (names, codes and
aliases) as pfo3, so the same load runs against both.

    python benchmarks/seed_server.py --port 9200
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import threading
import time
from typing import Any, Dict, Optional, Tuple

WORKERS = 4
TAKE_TIMEOUT = 0.5

ALIASES: Dict[str, str] = {}
for _name, _code, _aliases in (
    ("uppercase", "1", ("mayus", "upper")),
    ("reverse", "2", ("invertir", "reversa")),
    ("word_count", "3", ("contar", "palabras")),
    ("sleep", "4", ("espera", "delay")),
):
    for _key in (_name, _code, *_aliases):
        ALIASES[_key] = _name

Job = Tuple[Dict[str, Any], "queue.Queue[Dict[str, Any]]"]


def run_task(name: str, contenido: Any) -> Any:
    """
    Compute one task in the calling worker thread.
    """
    if name == "uppercase":
        return str(contenido).upper()
    if name == "reverse":
        return str(contenido)[::-1]
    if name == "word_count":
        return len(str(contenido).split())
    seconds = float(contenido)
    time.sleep(seconds)
    return f"Esperé {seconds:g} segundos"


def worker(number: int, jobs: queue.Queue[Job], stop: threading.Event) -> None:
    """
    Take jobs from the shared queue until told to stop.
    """
    while not stop.is_set():
        try:
            task, replies = jobs.get(timeout=TAKE_TIMEOUT)
        except queue.Empty:
            continue
        try:
            result = run_task(task["tipo"], task["contenido"])
            reply = {"estado": "ok", "resultado": result,
                     "tarea_id": task["tarea_id"], "worker": number}
        except Exception as e:
            reply = {"estado": "error", "mensaje": f"La tarea falló: {e}",
                     "codigo": "tarea_fallida", "tarea_id": task["tarea_id"]}
        replies.put(reply)


def validate(line: bytes) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """
    @return: C{(task, None)} for a valid request, C{(None, error_reply)}
        otherwise.
    """
    try:
        req = json.loads(line)
    except ValueError:
        return None, {"estado": "error", "mensaje": "JSON inválido.",
                      "codigo": "json_invalido", "tarea_id": None}
    if not isinstance(req, dict):
        return None, {"estado": "error", "mensaje": "Se esperaba un objeto JSON.",
                      "codigo": "no_es_objeto", "tarea_id": None}
    tarea_id = req.get("tarea_id") or f"{threading.get_ident()}-{time.monotonic_ns()}"
    if req.get("op") == "ping":
        return None, {"estado": "ok", "resultado": "pong"}
    name = ALIASES.get(str(req.get("tipo", "")).strip().lower())
    if name is None:
        return None, {"estado": "error", "mensaje": f"Tipo desconocido: {req.get('tipo')!r}.",
                      "codigo": "tipo_desconocido", "tarea_id": tarea_id}
    if "contenido" not in req:
        return None, {"estado": "error", "mensaje": "Falta 'contenido'.",
                      "codigo": "contenido_faltante", "tarea_id": tarea_id}
    return {"tarea_id": tarea_id, "tipo": name, "contenido": req["contenido"]}, None


def serve_connection(conn: socket.socket, jobs: queue.Queue[Job]) -> None:
    """
    One connection's thread: a line, its reply, the next line.
    """
    replies: queue.Queue[Dict[str, Any]] = queue.Queue()
    with conn, conn.makefile("rb") as reader:
        for line in reader:
            if not line.strip():
                continue
            task, reply = validate(line)
            if task is not None:
                jobs.put((task, replies))
                reply = replies.get()
            try:
                conn.sendall((json.dumps(reply, ensure_ascii=False) + "\n").encode())
            except OSError:
                return


def serve(host: str, port: int) -> None:
    """
    Accept forever, a thread per connection.
    """
    jobs: queue.Queue[Job] = queue.Queue()
    stop = threading.Event()
    for n in range(1, WORKERS + 1):
        threading.Thread(target=worker, args=(n, jobs, stop), daemon=True).start()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4096)
    try:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve_connection, args=(conn, jobs), daemon=True).start()
    finally:
        stop.set()
        listener.close()


def main() -> None:
    """
    Command line: C{--host}, C{--port}.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    args = parser.parse_args()
    try:
        serve(args.host, args.port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
