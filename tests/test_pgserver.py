"""
Integration tests of L{pfo3.store.pgserver}: a private PostgreSQL server
(on a free loopback port, never the machine's shared one) admits only a
client with its password file, keeps its password off every command line,
refuses a folder created with trust authentication, and takes a
C{postmaster.pid} naming an unrelated live process for what it is.

PostgreSQL's binaries missing fails these tests; it never skips them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, List

import psycopg
import pytest

from pfo3.store import pgserver

from .conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def folder() -> Iterator[Path]:
    """
    A folder for a server, outside pytest's (C{/tmp/pytest-of-root} is
    closed to the C{postgres} user PostgreSQL runs as under root).
    """
    directory = Path(tempfile.mkdtemp(prefix="pfo3-pgs-"))
    os.chmod(directory, 0o711)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def server(folder: Path) -> Iterator[pgserver.Server]:
    """
    A private PostgreSQL server, running; stopped afterwards.
    """
    pg = pgserver.Server(folder / "pg", free_port())
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()
        assert pg.processes() == []


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """
    An unrelated process (C{sleep 60} in a session of its own), killed
    afterwards.
    """
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def password(pg: pgserver.Server) -> str:
    """
    @return: The server's password, read from its password file.
    """
    host, port, database, user, secret = pg.passfile.read_text().strip().split(":")
    assert (host, port, database, user) == ("127.0.0.1", str(pg.port), "*", "postgres")
    return secret


def command_lines_with(text: str) -> List[str]:
    """
    @return: The command lines of every process of the machine that
        contain C{text}.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(f"{entry.name}: {cmdline!r}")
    return found


def test_password_file_required(server: pgserver.Server) -> None:
    """
    A client without the server's password file is refused (SCRAM on
    loopback, no trust); one with it, as a C{passfile} argument or as
    C{PGPASSFILE} in the environment of C{psql}, is let in.  The password
    file is its client's alone (mode 0600), the file that gave C{initdb} the
    password is gone, and the password is on no command line, the server's
    processes' included.
    """
    secret = password(server)
    assert len(secret) >= 32
    assert os.stat(server.passfile).st_mode & 0o777 == 0o600
    assert os.stat(server.passfile).st_uid == os.geteuid()
    assert sorted(p.name for p in server.directory.iterdir()) == [
        "data", "pgpass", "postgresql.log"]
    assert "pgpass" not in server.url and secret not in server.url

    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"{server.url}/postgres", connect_timeout=5,
                        passfile=str(server.directory / "missing"))
    with server.connect(connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)

    psql = str(server.binaries / "psql")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["HOME"] = str(server.directory)  # no ~/.pgpass of this user's
    refused = subprocess.run([psql, "-w", f"{server.url}/postgres", "-Atc", "SELECT 1"],
                             env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "password" in refused.stderr, refused
    admitted = subprocess.run([psql, "-w", f"{server.url}/postgres", "-Atc", "SELECT 1"],
                              env={**env, **server.environ}, capture_output=True,
                              text=True, timeout=30)
    assert (admitted.returncode, admitted.stdout) == (0, "1\n"), admitted

    assert len(server.processes()) > 1
    assert command_lines_with(secret) == []


def test_trust_folder_refused(folder: Path) -> None:
    """
    A folder whose cluster was created with trust authentication (as this
    module once did) is refused with a message saying so and what to do;
    it is not started, nor changed.
    """
    pg = pgserver.Server(folder / "pg", free_port())
    pg.directory.mkdir()
    if pg.user is not None:
        pg._own()
    out = pg._run("initdb", "-D", str(pg.data), "-U", "postgres", "--auth=trust",
                  "--no-sync")
    assert out.returncode == 0, out.stderr
    with (pg.data / "postgresql.conf").open("a") as f:  # never the shared port
        f.write(pgserver._SETTINGS.format(port=pg.port))
    hba = (pg.data / "pg_hba.conf").read_text()
    with pytest.raises(pgserver.PostgreSQLError,
                       match=f"trust authentication.*remove {pg.directory}"):
        pg.start()
    assert pg.pid() is None and pg.processes() == []
    assert not pg.passfile.exists()
    assert (pg.data / "pg_hba.conf").read_text() == hba


def test_lost_password_file_refused(server: pgserver.Server) -> None:
    """
    A cluster whose password file is gone is refused with a message naming
    it, not started with no way in.
    """
    server.stop()
    server.passfile.unlink()
    with pytest.raises(pgserver.PostgreSQLError, match=f"{server.passfile} is missing"):
        server.start()
    assert server.pid() is None


def test_stale_pid_of_an_unrelated_process(
        server: pgserver.Server, sleeper: subprocess.Popen) -> None:
    """
    A C{postmaster.pid} left behind that names a live process which is not
    a server of this folder (here a C{sleep}): the server is not taken for
    running, C{stop} leaves that process alone, and C{start} really starts
    the server.
    """
    real = server.pid()
    assert real is not None and real in server.processes()
    server.stop()
    lock = server.data / "postmaster.pid"
    lock.write_text(f"{sleeper.pid}\n{server.data}\n")
    if server.user is not None:
        server._own()

    assert server.pid() is None
    assert server.processes() == []
    server.stop()
    assert sleeper.poll() is None

    server.start()
    pid = server.pid()
    assert pid is not None and pid != sleeper.pid
    assert sleeper.pid not in server.processes()
    with server.connect(connect_timeout=5) as conn:
        assert conn.execute("SELECT pg_backend_pid() > 0").fetchone() == (True,)
    server.stop()
    assert server.pid() is None
    assert sleeper.poll() is None


def test_other_folders_server_is_not_this_one(
        folder: Path, server: pgserver.Server) -> None:
    """
    A C{postmaster.pid} naming a live PostgreSQL server of another folder
    (copied from it) is not this folder's server: C{stop} leaves it
    running.
    """
    other = pgserver.Server(folder / "other", free_port())
    other.initialize()
    shutil.copy(server.data / "postmaster.pid", other.data / "postmaster.pid")
    assert other.pid() is None
    other.stop()
    assert server.pid() is not None
    with server.connect(connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
