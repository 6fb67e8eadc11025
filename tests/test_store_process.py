"""
The results store in a real C{twistd pfo3}: a task survives a restart as a
record C{op: estado} returns (SQLite and PostgreSQL); a stop waits for
background tasks and writes their records; a database that is unreachable,
or goes away mid-run, never stops tasks from being answered.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict

import pytest

from .conftest import LineSocket, free_port, start_server
from .pgdb import Database, pg_database  # noqa: F401

pytestmark = pytest.mark.integration


def ask(port: int, request: Dict[str, Any]) -> Dict[str, Any]:
    c = LineSocket(port)
    try:
        c.send_json(request)
        return c.read_json()
    finally:
        c.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: Any, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'pfo3.db'}"
    db: Database = request.getfixturevalue("pg_database")
    return db.url


def test_tasks_survive_a_restart(tmp_path: Path, store_url: str) -> None:
    """
    Tasks answered before a restart, and a background task still running
    when SIGTERM came (the stop waits for it), are reported by
    C{op: estado} after the restart; resubmitting the durable one replays
    its reply without running it again.
    """
    server = start_server(tmp_path, "--store", store_url)
    try:
        c = LineSocket(server.port)
        c.send_json({"tarea_id": "p", "tipo": "uppercase", "contenido": "hola"})
        assert c.read_json()["resultado"] == "HOLA"
        c.send_json({"tarea_id": "bg", "tipo": "sleep", "contenido": 1, "esperar": False})
        assert c.read_json() == {"estado": "aceptada", "tarea_id": "bg"}
        c.close()
        time.sleep(0.2)
    finally:
        server.stop()  # SIGTERM: waits for "bg", then flushes
    log = server.log.read_text()
    assert "Traceback" not in log, log

    again = start_server(tmp_path, "--store", store_url, port=free_port())
    try:
        p = ask(again.port, {"op": "estado", "tarea_id": "p"})
        assert p["estado"] == "ok" and p["tarea_id"] == "p"
        assert (p["resultado"]["estado"], p["resultado"]["resultado"]) == ("ok", "HOLA")
        bg = ask(again.port, {"op": "estado", "tarea_id": "bg"})["resultado"]
        assert (bg["estado"], bg["resultado"], bg["tipo"]) == ("ok", "Esperé 1 segundo", "sleep")
        assert bg["aceptada"] <= bg["iniciada"] < bg["terminada"]
        started = time.monotonic()
        replayed = ask(again.port, {"tarea_id": "bg", "tipo": "sleep", "contenido": 1,
                                    "esperar": True})
        assert replayed["resultado"] == "Esperé 1 segundo"
        assert time.monotonic() - started < 0.9  # not run again
        unknown = ask(again.port, {"op": "estado", "tarea_id": "nunca"})
        assert unknown["codigo"] == "tarea_desconocida"
    finally:
        again.stop()


def test_sqlite_on_a_read_only_path(tmp_path: Path) -> None:
    """
    With its SQLite file on a path that cannot be written, the server
    answers every task, logs the failure and stops cleanly.
    """
    server = start_server(tmp_path, "--store", "sqlite:/proc/pfo3-read-only/pfo3.db")
    try:
        c = LineSocket(server.port)
        for i in range(20):
            c.send_json({"tarea_id": f"t{i}", "tipo": "reverse", "contenido": "ab"})
        assert [r["resultado"] for r in c.read_many(20)] == ["ba"] * 20
        c.close()
    finally:
        server.stop()
    log = server.log.read_text()
    assert "creating the schema failed" in log
    assert "could not be written" in log


def test_postgresql_unreachable_from_the_start(tmp_path: Path) -> None:
    """
    A PostgreSQL where nothing listens: tasks are answered, C{op: estado}
    of an unknown task says the store is unavailable, and SIGTERM stops the
    server within its bounds.
    """
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/pfo3"
    server = start_server(tmp_path, "--store", url)
    try:
        c = LineSocket(server.port)
        c.send_json({"tarea_id": "a", "tipo": "word_count", "contenido": "a b c"})
        assert c.read_json()["resultado"] == 3
        c.send_json({"op": "estado", "tarea_id": "a"})  # still queued: answered
        assert c.read_json()["resultado"]["resultado"] == 3
        c.send_json({"op": "estado", "tarea_id": "zz"})
        assert c.read_json()["codigo"] == "almacen_no_disponible"
        c.close()
    finally:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 12


def test_postgresql_goes_away_mid_run(
    tmp_path: Path, pg_database: Database  # noqa: F811
) -> None:
    """
    The database refuses connections (and its sessions are ended) while
    the server runs: tasks keep being answered; once it is back, the
    records of the tasks run meanwhile are written.
    """
    server = start_server(tmp_path, "--store", pg_database.url)
    try:
        c = LineSocket(server.port)
        c.send_json({"tarea_id": "antes", "tipo": "uppercase", "contenido": "a"})
        c.read_json()
        time.sleep(0.3)
        pg_database.refuse_connections()
        try:
            for i in range(50):
                c.send_json({"tarea_id": f"d{i}", "tipo": "uppercase", "contenido": "x"})
            assert [r["resultado"] for r in c.read_many(50)] == ["X"] * 50
            time.sleep(1.0)
        finally:
            pg_database.accept_connections()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = pg_database.query("SELECT count(*) FROM pfo3_tareas")
            if rows == [(51,)]:
                break
            time.sleep(0.2)
        assert rows == [(51,)]
        c.close()
    finally:
        server.stop()
    assert "writing failed" in server.log.read_text()
