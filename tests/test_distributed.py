"""
Integration tests of the distributed mode against the real RabbitMQ on
127.0.0.1:5672: real C{twistd pfo3 --broker} orchestrators and real
C{twistd pfo3-worker} processes.  Each test uses its own queue prefix and
deletes what it declared.  A broker that cannot be reached fails the tests
(C{.ci/run} installs and starts one).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from pfo3.amqp import messages

from .conftest import (
    LineSocket,
    free_port,
    read_to_end,
    server_env,
    stop_processes,
    wait_for_port,
)
from .pgdb import Database, pg_database  # noqa: F401

pytestmark = pytest.mark.integration

BROKER = os.environ.get("PFO3_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672/%2F")
TWISTD = str(Path(sys.executable).parent / "twistd")


def _blocking_channel() -> Any:
    import pika

    try:
        connection = pika.BlockingConnection(pika.URLParameters(BROKER))
    except Exception as e:  # pragma: no cover - the environment's fault
        pytest.fail(f"RabbitMQ is not reachable at {BROKER}: {e} (.ci/run starts it)")
    return connection, connection.channel()


class Cluster:
    """
    Orchestrators and workers on one queue prefix, and their clean-up.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.prefix = f"pfo3t{uuid.uuid4().hex[:10]}"
        self.procs: List[subprocess.Popen] = []
        self.names: List[str] = []

    def _start(self, args: List[str], log: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *args], cwd=self.tmp, env=server_env(),
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def orchestrator(self, *extra: str, name: str = "o1") -> int:
        port = free_port()
        self.names.append(name)
        proc = self._start(
            ["pfo3", "--port", f"tcp:{port}:interface=127.0.0.1", "--broker", BROKER,
             "--broker-prefix", self.prefix, "--name", name, *extra],
            self.tmp / f"{name}.log")
        wait_for_port(port, proc=proc)
        self.wait_log(f"{name}.log", "Connected to the broker")
        return port

    def worker(self, name: str, *extra: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        proc = self._start(
            ["pfo3-worker", "--broker", BROKER, "--broker-prefix", self.prefix,
             "--name", name, *extra], log)
        self.wait_log(f"{name}.log", "Connected to the broker", proc)
        return proc

    def wait_log(self, name: str, text: str, proc: Optional[subprocess.Popen] = None,
                 deadline: float = 20.0, count: int = 1) -> str:
        log = self.tmp / name
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            content = log.read_text() if log.exists() else ""
            if content.count(text) >= count:
                return content
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in {name} after {deadline}s:\n"
                             + (log.read_text() if log.exists() else "(no log)"))

    def stop(self) -> None:
        stop_processes(self.procs, 15)
        connection, channel = _blocking_channel()
        try:
            for queue in [f"{self.prefix}.tareas", f"{self.prefix}.muertas",
                          *(f"{self.prefix}.respuestas.{n}" for n in self.names)]:
                channel.queue_delete(queue)
            for exchange in (f"{self.prefix}.muertas", f"{self.prefix}.cancelaciones"):
                channel.exchange_delete(exchange)
        finally:
            connection.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    _blocking_channel()[0].close()  # fail early if there is no broker
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def send_all(port: int, requests: List[Dict[str, Any]], deadline: float = 20) -> Dict[str, Any]:
    """
    Send every request on one connection, half-close, read every reply.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=deadline) as sock:
        sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
        sock.shutdown(socket.SHUT_WR)
        data = read_to_end(sock, deadline)
    return {r["tarea_id"]: r for r in map(json.loads, data.splitlines())}


def until(condition: Callable[[], bool], deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_tasks_run_on_workers_and_spread(cluster: Cluster) -> None:
    """
    With two workers, an orchestrator's tasks (text, sleep, unknown type)
    are answered exactly as in local mode, and 'worker' names the worker
    process and thread, both workers taking part.
    """
    cluster.worker("w1", "--capacity", "4")
    cluster.worker("w2", "--capacity", "4")
    port = cluster.orchestrator()
    requests = [{"tarea_id": f"s{i}", "tipo": "sleep", "contenido": 0.3} for i in range(8)]
    requests += [{"tarea_id": "u", "tipo": "mayus", "contenido": "hola"},
                 {"tarea_id": "x", "tipo": "nada", "contenido": 1}]
    replies = send_all(port, requests)
    assert replies["u"]["resultado"] == "HOLA"
    assert replies["x"]["codigo"] == "tipo_desconocido"
    workers = {replies[f"s{i}"]["worker"] for i in range(8)}
    assert all(replies[f"s{i}"]["resultado"] == "Esperé 0.3 segundos" for i in range(8))
    assert {w.split("/")[0] for w in workers} == {"w1", "w2"}, workers


def test_worker_answers_bad_messages_without_crashing(cluster: Cluster) -> None:
    """
    A task message of a type the worker does not know, or not JSON at all,
    is answered with an error on its reply queue; the worker keeps serving.
    """
    import pika

    cluster.worker("w1")
    port = cluster.orchestrator()
    connection, channel = _blocking_channel()
    try:
        reply_queue = channel.queue_declare("", exclusive=True).method.queue
        for corr, body in [("a", b'{"v": 1, "tipo": "desconocido", "contenido": 1}'),
                           ("b", b"\x00 not json")]:
            channel.basic_publish("", f"{cluster.prefix}.tareas", body, pika.BasicProperties(
                correlation_id=corr, reply_to=reply_queue, delivery_mode=2))
        got: Dict[str, Any] = {}
        end = time.monotonic() + 15
        while len(got) < 2 and time.monotonic() < end:
            method, props, body = channel.basic_get(reply_queue, auto_ack=True)
            if method is None:
                time.sleep(0.05)
                continue
            # The worker's replies of one turn come as one batch.
            for correlation_id, reply in messages.items_of(body, props.correlation_id)[0]:
                got[correlation_id] = reply
    finally:
        connection.close()
    assert got["a"]["codigo"] == "tipo_desconocido"
    assert got["b"]["codigo"] == "error_interno"
    assert send_all(port, [{"tarea_id": "ok", "tipo": 2, "contenido": "ab"}])["ok"][
        "resultado"] == "ba"


def test_killed_worker_task_runs_elsewhere_once(cluster: Cluster) -> None:
    """
    kill -9 of the worker running a task: another worker runs it, and the
    client gets exactly one reply.
    """
    w1 = cluster.worker("w1")
    port = cluster.orchestrator()
    client = LineSocket(port, timeout=30)
    client.send_json({"tarea_id": "t", "tipo": "sleep", "contenido": 2})
    cluster.wait_log("o1.log", "Connected")
    time.sleep(0.5)  # w1 holds it
    w1.send_signal(signal.SIGKILL)
    w1.wait(5)
    cluster.worker("w2")
    reply = client.read_json()
    assert reply["tarea_id"] == "t" and reply["estado"] == "ok"
    assert reply["worker"].startswith("w2/")
    client.sock.settimeout(1.5)
    with pytest.raises(socket.timeout):
        client.read_line()  # no second reply
    client.close()


def test_task_that_kills_its_workers_is_dead_lettered(cluster: Cluster) -> None:
    """
    A task whose workers die each time it runs is set aside after the
    delivery limit, and its client is answered 'reintentos_agotados'.
    """
    port = cluster.orchestrator("--delivery-limit", "1")
    client = LineSocket(port, timeout=30)
    client.send_json({"tarea_id": "veneno", "tipo": "sleep", "contenido": 5})
    time.sleep(0.3)
    for i in range(2):  # the first delivery and the one redelivery allowed
        w = cluster.worker(f"k{i}", "--delivery-limit", "1")
        time.sleep(0.7)  # it holds the task
        w.send_signal(signal.SIGKILL)
        w.wait(5)
    cluster.worker("w", "--delivery-limit", "1")  # consumes the dead letter
    reply = client.read_json()
    assert (reply["tarea_id"], reply["codigo"]) == ("veneno", "reintentos_agotados")
    client.close()


def test_broker_connection_loss_is_survived(cluster: Cluster) -> None:
    """
    When the broker drops every connection, a task in flight is still
    answered, orchestrator and worker reconnect by themselves, and new tasks
    are served again.
    """
    cluster.worker("w1")
    port = cluster.orchestrator()
    client = LineSocket(port, timeout=30)
    client.send_json({"tarea_id": "antes", "tipo": "sleep", "contenido": 1})
    time.sleep(0.3)
    subprocess.run(["rabbitmqctl", "-q", "close_all_connections", "prueba"],
                   check=True, capture_output=True, timeout=30)
    reply = client.read_json()
    assert reply["tarea_id"] == "antes"
    assert reply.get("estado") == "ok" or reply.get("codigo") in (
        "broker_no_disponible", "timeout"), reply
    cluster.wait_log("o1.log", "Connected to the broker", count=2)
    cluster.wait_log("w1.log", "Connected to the broker", count=2)
    until(lambda: send_all(port, [{"tarea_id": "d", "tipo": 1, "contenido": "x"}])["d"].get(
        "resultado") == "X")
    client.close()


def test_expired_and_cancelled_tasks_are_not_run(cluster: Cluster) -> None:
    """
    A task that timed out before any worker took it is never run (its
    message expires), and a queued task whose client left (reset its
    connection) is dropped by the worker that later receives it.
    """
    port = cluster.orchestrator("--timeout", "1")
    reply = send_all(port, [{"tarea_id": "tarde", "tipo": "upper", "contenido": "x"}])
    assert reply["tarde"]["codigo"] == "timeout"
    time.sleep(0.2)
    cluster.worker("w1", "--capacity", "1")
    time.sleep(1.0)
    log = (cluster.tmp / "w1.log").read_text()
    assert "after 0 tasks" not in log  # still running
    # Now a busy worker (capacity 1) and a queued task whose client leaves.
    busy = LineSocket(port, timeout=10)
    busy.send_json({"tarea_id": "ocupa", "tipo": "sleep", "contenido": 0.8})
    time.sleep(0.2)
    leaving = LineSocket(port, timeout=10)
    leaving.send_json({"tarea_id": "se-va", "tipo": "mayus", "contenido": "nadie"})
    time.sleep(0.2)
    # Leaving for good: a reset (a plain close would be an end of input,
    # whose tasks are still run and answered).
    leaving.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01" + b"\x00" * 7)
    leaving.close()
    assert busy.read_json()["tarea_id"] == "ocupa"
    time.sleep(0.5)
    busy.close()
    cluster.procs[-1].terminate()
    cluster.procs[-1].wait(15)
    log = (cluster.tmp / "w1.log").read_text()
    assert "stopped after 1 task" in log, log  # only 'ocupa' ran


def test_sigterm_on_worker_finishes_what_it_holds(cluster: Cluster) -> None:
    """
    SIGTERM on a worker holding a task: it finishes it, the client gets the
    reply, and the worker exits; the task is not delivered again.
    """
    w1 = cluster.worker("w1")
    port = cluster.orchestrator()
    client = LineSocket(port, timeout=20)
    client.send_json({"tarea_id": "t", "tipo": "sleep", "contenido": 1})
    time.sleep(0.4)
    w1.send_signal(signal.SIGTERM)
    reply = client.read_json()
    assert (reply["tarea_id"], reply["estado"]) == ("t", "ok")
    assert w1.wait(15) is not None
    cluster.worker("w2")
    time.sleep(1.0)
    assert "stopped after" not in (cluster.tmp / "w2.log").read_text()
    connection, channel = _blocking_channel()
    try:
        queue = channel.queue_declare(f"{cluster.prefix}.tareas", passive=True)
        assert queue.method.message_count == 0
    finally:
        connection.close()


def test_backlog_is_bounded(cluster: Cluster) -> None:
    """
    With no worker, the broker's task queue holds about --max-backlog tasks
    (a quorum queue may take one more than its limit); the next ones are
    answered 'ocupado' at once.
    """
    port = cluster.orchestrator("--max-backlog", "3", "--timeout", "4")
    client = LineSocket(port, timeout=20)
    for i in range(8):
        client.send_json({"tarea_id": str(i), "tipo": 1, "contenido": "x"})
        time.sleep(0.1)
    # Read in whatever order they come: a loaded broker may answer the
    # refusals after the first tasks have timed out.
    codes = {r["tarea_id"]: r["codigo"] for r in (client.read_json() for _ in range(8))}
    assert [codes[str(i)] for i in range(3)] == ["timeout"] * 3, codes
    assert codes["3"] in ("timeout", "ocupado"), codes
    assert [codes[str(i)] for i in range(4, 8)] == ["ocupado"] * 4, codes
    client.close()


def test_no_broker_gives_a_clear_error(tmp_path: Path) -> None:
    """
    An orchestrator whose broker is not reachable answers tasks with
    'broker_no_disponible' at once, and control requests as usual.
    """
    port = free_port()
    dead = free_port()
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "pfo3", "--port", f"tcp:{port}:interface=127.0.0.1",
         "--broker", f"amqp://guest:guest@127.0.0.1:{dead}/%2F"],
        cwd=tmp_path, env=server_env(), stdout=(tmp_path / "o.log").open("wb"),
        stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc=proc)
        replies = send_all(port, [{"tarea_id": "t", "tipo": 1, "contenido": "x"},
                                  {"op": "ping", "tarea_id": "p"}], deadline=5)
        assert replies["t"]["codigo"] == "broker_no_disponible"
        assert replies["p"]["resultado"] == "pong"
    finally:
        proc.terminate()
        proc.wait(15)


def test_store_records_tasks_run_by_workers(cluster: Cluster) -> None:
    """
    In distributed mode the orchestrator records the task a worker ran: a
    background task (esperar: false) is accepted at once, and op estado
    then shows its result and the worker that ran it.
    """
    cluster.worker("w1")
    port = cluster.orchestrator("--store", "memory:")
    client = LineSocket(port, timeout=20)
    client.send_json({"tarea_id": "fondo", "tipo": "sleep", "contenido": 0.3,
                      "esperar": False})
    assert client.read_json()["estado"] == "aceptada"

    def finished() -> bool:
        client.send_json({"op": "estado", "tarea_id": "fondo"})
        return client.read_json()["resultado"]["estado"] == "ok"

    until(finished)
    client.send_json({"op": "estado", "tarea_id": "fondo"})
    record = client.read_json()["resultado"]
    assert record["resultado"] == "Esperé 0.3 segundos"
    assert record["worker"].startswith("w1/")
    client.close()


def test_killed_orchestrator_loses_no_accepted_task(
    cluster: Cluster, pg_database: Database,  # noqa: F811
) -> None:
    """
    kill -9 of an orchestrator while a worker runs the background tasks it
    accepted: started again under its name, it records each task's result
    in the store shared with a second orchestrator, which reports every one
    'ok' with its result, each recorded once.
    """
    cluster.worker("w1", "--capacity", "8")
    store = ["--store", pg_database.url]
    a = cluster.orchestrator(*store, name="oa")
    b = cluster.orchestrator(*store, name="ob")
    ids = [f"fondo{i}" for i in range(6)]
    client = LineSocket(a, timeout=20)
    for tarea_id in ids:
        client.send_json({"tarea_id": tarea_id, "tipo": "sleep", "contenido": 2,
                          "esperar": False})
    assert [client.read_json()["estado"] for _ in ids] == ["aceptada"] * len(ids)
    observer = LineSocket(b, timeout=20)

    def states() -> Dict[str, Any]:
        found = {}
        for tarea_id in ids:
            observer.send_json({"op": "estado", "tarea_id": tarea_id})
            reply = observer.read_json()
            found[tarea_id] = reply.get("resultado", reply)
        return found

    until(lambda: all(r.get("estado") == "en_curso" for r in states().values()))
    orchestrator_a = cluster.procs[1]
    orchestrator_a.send_signal(signal.SIGKILL)
    orchestrator_a.wait(5)
    client.close()
    time.sleep(2.5)  # the worker finishes them; their replies wait for "oa"
    assert all(r["estado"] == "en_curso" for r in states().values())
    cluster.orchestrator(*store, name="oa")
    until(lambda: all(r.get("estado") == "ok" for r in states().values()))
    for tarea_id, record in states().items():
        assert record["resultado"] == "Esperé 2 segundos", (tarea_id, record)
        assert record["worker"].startswith("w1/"), (tarea_id, record)
    observer.close()
    rows = pg_database.query("SELECT tarea_id, estado FROM pfo3_tareas ORDER BY tarea_id")
    assert rows == [(tarea_id, "ok") for tarea_id in ids]
    log = (cluster.tmp / "oa.log").read_text()
    assert sorted(line.split("Recorded task ")[1].split()[0]
                  for line in log.splitlines() if "Recorded task " in line) == ids
    connection, channel = _blocking_channel()
    try:
        queue = channel.queue_declare(f"{cluster.prefix}.respuestas.oa", passive=True)
        assert queue.method.message_count == 0
    finally:
        connection.close()


def test_batch_held_by_a_killed_worker_is_split(cluster: Cluster) -> None:
    """
    Inline tasks sent together go to the broker as one batch.  A worker that
    received it and died before answering (stopped, then killed): the next
    worker splits the batch into messages of their own and runs them; the
    client gets one reply per task.
    """
    w0 = cluster.worker("w0")
    port = cluster.orchestrator()
    w0.send_signal(signal.SIGSTOP)  # it takes the batch and answers nothing
    client = LineSocket(port, timeout=30)
    client.send(b"".join(json.dumps({"tarea_id": f"t{i}", "tipo": "mayus",
                                     "contenido": f"t{i}"}).encode() + b"\n"
                         for i in range(4)))
    time.sleep(0.5)  # published as one batch, delivered to w0
    w0.send_signal(signal.SIGKILL)
    w0.wait(5)
    cluster.worker("w1")
    replies = [client.read_json() for _ in range(4)]
    assert sorted((r["tarea_id"], r["resultado"], r["worker"][:3]) for r in replies) == [
        (f"t{i}", f"T{i}", "w1/") for i in range(4)]
    assert "A batch of 4 tasks came again" in cluster.wait_log("w1.log", "came again")
    client.sock.settimeout(1.5)
    with pytest.raises(socket.timeout):
        client.read_line()  # no second reply
    client.close()
