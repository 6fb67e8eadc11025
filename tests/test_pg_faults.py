"""
Integration tests: a real C{twistd pfo3 --store postgresql://...} against a
private PostgreSQL server (L{pfo3.store.pgserver}, on a free loopback port,
never the machine's shared one) that is stopped and started again under
load.

PostgreSQL's binaries missing fails these tests; it never skips them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from pfo3.store import pgserver

from .conftest import LineSocket, free_port, start_server
from .test_pgserver import command_lines_with

pytestmark = pytest.mark.integration


@pytest.fixture
def pg() -> Iterator[pgserver.Server]:
    """
    A private PostgreSQL server with a database C{pfo3}, stopped and removed
    afterwards.  Its folder is outside pytest's (C{/tmp/pytest-of-root} is
    closed to the C{postgres} user PostgreSQL runs as under root).
    """
    directory = Path(tempfile.mkdtemp(prefix="pfo3-pg-"))
    os.chmod(directory, 0o711)
    server = pgserver.Server(directory / "pg", free_port())
    try:
        server.start()
        server.create_database("pfo3")
        yield server
    finally:
        server.stop()
        assert server.processes() == []
        shutil.rmtree(directory)


def query(server: pgserver.Server, sql: str) -> List[Any]:
    with server.connect("pfo3", connect_timeout=5) as conn:
        rows: List[Any] = conn.execute(sql).fetchall()
        return rows


def environment(pid: int) -> str:
    """
    @return: The environment of process C{pid}, one C{NAME=VALUE} a line.
    """
    return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode()


class Load(threading.Thread):
    """
    A small steady load on one connection: batches of four tasks (two
    plain, two background) every 50 ms, each batch's replies read before
    the next; every request and reply kept.
    """

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.conn = LineSocket(port, timeout=30)
        self.sent: List[str] = []
        self.background: List[str] = []
        self.replies: Dict[str, Dict[str, Any]] = {}
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            while not self.stopping.is_set():
                batch = []
                for kind in ("plain", "plain", "bg", "bg"):
                    tid = f"{kind}-{n}"
                    n += 1
                    request: Dict[str, Any] = {"tarea_id": tid, "tipo": "uppercase",
                                               "contenido": tid}
                    if kind == "bg":
                        request["esperar"] = False
                        self.background.append(tid)
                    self.conn.send_json(request)
                    self.sent.append(tid)
                    batch.append(tid)
                for reply in self.conn.read_many(len(batch)):
                    self.replies[reply["tarea_id"]] = reply
                time.sleep(0.05)
        except BaseException as e:  # reported by the test
            self.error = e


def test_bindir_is_the_newest_installed_version(tmp_path: Path) -> None:
    """
    L{pgserver.bindir} picks the C{bin} folder of the highest version
    number (compared as numbers, not strings) that has both C{initdb} and
    C{pg_ctl}, and fails with a message naming the folder when none does.
    """
    for version, programs in (("9.6", ("initdb", "pg_ctl")), ("13", ("initdb", "pg_ctl")),
                              ("16", ("initdb", "pg_ctl")), ("17", ("initdb",)),
                              ("extra", ("initdb", "pg_ctl"))):
        (tmp_path / version / "bin").mkdir(parents=True)
        for program in programs:
            (tmp_path / version / "bin" / program).touch()
    assert pgserver.bindir(tmp_path) == tmp_path / "16" / "bin"
    with pytest.raises(pgserver.PostgreSQLError, match=str(tmp_path / "empty")):
        pgserver.bindir(tmp_path / "empty")


def test_folder_closed_to_postgres(tmp_path: Path) -> None:
    """
    A server in a folder closed to others (under one of mode 0700): run as
    root, where PostgreSQL runs as the C{postgres} user, it is refused
    before C{initdb} with a message naming the folder that lacks o+x; run as
    anyone else, PostgreSQL runs as that user and starts there.
    """
    closed = Path(tempfile.mkdtemp(prefix="pfo3-closed-"))
    server = pgserver.Server(closed / "pg", free_port())
    try:
        os.chmod(closed, 0o700)
        if os.geteuid() == 0:
            assert server.user == pgserver.SYSTEM_USER
            with pytest.raises(pgserver.PostgreSQLError, match=f"missing on: .*{closed}"):
                server.start()
            assert not (closed / "pg" / "data").exists()
        else:
            assert server.user is None
            server.start()
            assert server.pid() is not None
    finally:
        server.stop()
        shutil.rmtree(closed)


def test_postgresql_stop_and_start_under_load(
        tmp_path: Path, pg: pgserver.Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The server reaches PostgreSQL with its URL (no password) and the
    password file in its environment (C{PGPASSFILE}), the password on no
    command line.  PostgreSQL is stopped (C{pg_ctl stop -m fast}: its sessions are ended)
    for three seconds while plain and background tasks keep coming, then
    started again: every task is answered (plain ones ok with their result,
    background ones aceptada), every task's record is in the database
    afterwards, finished ok (the ids compared one by one), and the server
    logged no traceback.
    """
    for name, value in pg.environ.items():
        monkeypatch.setenv(name, value)
    server = start_server(tmp_path, "--store", f"{pg.url}/pfo3")
    try:
        load = Load(server.port)
        load.start()
        time.sleep(1.0)
        secret = pg.passfile.read_text().strip().rsplit(":", 1)[1]
        assert command_lines_with(secret) == []
        assert str(pg.passfile) in environment(server.proc.pid)
        before = len(load.sent)
        pg.stop()
        time.sleep(3.0)
        during = len(load.sent) - before
        pg.start()
        time.sleep(1.0)
        load.stopping.set()
        load.join(30)
        assert not load.is_alive()
        assert load.error is None, load.error
        assert before > 0 and during > 20, (before, during)

        assert set(load.replies) == set(load.sent)
        for tid in load.sent:
            reply = load.replies[tid]
            if tid in load.background:
                assert reply["estado"] == "aceptada", reply
            else:
                assert (reply["estado"], reply["resultado"]) == ("ok", tid.upper()), reply

        rows: List[Any] = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            rows = query(pg, "SELECT tarea_id, estado FROM pfo3_tareas")
            if {t for t, e in rows if e == "ok"} == set(load.sent):
                break
            time.sleep(0.5)
        recorded = dict(rows)
        assert set(recorded) == set(load.sent), sorted(set(load.sent) - set(recorded))[:10]
        assert {t: e for t, e in recorded.items() if e != "ok"} == {}
        load.conn.close()
    finally:
        server.stop()
    log = server.log.read_text()
    first = log.find("Traceback")
    assert first == -1, f"{log.count('Traceback')} tracebacks; the first:\n" + log[
        max(0, first - 300):first + 1500]
    assert "writing failed" in log  # the outage was seen, not missed
