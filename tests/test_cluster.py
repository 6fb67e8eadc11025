"""
Integration tests: the whole cluster of C{deploy/cluster.py} (its own
RabbitMQ node, its own PostgreSQL server, its own object storage, TLS, JWT,
two orchestrators, two workers, HAProxy in front), started once for the
module with C{up} and always stopped with C{down}, after which no process of
it is left and none of its ports is open.

The faults are real: an orchestrator stopped with SIGTERM, a worker killed
with SIGKILL, the RabbitMQ node's process and the PostgreSQL server stopped
and started again.  Each test leaves the whole cluster running for the next.

HAProxy, RabbitMQ, PostgreSQL's binaries or SeaweedFS missing fails these
tests; it never skips them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Set

import pytest

from .conftest import ROOT, LineSocket
from .test_pgserver import command_lines_with

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "deploy" / "cluster.py"
BIN = Path(sys.executable).parent
FINISHED = ("ok", "error", "timeout")
ORCHESTRATORS = ("o1", "o2")
# Replies of tasks refused before they ran (never recorded: docs/protocol.md).
REFUSED = ("apagando", "ocupado", "excede_timeout", "tasa_excedida")


class Cluster:
    """
    A running cluster: its folder, its C{cluster.json}, and clients for it.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.state: Dict[str, Any] = json.loads((directory / "cluster.json").read_text())
        self.ports: Dict[str, int] = self.state["ports"]
        self.tls = ssl.create_default_context(cafile=str(directory / "tls" / "ca" / "ca.pem"))
        self.token = subprocess.run(
            [str(BIN / "pfo3-token"), "--sub", "cluster-test",
             "--secret-file", self.state["jwt_secret_file"]],
            check=True, capture_output=True, text=True).stdout.strip()

    def connect(self, where: str = "front", timeout: float = 30.0) -> LineSocket:
        """
        An authenticated connection through HAProxy (C{front}) or straight
        to one orchestrator's direct TLS port (C{o1}, C{o2}).
        """
        port = self.ports["front" if where == "front" else f"{where}_direct"]
        c = LineSocket(port, timeout=timeout, tls=self.tls)
        c.send_json({"op": "auth", "token": self.token, "tarea_id": "auth"})
        reply = c.read_json()
        assert reply["estado"] == "ok", reply
        assert reply["resultado"]["identidad"] == "cluster-test"
        return c

    def metric(self, name: str, metric: str) -> float:
        """
        @return: The sum of the samples of C{metric} on the /metrics of
            C{name} (an orchestrator or a worker).
        """
        url = f"http://127.0.0.1:{self.ports[name + '_metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        return sum(float(m.group(1)) for m in
                   re.finditer(rf"^{metric}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))

    def tasks_total(self, name: str) -> float:
        return self.metric(name, "pfo3_tasks_total")

    def estado(self, conn: LineSocket, tarea_id: str) -> Dict[str, Any]:
        conn.send_json({"op": "estado", "tarea_id": tarea_id})
        reply = conn.read_json()
        assert reply.get("tarea_id") == tarea_id, reply
        return reply

    def reload(self) -> None:
        """
        Read C{cluster.json} again (a part started again has a new pid).
        """
        self.state = json.loads((self.dir / "cluster.json").read_text())

    def part(self, action: str, name: str) -> None:
        """
        C{cluster.py stop NAME} or C{cluster.py start NAME}: it must
        succeed.
        """
        out = run_script(action, "--dir", str(self.dir), name, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        self.reload()

    def stats(self, name: str) -> Dict[str, Any]:
        """
        @return: The C{resultado} of op stats of orchestrator C{name}.
        """
        c = self.connect(name)
        try:
            c.send_json({"op": "stats", "tarea_id": "stats"})
            reply = c.read_json()
        finally:
            c.close()
        assert reply["estado"] == "ok", reply
        result: Dict[str, Any] = reply["resultado"]
        return result

    def submit(self, where: str, prefix: str, n: int, seconds: float) -> List[str]:
        """
        Submit C{n} background sleep tasks to C{where}, all accepted.

        @return: Their ids.
        """
        c = self.connect(where)
        try:
            for i in range(n):
                c.send_json({"tarea_id": f"{prefix}-{i}", "tipo": "sleep",
                             "contenido": seconds, "esperar": False})
            replies = c.read_many(n)
        finally:
            c.close()
        assert {r["estado"] for r in replies} == {"aceptada"}, replies
        return [r["tarea_id"] for r in replies]

    def records(self, ids: List[str], deadline: float = 60.0) -> Dict[str, Dict[str, Any]]:
        """
        Wait until every task of C{ids} is recorded finished, asking op
        estado through orchestrator 2.

        @return: Their records.
        """
        states: Dict[str, Dict[str, Any]] = {}
        end = time.monotonic() + deadline
        while True:
            try:
                c = self.connect("o2", timeout=10)
                try:
                    for tid in ids:
                        if states.get(tid, {}).get("estado") not in FINISHED:
                            reply = self.estado(c, tid)
                            states[tid] = (reply["resultado"] if reply.get("estado") == "ok"
                                           else {"estado": f"sin registro: {reply}"})
                finally:
                    c.close()
            except (ConnectionError, OSError):
                pass
            unfinished = {t: states.get(t) for t in ids
                          if states.get(t, {}).get("estado") not in FINISHED}
            if not unfinished:
                return states
            assert time.monotonic() < end, f"tasks not recorded finished: {unfinished}"
            time.sleep(0.5)

    def serves(self, deadline: float = 60.0) -> None:
        """
        Wait until a task through HAProxy is answered.
        """
        def once() -> bool:
            try:
                c = self.connect(timeout=10)
            except (ConnectionError, OSError, AssertionError, ValueError):
                return False
            try:
                c.send_json({"tarea_id": "after", "tipo": "uppercase",
                             "contenido": "otra vez"})
                return c.read_json().get("resultado") == "OTRA VEZ"
            except (ConnectionError, OSError, ValueError):
                return False
            finally:
                c.close()

        until(once, deadline, "the cluster to serve tasks through HAProxy")


def run_script(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """
    The cluster, started with C{deploy/cluster.py up}; C{down} always runs
    afterwards, even when C{up} failed half-way.
    """
    # Not under pytest's folder: /tmp/pytest-of-root is closed to the
    # postgres user that the cluster's PostgreSQL runs as under root.
    directory = Path(tempfile.mkdtemp(prefix="pfo3-cluster-"))
    try:
        out = run_script("up", "--dir", str(directory))
        if out.returncode != 0:
            logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}"
                           for p in sorted((directory / "logs").glob("*.log")))
            pytest.fail(f"cluster.py up failed:\n{out.stdout}\n{out.stderr}{logs}")
        assert "pfo3-token --sub" in out.stdout and "--endpoint tls:localhost:" in out.stdout
        yield Cluster(directory)
    finally:
        down = run_script("down", "--dir", str(directory))
        state = json.loads((directory / "cluster.json").read_text())
        left = cluster_processes(directory, state)
        listening = [f"{n}={p}" for n, p in state["ports"].items() if port_open(p)]
        shutil.rmtree(directory, ignore_errors=True)
        assert down.returncode == 0, down.stdout + down.stderr
        assert left == [], f"processes of the cluster left after down: {left}"
        assert listening == [], f"ports still open after down: {listening}"


def cluster_processes(directory: Path, state: Dict[str, Any]) -> List[str]:
    """
    @return: The processes of the cluster still alive: in the session of a
        part it started, or with its folder in their command line or as
        their working directory (PostgreSQL's, started by pg_ctl).
    """
    sessions = {str(p) for p in state.get("pids", {}).values()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except (OSError, IndexError):
            continue
        if fields[0] == "Z":
            continue
        if (fields[3] in sessions or str(directory) in cmdline
                or cwd.startswith(str(directory))):
            found.append(f"{entry.name}: {cmdline[:120]}")
    return found


def port_open(port: int) -> bool:
    """
    @return: Whether something accepts TCP connections on 127.0.0.1:C{port}.
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def script_alive(pid: int) -> bool:
    """
    @return: Whether process C{pid} (not a child of the tests) still runs.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def until(condition: Callable[[], bool], deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_status_is_healthy(cluster: Cluster) -> None:
    """
    C{cluster.py status} finds every process running, every /healthz
    answering 200 and both orchestrators UP in HAProxy.
    """
    out = run_script("status", "--dir", str(cluster.dir), timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "o1 UP, o2 UP" in out.stdout


def test_postgresql_password_only_in_its_file(cluster: Cluster) -> None:
    """
    The cluster's PostgreSQL server lets no one in without its password,
    which is in DIR/postgresql/pgpass (mode 0600) only: the store's URL has
    none, the orchestrators get the file as C{PGPASSFILE}, and no process of
    the machine has the password on its command line.
    """
    import psycopg

    passfile = cluster.dir / "postgresql" / "pgpass"
    assert os.stat(passfile).st_mode & 0o777 == 0o600
    secret = passfile.read_text().strip().rsplit(":", 1)[1]
    store = cluster.state["store"]
    assert store.startswith("postgresql://postgres@127.0.0.1:") and secret not in store
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(store, connect_timeout=5, passfile=str(cluster.dir / "missing"))
    with psycopg.connect(store, connect_timeout=5, passfile=str(passfile)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    for name in ORCHESTRATORS:
        environ = Path(f"/proc/{cluster.state['pids'][name]}/environ").read_bytes()
        assert f"PGPASSFILE={passfile}".encode() in environ.split(b"\0"), name
    assert command_lines_with(secret) == []


def test_tasks_reach_both_orchestrators_and_workers(cluster: Cluster) -> None:
    """
    Tasks sent through HAProxy over several TLS connections with a token are
    answered, and both orchestrators (their pfo3_tasks_total grows) and both
    workers (the replies' worker field) ran some of them.
    """
    before = {o: cluster.tasks_total(o) for o in ("o1", "o2")}
    conns = [cluster.connect() for _ in range(6)]
    ids: Dict[str, str] = {}
    for i, c in enumerate(conns):
        for j in range(8):
            tid = f"spread-{i}-{j}"
            ids[tid] = f"hola {i} {j}"
            c.send_json({"tarea_id": tid, "tipo": "sleep" if j % 2 else "uppercase",
                         "contenido": 0.2 if j % 2 else ids[tid]})
    workers: Set[str] = set()
    for c in conns:
        for reply in c.read_many(8):
            assert reply["estado"] == "ok", reply
            if reply["tarea_id"].endswith(("0", "2", "4", "6")):
                assert reply["resultado"] == ids[reply["tarea_id"]].upper()
            workers.add(reply["worker"].split("/")[0])
        c.close()
    assert workers == {"w1", "w2"}
    until(lambda: all(cluster.tasks_total(o) > before[o] for o in ("o1", "o2")), 10,
          "both orchestrators to count tasks")
    assert sum(cluster.tasks_total(o) - before[o] for o in ("o1", "o2")) >= 48


def test_durable_task_is_found_through_the_other_orchestrator(cluster: Cluster) -> None:
    """
    A durable task submitted straight to orchestrator 1 is found, finished,
    with op estado straight through orchestrator 2: they share the
    PostgreSQL store, and the same token identity owns it.
    """
    tid = f"durable-{uuid.uuid4()}"
    c1 = cluster.connect("o1")
    c1.send_json({"tarea_id": tid, "tipo": "reverse", "contenido": "hola", "esperar": True})
    assert c1.read_json()["resultado"] == "aloh"
    c2 = cluster.connect("o2")
    found: Dict[str, Any] = {}

    def recorded() -> bool:
        found.update(cluster.estado(c2, tid))
        return found.get("estado") == "ok" and found["resultado"]["estado"] == "ok"

    until(recorded, 10, "the task's record through o2")
    assert found["resultado"]["resultado"] == "aloh"
    assert found["resultado"]["worker"].split("/")[0] in ("w1", "w2")
    c1.close()
    c2.close()


def test_throughput_and_stats_under_load(cluster: Cluster) -> None:
    """
    benchmarks/cluster_throughput.py measures, in the same run, pfo3-bench
    through HAProxy (two orchestrators) and straight to one orchestrator:
    both runs answer every request without error.  op stats, read on both
    orchestrators while that load runs, counts tasks in flight (en_curso
    above zero) and reports the broker.
    """
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "cluster_throughput.py"),
         "--dir", str(cluster.dir), "--seconds", "2", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    in_flight: List[int] = []
    during: Dict[str, Any] = {}
    try:
        while proc.poll() is None and max(in_flight, default=0) == 0:
            for name in ("o1", "o2"):
                stats = cluster.stats(name)
                in_flight.append(stats["en_curso"])
                if stats["en_curso"] > 0:
                    during = stats
            time.sleep(0.1)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    result = json.loads(out.splitlines()[-1])
    print(json.dumps(result, indent=2))
    for run in ("haproxy", "direct"):
        assert result[run]["ok"] > 0 and result[run]["error_count"] == 0, result[run]
    print("op stats during the load:", json.dumps(during, indent=2))
    assert max(in_flight) > 0, in_flight
    assert during["broker"]["conectado"] is True, during


def test_stats_count_the_tasks_in_flight(cluster: Cluster) -> None:
    """
    op stats of an orchestrator running ten background tasks of two
    seconds says en_curso is at least ten while they run, and back to zero
    once they are recorded finished.
    """
    ids = cluster.submit("o1", f"stats-{uuid.uuid4().hex[:6]}", 10, 2.0)
    assert cluster.stats("o1")["en_curso"] >= 10
    cluster.records(ids)
    until(lambda: cluster.stats("o1")["en_curso"] == 0, 10, "o1's en_curso to be 0")


def test_large_content_through_the_clusters_object_storage(
    cluster: Cluster, tmp_path: Path
) -> None:
    """
    The cluster's own S3 (SeaweedFS) serves both orchestrators and both
    workers: pfo3-client --contenido-archivo, through HAProxy with a token,
    uploads a 5 MB file with a presigned URL and gets its word count, run
    by a worker that read the object.
    """
    assert cluster.state["blobs"].startswith("s3://pfo3?endpoint=http://127.0.0.1:")
    path = tmp_path / "libro.txt"
    path.write_text(" ".join(["palabra"] * 640_000))
    env = dict(os.environ, PFO3_TOKEN=cluster.token, PYTHONPATH=str(ROOT))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name, None)  # the client needs none: the URL is presigned
    out = subprocess.run(
        [str(BIN / "pfo3-client"), "--endpoint", cluster.state["urls"]["front"],
         "--tipo", "word_count", "--contenido-archivo", str(path), "--timeout", "60"],
        capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)["respuesta"]
    assert reply["resultado"] == 640_000
    assert reply["worker"].split("/")[0] in ("w1", "w2")


def test_sigterm_orchestrator_answers_all_it_accepted(cluster: Cluster) -> None:
    """
    Orchestrator 1 gets SIGTERM with background and plain tasks in flight
    (op stats counts them all in en_curso first): it drains, so every plain
    task sent to it before the stop is answered ok on its connection, and
    every background task is recorded ok in PostgreSQL.  Started again, it
    serves.
    """
    tag = uuid.uuid4().hex[:6]
    accepted = cluster.submit("o1", f"term-bg-{tag}", 8, 2.0)
    c1 = cluster.connect("o1")
    plain = [f"term-plain-{tag}-{i}" for i in range(6)]
    for tid in plain:
        c1.send_json({"tarea_id": tid, "tipo": "sleep", "contenido": 1.5})
    until(lambda: cluster.stats("o1")["en_curso"] >= 14, 10, "o1 to run all 14 tasks")
    os.kill(cluster.state["pids"]["o1"], signal.SIGTERM)
    replies = {r["tarea_id"]: r for r in c1.read_many(len(plain))}
    c1.close()
    assert {t: r["estado"] for t, r in replies.items()} == {t: "ok" for t in plain}, replies
    until(lambda: not script_alive(cluster.state["pids"]["o1"]), 30, "o1 to exit")
    states = cluster.records(accepted)
    assert {t: s["estado"] for t, s in states.items()} == {t: "ok" for t in accepted}
    cluster.part("start", "o1")
    cluster.serves()


def test_killed_worker_tasks_run_again_on_the_other(cluster: Cluster) -> None:
    """
    With worker 2 stopped, worker 1 holds all six background tasks (its
    held-tasks gauge says six) when it is killed with SIGKILL; worker 2,
    started again, runs those very tasks: each is recorded ok by w2.
    """
    cluster.part("stop", "w2")
    try:
        ids = cluster.submit("o2", f"held-{uuid.uuid4().hex[:6]}", 6, 4.0)
        until(lambda: cluster.metric("w1", "pfo3_worker_held_tasks") == 6, 10,
              "worker 1 to hold the six tasks")
        os.kill(cluster.state["pids"]["w1"], signal.SIGKILL)
        until(lambda: not script_alive(cluster.state["pids"]["w1"]), 10, "w1 to die")
    finally:
        cluster.part("start", "w2")
    states = cluster.records(ids)
    assert {t: (s["estado"], s["worker"].split("/")[0]) for t, s in states.items()} == {
        t: ("ok", "w2") for t in ids}, states
    cluster.part("start", "w1")
    cluster.serves()


def test_rabbitmq_node_restart_loses_nothing(cluster: Cluster) -> None:
    """
    The cluster's RabbitMQ node process is stopped and started again
    (cluster.py stop/start rabbitmq: the Erlang VM exits) with background
    tasks queued and plain tasks waiting on both orchestrators: every plain
    task is answered ok, every background task is recorded ok, and the
    cluster serves new tasks through HAProxy.
    """
    tag = uuid.uuid4().hex[:6]
    old_pid = cluster.state["pids"]["rabbitmq"]
    accepted = (cluster.submit("o1", f"rmq-bg1-{tag}", 10, 2.0)
                + cluster.submit("o2", f"rmq-bg2-{tag}", 10, 2.0))
    conns = {"o1": cluster.connect("o1", timeout=90), "o2": cluster.connect("o2", timeout=90)}
    plain: Dict[str, List[str]] = {}
    for name, c in conns.items():
        plain[name] = [f"rmq-plain-{name}-{tag}-{i}" for i in range(4)]
        for tid in plain[name]:
            c.send_json({"tarea_id": tid, "tipo": "sleep", "contenido": 2.0})
    time.sleep(0.3)
    cluster.part("stop", "rabbitmq")
    assert not script_alive(old_pid)
    time.sleep(1.0)
    cluster.part("start", "rabbitmq")
    assert cluster.state["pids"]["rabbitmq"] != old_pid
    for name, c in conns.items():
        replies = {r["tarea_id"]: r for r in c.read_many(len(plain[name]))}
        c.close()
        assert {t: r["estado"] for t, r in replies.items()} == {
            t: "ok" for t in plain[name]}, replies
    cluster.serves()
    states = cluster.records(accepted)
    assert {t: s["estado"] for t, s in states.items()} == {t: "ok" for t in accepted}


def test_postgresql_stop_and_start_loses_nothing(cluster: Cluster) -> None:
    """
    The cluster's PostgreSQL server is stopped (pg_ctl stop -m fast) with
    background tasks running, more are submitted and plain tasks answered
    while it is down, and it is started again: every task submitted is
    answered, and every background task is recorded ok once the store
    catches up.
    """
    tag = uuid.uuid4().hex[:6]
    accepted = cluster.submit("o1", f"pg-before-{tag}", 6, 1.0)
    cluster.part("stop", "postgresql")
    try:
        time.sleep(0.5)
        accepted += cluster.submit("o2", f"pg-during-{tag}", 6, 0.5)
        c = cluster.connect("o1")
        c.send_json({"tarea_id": "plain", "tipo": "reverse", "contenido": "hola"})
        assert c.read_json()["resultado"] == "aloh"
        c.close()
        time.sleep(2.0)
    finally:
        cluster.part("start", "postgresql")
    states = cluster.records(accepted, deadline=90)
    assert {t: s["estado"] for t, s in states.items()} == {t: "ok" for t in accepted}


def cluster_module() -> Any:
    """
    @return: C{deploy/cluster.py}, imported as a module.
    """
    spec = importlib.util.spec_from_file_location("pfo3_cluster_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_time(pid: int) -> int:
    """
    @return: When process C{pid} started, in clock ticks since boot.
    """
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19])


def test_recorded_pids_of_other_processes_are_left_alone(tmp_path: Path) -> None:
    """
    A cluster.json whose pids name live processes the cluster did not start
    (a pid reused after its part exited, or after a reboot): an orchestrator
    pid that leads the session of an unrelated C{sleep}, and a PostgreSQL
    C{postmaster.pid} naming it too.  Neither C{leftovers} nor C{down} takes
    them for the cluster's, nor signals them; only the start time recorded
    with the pid in this boot makes it the cluster's.
    """
    cluster = cluster_module()
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        started = start_time(sleeper.pid)
        (tmp_path / "postgresql" / "data").mkdir(parents=True)
        (tmp_path / "postgresql" / "data" / "postmaster.pid").write_text(f"{sleeper.pid}\n")
        state: Dict[str, Any] = {
            "dir": str(tmp_path), "ports": {"pg": 1}, "postgresql": {"own": True},
            "pids": {"o1": sleeper.pid}, "started_at": {"o1": started - 1},
            "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip()}
        assert cluster.leftovers(state) == []
        for other in ({"started_at": {"o1": started}, "boot_id": "another boot"},
                      {"started_at": {}}):  # a cluster.json without start times
            assert cluster.leftovers({**state, **other}) == [], other
        assert cluster.down_state(state) == []
        assert sleeper.poll() is None
        assert json.loads((tmp_path / "cluster.json").read_text())["pids"] == state["pids"]

        state["started_at"]["o1"] = started
        assert cluster.leftovers(state) == [sleeper.pid]
        assert cluster.down_state(state) == []
        sleeper.wait(10)  # (cluster.alive, a parent's check, may have reaped it)
        assert not Path(f"/proc/{sleeper.pid}").exists() or start_time(sleeper.pid) != started
    finally:
        sleeper.kill()
        sleeper.wait(10)
