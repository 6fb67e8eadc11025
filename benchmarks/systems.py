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
    extrapolates linearly, and says so.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

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


def _pfo3(port: int) -> List[List[str]]:
    return [_twistd() + ["-n", "--pidfile=", "pfo3", "--port",
                         f"tcp:{port}:interface=127.0.0.1"]]


def _pfo3_pool(port: int) -> List[List[str]]:
    return [_pfo3(port)[0] + ["--no-inline"]]


def _seed(port: int) -> List[List[str]]:
    return [[sys.executable, os.path.join(HERE, "seed_server.py"), "--port", str(port)]]


def _floor(port: int) -> List[List[str]]:
    return [[sys.executable, os.path.join(HERE, "asyncio_floor.py"), "--port", str(port)]]


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
)
SEED = System(
    "seed", "seed architecture",
    "The seed prototype's architecture (`benchmarks/seed_server.py`): a thread per "
    "connection, one shared `queue.Queue`, 4 worker threads.",
    _seed, burst_limit=20, idle_memory=False,
)
FLOOR = System(
    "floor", "asyncio floor",
    "A bare asyncio JSON-lines server (`benchmarks/asyncio_floor.py`): tasks inline, "
    "no validation, limits or storage.",
    _floor,
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
    PFO3, PFO3_POOL, SEED, FLOOR,
    PFO3_STORE_NONE, PFO3_STORE_MEMORY, PFO3_STORE_SQLITE, PFO3_STORE_PG,
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

    import subprocess

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
