"""
A private PostgreSQL server on one machine, for development, the tests and
C{deploy/cluster.py}: Debian's binaries (C{/usr/lib/postgresql/N/bin}, the
newest N), a cluster of its own in a folder, listening on one loopback port
only (no Unix socket).  Its superuser C{postgres} has a password generated
when the cluster is created (SCRAM-SHA-256 on loopback; no other local user
can connect as it), kept only in a libpq password file in the server's
folder (C{pgpass}, mode 0600): every client gets it as C{PGPASSFILE} in its
environment (L{Server.environ}), never in a URL or on a command line.

PostgreSQL refuses to run as root: when this runs as root, the folder is
given to the C{postgres} system user and every PostgreSQL command runs as
that user.  Every folder above it must then be reachable by that user.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

#: Where Debian's postgresql-N packages install their binaries.
DEBIAN_ROOT = Path("/usr/lib/postgresql")

#: The system user PostgreSQL runs as when this runs as root.
SYSTEM_USER = "postgres"

#: Settings of every instance: one loopback port, no Unix socket, a small
#: memory footprint (several instances may share a small machine).
_SETTINGS = """
# pfo3.store.pgserver
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = ''
shared_buffers = 32MB
max_connections = 100
logging_collector = off
"""


class PostgreSQLError(Exception):
    """
    A private PostgreSQL server could not be set up, started or stopped;
    the message says why (and where its log is).
    """


def bindir(root: Path = DEBIAN_ROOT) -> Path:
    """
    @return: The C{bin} folder of the newest PostgreSQL version installed
        under C{root} (the one with C{initdb} and C{pg_ctl}).
    @raise PostgreSQLError: when there is none.
    """
    found = []
    for path in root.glob("*/bin"):
        match = re.fullmatch(r"\d+(?:\.\d+)?", path.parent.name)
        if match and (path / "initdb").exists() and (path / "pg_ctl").exists():
            found.append((tuple(int(n) for n in path.parent.name.split(".")), path))
    if not found:
        raise PostgreSQLError(f"no PostgreSQL server binaries under {root}/*/bin "
                              "(apt-get install -y postgresql)")
    return max(found)[1]


class Server:
    """
    A private PostgreSQL server: its folder, its port, and how to start,
    stop and restart it.

    @ivar directory: Its folder: C{data/} (the cluster) and C{postgresql.log}.
    @ivar port: Its loopback TCP port.
    @ivar url: The server's URL without a database, as C{--store} takes it
        with C{/DBNAME} appended.  It holds no password: a client finds it in
        L{passfile} (libpq reads the file C{PGPASSFILE} names: give every
        client L{environ}).
    """

    def __init__(self, directory: Path, port: int, binaries: Optional[Path] = None,
                 user: Optional[str] = None) -> None:
        """
        @param binaries: The folder of C{initdb} and C{pg_ctl}; the newest
            installed by default.
        @param user: The system user PostgreSQL runs as; L{SYSTEM_USER} when
            this process runs as root, this process's own user otherwise.
        """
        self.directory = Path(directory).resolve()
        self.port = port
        self.binaries = binaries if binaries is not None else bindir()
        if user is None and os.geteuid() == 0:
            user = SYSTEM_USER
        self.user = user
        self.url = f"postgresql://postgres@127.0.0.1:{port}"

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "postgresql.log"

    @property
    def passfile(self) -> Path:
        """
        The libpq password file of the C{postgres} user (mode 0600, owned by
        whoever runs this, not by PostgreSQL's user).
        """
        return self.directory / "pgpass"

    @property
    def environ(self) -> Dict[str, str]:
        """
        What a client's environment needs to connect to L{url}: its
        password file in C{PGPASSFILE}.
        """
        return {"PGPASSFILE": str(self.passfile)}

    def connect(self, database: str = "postgres", **kwargs: Any) -> Any:
        """
        @return: A psycopg connection to C{database} as C{postgres}, its
            password read from L{passfile}.
        """
        import psycopg

        return psycopg.connect(f"{self.url}/{database}", passfile=str(self.passfile),
                               **kwargs)

    def __repr__(self) -> str:
        return f"<pgserver.Server {self.url} in {self.directory}>"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """
        Run one of PostgreSQL's programs as its user.
        """
        try:
            return subprocess.run(
                [str(self.binaries / args[0]), *args[1:]], **self._identity(),
                capture_output=True, text=True, timeout=timeout, cwd=self.directory,
                stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise PostgreSQLError(f"{' '.join(args)} took over {timeout:g}s; "
                                  f"see {self.log}") from e

    def _identity(self) -> Dict[str, Any]:
        """
        @return: The arguments of L{subprocess.run} that run a program as
            PostgreSQL's user, with that user's group and no other (not the
            groups of this process).
        """
        if self.user is None:
            return {}
        entry = pwd.getpwnam(self.user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _own(self) -> None:
        """
        Create the folder and, when running as another user, give it to
        PostgreSQL's user and check that that user can reach it.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.user is None:
            return
        entry = pwd.getpwnam(self.user)
        for root, dirs, files in os.walk(self.directory):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                if name != str(self.passfile):  # the clients', not the server's
                    os.chown(name, entry.pw_uid, entry.pw_gid)
        probe = subprocess.run(["test", "-w", str(self.directory)], **self._identity())
        if probe.returncode != 0:
            blocked = [str(p) for p in reversed(self.directory.parents)
                       if not os.stat(p).st_mode & 0o001]
            raise PostgreSQLError(
                f"the user {self.user} cannot reach {self.directory}: PostgreSQL refuses to "
                f"run as root and runs as {self.user}, so every folder above it needs "
                f"o+x (missing on: {', '.join(blocked) or '?'})")

    def initialize(self) -> None:
        """
        Create the cluster (C{initdb}) unless it exists: superuser
        C{postgres} with a new random password (given to C{initdb} in a
        file removed afterwards, and written to L{passfile}), SCRAM-SHA-256
        authentication on loopback, peer authentication on the Unix socket
        (there is none: it listens on loopback only), UTF-8.

        @raise PostgreSQLError: when the folder holds a cluster created
            with trust authentication (by an older version of this module:
            any local user could connect to it as superuser), or one whose
            password file is missing.  Neither is changed: the message says
            to remove the folder, and its databases with it.
        """
        self._own()
        if (self.data / "PG_VERSION").exists():
            if _trusting(self.data / "pg_hba.conf"):
                raise PostgreSQLError(
                    f"the PostgreSQL cluster in {self.data} was created with trust "
                    "authentication (any local user may connect to it as superuser); "
                    f"it is not used: remove {self.directory} (its databases go with it) "
                    "to create it again with a password")
            if not self.passfile.exists():
                raise PostgreSQLError(
                    f"the password of the PostgreSQL cluster in {self.data} is lost "
                    f"({self.passfile} is missing): remove {self.directory} (its "
                    "databases go with it) to create it again")
            return
        password = secrets.token_urlsafe(32)
        fd, pwfile = tempfile.mkstemp(prefix="initdb-", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            if self.user is not None:
                entry = pwd.getpwnam(self.user)
                os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            out = self._run("initdb", "-D", str(self.data), "-U", "postgres",
                            "--auth-host=scram-sha-256", "--auth-local=peer",
                            f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", "--no-sync")
        finally:
            os.unlink(pwfile)
        if out.returncode != 0:
            raise PostgreSQLError(f"initdb failed in {self.data}:\n{out.stdout}{out.stderr}")
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(_SETTINGS.format(port=self.port))
        tmp = self.passfile.with_name("pgpass.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"127.0.0.1:{self.port}:*:postgres:{password}\n")
        tmp.replace(self.passfile)

    def pid(self) -> Optional[int]:
        """
        @return: The postmaster's process id while it runs, else C{None}.
            The pid C{postmaster.pid} names counts only while it is a live
            PostgreSQL server of this data folder (C{postgres -D DATA}, as
            C{pg_ctl} starts it): a file left by a server that did not stop
            (a crash, a reboot) may name a process that reuses its pid.
        """
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) and self._serves(pid) else None

    def _forget_stale_pid(self) -> None:
        """
        Remove a C{postmaster.pid} that names a live process other than a
        server of this folder (its pid reused since the server ended):
        PostgreSQL would refuse to start, taking that process for a server.
        One naming no live process stays, for PostgreSQL to check that no
        process of the old server still holds its shared memory.
        """
        lock = self.data / "postmaster.pid"
        try:
            pid = int(lock.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        if _alive(pid) and not self._serves(pid):
            lock.unlink()

    def _serves(self, pid: int) -> bool:
        """
        @return: Whether process C{pid} is a PostgreSQL server of this data
            folder: C{postgres} (of any version) with C{-D} naming it.
        """
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        args = [a.decode(errors="replace") for a in argv if a]
        if not args or os.path.basename(args[0]) != "postgres":
            return False
        for flag, value in zip(args, args[1:]):
            if flag == "-D":
                try:  # a relative folder is the server's working directory's
                    cwd = os.readlink(f"/proc/{pid}/cwd")
                    return Path(cwd, value).resolve() == self.data
                except OSError:
                    return False
        return False

    def processes(self) -> List[int]:
        """
        @return: The postmaster and its children (the backends, the
            checkpointer...), while it runs.
        """
        pid = self.pid()
        if pid is None:
            return []
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
                except (OSError, IndexError):
                    continue
                if stat[1] == str(pid):
                    children.append(int(entry.name))
        return [pid, *children]

    def start(self, deadline: float = 60.0) -> None:
        """
        Initialize the cluster if needed, start it (C{pg_ctl start}, in its
        own session) and wait until it accepts connections.
        """
        self.initialize()
        if self.pid() is not None:
            return
        self._forget_stale_pid()
        out = self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log),
                        "-w", "-t", str(int(deadline)), timeout=deadline + 10)
        if out.returncode != 0:
            raise PostgreSQLError(f"PostgreSQL did not start on port {self.port}: "
                                  f"{out.stdout}{out.stderr}; see {self.log}:\n"
                                  + _tail(self.log))
        self.wait(deadline)

    def wait(self, deadline: float = 60.0) -> None:
        """
        Wait until the server accepts a connection and answers a query.
        """
        import psycopg

        end = time.monotonic() + deadline
        while True:
            try:
                with self.connect(connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as e:
                if time.monotonic() > end:
                    raise PostgreSQLError(f"PostgreSQL on port {self.port} does not answer "
                                          f"after {deadline:g}s ({e}); see {self.log}") from e
                if self.pid() is None:
                    raise PostgreSQLError(f"PostgreSQL on port {self.port} exited; see "
                                          f"{self.log}:\n{_tail(self.log)}") from e
                time.sleep(0.2)

    def stop(self, timeout: float = 20.0) -> None:
        """
        Stop the server: C{pg_ctl stop -m fast} (clients disconnected, a
        clean shutdown), then C{-m immediate} if that takes over
        C{timeout} seconds, then SIGKILL.  Nothing to do if it is not running.

        @raise PostgreSQLError: when some of its processes are still alive.
        """
        if self.pid() is None:
            return
        for mode in ("fast", "immediate"):
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w",
                      "-t", str(int(timeout)), timeout=timeout + 10)
            if self.pid() is None:
                break
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        end = time.monotonic() + timeout
        while self.processes() and time.monotonic() < end:
            time.sleep(0.1)
        if self.processes():
            raise PostgreSQLError(f"PostgreSQL processes {self.processes()} survived SIGKILL")

    def restart(self, deadline: float = 60.0) -> None:
        """
        Stop the server, then start it again.
        """
        self.stop()
        self.start(deadline)

    def create_database(self, name: str) -> str:
        """
        Create the database C{name} unless it exists.

        @return: Its URL, as C{--store} takes it.
        """
        from psycopg import sql

        with self.connect(autocommit=True, connect_timeout=5) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                 (name,)).fetchone()
            if found is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"{self.url}/{name}"


def start(directory: Path, port: int, deadline: float = 60.0) -> Server:
    """
    Start a private PostgreSQL server in C{directory} on loopback C{port}
    (creating it if needed) and wait until it answers.
    """
    server = Server(directory, port)
    server.start(deadline)
    return server


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _trusting(hba: Path) -> bool:
    """
    @return: Whether the C{pg_hba.conf} C{hba} lets anyone in with the
        C{trust} method (or cannot be read).
    """
    try:
        lines = hba.read_text().splitlines()
    except OSError:
        return True
    return any(line.split("#", 1)[0].split()[-1:] == ["trust"] for line in lines)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""
