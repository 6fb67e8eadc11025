"""
The systems the comparison suite runs, and how to start each.

A L{System} says how to start its processes on a given loopback port; the
suite starts them, waits until the port accepts connections, points
C{pfo3-bench} at it and reads the CPU time of all its processes around each
run.  To add a system (pfo3 over RabbitMQ, a Celery gateway, ...), append one
to L{SYSTEMS}:

  - C{commands(port)} returns one argv per process: the first listens on
    C{port} and speaks the JSON-lines protocol, the others are its helpers
    (workers, a broker) and count in its CPU time;
  - C{available()} returns why it cannot run here (a broker not reachable, a
    package missing), or L{None}; the suite then skips it and says so;
  - C{burst_limit} is the largest sleep burst worth running (a system whose
    sleeps hold a worker each); beyond it the suite runs that many and
    extrapolates linearly, and says so;
  - C{levels} names the load levels it runs at, when not all of them (a
    variant compared with pfo3 at a level or two only);
  - C{endpoint(port)} is the client endpoint C{pfo3-bench} connects to
    (C{tls:...} for a server on an C{ssl:} port), C{bench_args} its extra
    options (C{--procs 2} to spread the load over two processes);
  - C{watchers(port)} returns one argv per process that uses it as its
    operators' tools would (a Prometheus scraping its metrics): started once
    it listens, stopped with it, their CPU time not counted as its own.

L{DEFAULT_SYSTEMS} is what the suite runs unless told otherwise; the
results-store systems run when named (C{docs/store.md}).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _twistd() -> List[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(beside):
        return [beside]
    found = shutil.which("twistd")
    if found:
        return [found]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _always() -> Optional[str]:
    return None


def _nothing(port: int) -> List[List[str]]:
    return []


def _tcp(port: int) -> str:
    return f"tcp:127.0.0.1:{port}"


@dataclass(frozen=True)
class System:
    """
    One server under test.

    @ivar name: Short key, used on the command line and in the results.
    @ivar label: Name in tables and charts.
    @ivar description: One sentence for the report.
    @ivar commands: C{commands(port)}: one argv per process, the listener first.
    @ivar env: Extra environment for its processes.
    @ivar available: Why it cannot run here, or L{None}.
    @ivar burst_limit: Largest sleep burst to run (L{None}: no limit).
    @ivar idle_memory: Whether the idle-connection memory test runs on it.
    @ivar burst: Whether the sleep burst runs on it (off for a variant whose
        sleeps run exactly as another system's do).
    @ivar levels: The load levels (C{"64x8"}) it runs at; L{None}: all.
    @ivar endpoint: C{endpoint(port)}: the client endpoint C{pfo3-bench}
        and the suite's readiness check connect to.
    @ivar bench_args: Extra options of every C{pfo3-bench} run against it.
    @ivar tls_ca: For a system on TLS: C{tls_ca()} is the CA certificate
        file its server certificate is signed by.
    @ivar watchers: C{watchers(port)}: one argv per process watching it
        (not part of it: its CPU time is not counted).
    """

    name: str
    label: str
    description: str
    commands: Callable[[int], List[List[str]]]
    env: Dict[str, str] = field(default_factory=dict)
    available: Callable[[], Optional[str]] = _always
    burst_limit: Optional[int] = None
    idle_memory: bool = True
    burst: bool = True
    levels: Optional[Tuple[str, ...]] = None
    endpoint: Callable[[int], str] = _tcp
    bench_args: Tuple[str, ...] = ()
    tls_ca: Optional[Callable[[], str]] = None
    watchers: Callable[[int], List[List[str]]] = _nothing

    def runs_at(self, level: str) -> bool:
        """
        @return: Whether it runs at this load level (C{"64x8"}).
        """
        return self.levels is None or level in self.levels


def _pfo3(port: int) -> List[List[str]]:
    return [_twistd() + ["-n", "--pidfile=", "pfo3", "--port",
                         f"tcp:{port}:interface=127.0.0.1"]]


def _pfo3_pool(port: int) -> List[List[str]]:
    return [_pfo3(port)[0] + ["--no-inline"]]


def _seed(port: int) -> List[List[str]]:
    return [[sys.executable, os.path.join(HERE, "seed_server.py"), "--port", str(port)]]


def _floor(port: int) -> List[List[str]]:
    return [[sys.executable, os.path.join(HERE, "asyncio_floor.py"), "--port", str(port)]]


def _floor_plain(port: int) -> List[List[str]]:
    return [[sys.executable, os.path.join(HERE, "asyncio_floor_plain.py"), "--port", str(port)]]


#: The levels at which a variant of pfo3 is compared with pfo3 itself: the
#: target level and the same connections without pipelining.
VARIANT_LEVELS = ("64x8", "64x1")


@functools.cache
def _tls_files() -> Tuple[str, str, str]:
    """
    A throwaway CA and a server certificate for C{localhost} and
    C{127.0.0.1}, made once per suite with pfo3's own C{pfo3.certs}.

    @return: C{(CA folder for trustRoots=, server key, server certificate)}.
    """
    from pfo3 import certs

    folder = tempfile.mkdtemp(prefix="pfo3-bench-tls-")
    ca = certs.make_ca(folder)
    server = certs.make_server(folder, ["localhost", "127.0.0.1"])
    return str(ca.directory), str(server.key), str(server.cert)


def _pfo3_tls(port: int) -> List[List[str]]:
    _, key, cert = _tls_files()
    return [_twistd() + ["-n", "--pidfile=", "pfo3", "--port",
                         f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"]]


def _tls_endpoint(port: int) -> str:
    return f"tls:localhost:{port}:trustRoots={_tls_files()[0]}"


def _tls_ca() -> str:
    return os.path.join(_tls_files()[0], "ca.pem")


def _pfo3_processes(port: int) -> List[List[str]]:
    return [_pfo3(port)[0] + ["--processes", "2"]]


def has_processes_option(help_text: str) -> bool:
    """
    @return: Whether C{twistd pfo3 --help} lists C{--processes}.
    """
    return re.search(r"--processes[=\s]", help_text) is not None


@functools.cache
def _processes_available() -> Optional[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    try:
        done = subprocess.run(_twistd() + ["pfo3", "--help"], capture_output=True, text=True,
                              env=env, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`twistd pfo3 --help` failed: {e}"
    if not has_processes_option(done.stdout):
        return "this pfo3 has no `--processes` option (`twistd pfo3 --help` does not list it)"
    return None


PFO3 = System(
    "pfo3", "pfo3 (local)",
    "pfo3 in local mode on its defaults (`twistd -n pfo3`).",
    _pfo3, env={"PYTHONPATH": REPO},
)
PFO3_POOL = System(
    "pfo3-pool", "pfo3 --no-inline",
    "pfo3 with the built-in text tasks sent to its 4-thread pool "
    "(`deferToThreadPool`) instead of run inline: the measure behind running "
    "them inline (`docs/execution.md`).",
    _pfo3_pool, env={"PYTHONPATH": REPO}, idle_memory=False, burst=False,
    levels=VARIANT_LEVELS,
)
PFO3_TLS = System(
    "pfo3-tls", "pfo3 over TLS",
    "pfo3 on its defaults on an `ssl:` port (a throwaway P-256 certificate made with "
    "`pfo3.certs`), `pfo3-bench` on a `tls:` endpoint that verifies it: what TLS costs.",
    _pfo3_tls, env={"PYTHONPATH": REPO}, idle_memory=False, burst=False,
    levels=VARIANT_LEVELS, endpoint=_tls_endpoint, tls_ca=_tls_ca,
)
PFO3_P1 = System(
    "pfo3-p1", "pfo3, 1 process",
    "pfo3 on its defaults (one process), loaded by 2 load processes "
    "(`pfo3-bench --procs 2`): the reference for `--processes 2`.",
    _pfo3, env={"PYTHONPATH": REPO}, available=_processes_available, idle_memory=False,
    burst=False, levels=VARIANT_LEVELS, bench_args=("--procs", "2"),
)
PFO3_P2 = System(
    "pfo3-p2", "pfo3 --processes 2",
    "pfo3 serving from 2 processes (`twistd -n pfo3 --processes 2`), loaded by 2 "
    "load processes (`pfo3-bench --procs 2`); its CPU time is that of all its processes.",
    _pfo3_processes, env={"PYTHONPATH": REPO}, available=_processes_available,
    idle_memory=False, burst=False, levels=VARIANT_LEVELS, bench_args=("--procs", "2"),
)
#: The metrics port of the C{pfo3-metrics} server listening on each port.
_METRICS_PORTS: Dict[int, int] = {}


def _metrics_port(port: int) -> int:
    """
    @return: The port the C{pfo3-metrics} server on C{port} serves its
        metrics on: a free one, chosen once per server.
    """
    if port not in _METRICS_PORTS:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            _METRICS_PORTS[port] = s.getsockname()[1]
    return _METRICS_PORTS[port]


def _pfo3_metrics(port: int) -> List[List[str]]:
    return [_pfo3(port)[0] + ["--metrics", f"tcp:{_metrics_port(port)}:interface=127.0.0.1"]]


def _scraper(port: int) -> List[List[str]]:
    return [[sys.executable, os.path.join(HERE, "scrape.py"),
             f"http://127.0.0.1:{_metrics_port(port)}/metrics", "--interval", "1"]]


PFO3_METRICS = System(
    "pfo3-metrics", "pfo3 --metrics",
    "pfo3 on its defaults with `--metrics` on a loopback port, scraped once a second "
    "during the load (`benchmarks/scrape.py`, as a Prometheus would, more often than its "
    "usual 15 s; the scraper's CPU is not the server's): what metrics cost.",
    _pfo3_metrics, env={"PYTHONPATH": REPO}, idle_memory=False, burst=False,
    levels=VARIANT_LEVELS, watchers=_scraper,
)
SEED = System(
    "seed", "seed architecture",
    "The seed prototype's architecture (`benchmarks/seed_server.py`): a thread per "
    "connection, one shared `queue.Queue`, 4 worker threads.",
    _seed, burst_limit=20,
)
FLOOR = System(
    "floor", "asyncio floor",
    "The cheapest Python server known for the protocol (`benchmarks/asyncio_floor.py`), "
    "on asyncio: pfo3's tricks (one write and one UTF-8 decode per read, the JSON "
    "scanner alone, template replies, the collector frozen and tuned as pfo3 tunes it) "
    "and a fast path for the expected request; it validates what it must to answer every "
    "line correctly, with pfo3's error codes, but has no limits, backpressure, "
    "timeouts, statistics, store or authentication.",
    _floor,
)
FLOOR_PLAIN = System(
    "floor-plain", "asyncio, plain",
    "The obvious asyncio server (`benchmarks/asyncio_floor_plain.py`, the floor of "
    "earlier reports): `json.loads` and a dict through `json.dumps` per task, one write "
    "per read, the collector on Python's defaults; no validation. For context.",
    _floor_plain, idle_memory=False, burst=False, levels=VARIANT_LEVELS,
)

#: The PostgreSQL server the C{pfo3-store-pg} system records into (a
#: database C{pfo3_bench} on it is dropped and created anew for each run).
BENCH_PG = os.environ.get("PFO3_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")


def _pfo3_store(url: Callable[[int], str]) -> Callable[[int], List[List[str]]]:
    def commands(port: int) -> List[List[str]]:
        return [_pfo3(port)[0] + ["--store", url(port)]]

    return commands


def _sqlite_url(port: int) -> str:
    return "sqlite:" + os.path.join(tempfile.mkdtemp(prefix="pfo3-bench-"), "pfo3.db")


def _pg_url(port: int) -> str:
    import psycopg

    with psycopg.connect(f"{BENCH_PG}/postgres", autocommit=True, connect_timeout=5) as c:
        c.execute("DROP DATABASE IF EXISTS pfo3_bench WITH (FORCE)")
        c.execute("CREATE DATABASE pfo3_bench")
    return f"{BENCH_PG}/pfo3_bench"


def _pg_available() -> Optional[str]:
    try:
        import psycopg

        psycopg.connect(f"{BENCH_PG}/postgres", connect_timeout=3).close()
    except Exception as e:  # ImportError, or the server does not answer
        return f"no PostgreSQL at {BENCH_PG}: {e}"
    return None


def _store_system(
    name: str, what: str, url: Callable[[int], str],
    available: Callable[[], Optional[str]] = _always,
) -> System:
    return System(
        name, f"pfo3 --store {what}",
        f"pfo3 in local mode recording every task in the results store `--store {what}`.",
        _pfo3_store(url), env={"PYTHONPATH": REPO}, available=available,
        idle_memory=False, burst=False,
    )


PFO3_STORE_NONE = _store_system("pfo3-store-none", "none", lambda port: "none")
PFO3_STORE_MEMORY = _store_system("pfo3-store-memory", "memory:", lambda port: "memory:")
PFO3_STORE_SQLITE = _store_system("pfo3-store-sqlite", "sqlite:PATH", _sqlite_url)
PFO3_STORE_PG = _store_system(
    "pfo3-store-pg", "postgresql://…", _pg_url, available=_pg_available)

#: Every system the suite knows, in report order.
SYSTEMS: List[System] = [
    PFO3, PFO3_POOL, PFO3_TLS, PFO3_P1, PFO3_P2, PFO3_METRICS, SEED, FLOOR, FLOOR_PLAIN,
    PFO3_STORE_NONE, PFO3_STORE_MEMORY, PFO3_STORE_SQLITE, PFO3_STORE_PG,
]

#: What the suite runs unless told otherwise.
DEFAULT_SYSTEMS: List[System] = [
    PFO3, PFO3_POOL, PFO3_TLS, PFO3_P1, PFO3_P2, PFO3_METRICS, SEED, FLOOR, FLOOR_PLAIN,
]


def baseline(checkout: str) -> System:
    """
    pfo3 as another checkout of it has it (an earlier commit), run exactly
    like L{PFO3}: the same interpreter and Twisted, its own C{pfo3} package
    and plugin first on the path.  For before/after comparisons in one run.
    """
    checkout = os.path.abspath(checkout)

    def missing() -> Optional[str]:
        if not os.path.exists(os.path.join(checkout, "pfo3", "tap.py")):
            return f"no pfo3 checkout at {checkout}"
        return None

    commit = subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    where = f"at commit `{commit}`" if commit else f"from the checkout at `{checkout}`"
    return System(
        "pfo3-base", "pfo3 (baseline)",
        f"pfo3 in local mode on its defaults, {where}.",
        _pfo3, env={"PYTHONPATH": checkout}, available=missing, idle_memory=False,
    )


def by_name(names: List[str]) -> List[System]:
    """
    @raise KeyError: for an unknown name.
    """
    known = {s.name: s for s in SYSTEMS}
    return [known[n] for n in names]
