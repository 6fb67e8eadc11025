"""
Integration tests of the operations interface with real processes: a real
C{twistd -n pfo3 --metrics} scraped over HTTP, its C{/healthz} during a
drain, C{pfo3-client --stats}, C{--log-format json} on twistd's output, and
a real C{twistd pfo3-worker --metrics} with an orchestrator on the real
RabbitMQ at 127.0.0.1:5672.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import LineSocket, free_port, server_env, start_server, wait_for_port
from .test_distributed import BROKER, Cluster, cluster  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration


def http_get(port: int, path: str) -> Tuple[int, bytes]:
    """
    @return: The status and body of C{GET http://127.0.0.1:PORT/PATH}.
    """
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(port: int) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    status, body = http_get(port, "/metrics")
    assert status == 200, body
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def until(condition: Callable[[], Any], deadline: float = 15.0) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_metrics_and_stats_of_a_real_server(tmp_path: Path) -> None:
    """
    twistd pfo3 --metrics serves /healthz (200) and /metrics, whose counts
    move with the tasks sent; pfo3-client --stats prints the same counts.
    """
    mport = free_port()
    server = start_server(tmp_path, "--metrics", f"tcp:{mport}:interface=127.0.0.1")
    try:
        wait_for_port(mport, proc=server.proc)
        assert http_get(mport, "/healthz") == (200, b"ok\n")
        before = scrape(mport)
        assert before[("pfo3_tasks_in_flight", ())] == 0
        assert ("pfo3_tasks_total", (("estado", "ok"), ("tipo", "uppercase"))) not in before
        c = LineSocket(server.port)
        for i in range(5):
            c.send_json({"tarea_id": f"u{i}", "tipo": "uppercase", "contenido": "a"})
        c.send_json({"tarea_id": "s", "tipo": "sleep", "contenido": 0.2})
        c.send(b"no json\n")
        c.read_many(7)
        after = scrape(mport)
        assert after[("pfo3_tasks_total", (("estado", "ok"), ("tipo", "uppercase")))] == 5
        assert after[("pfo3_tasks_total", (("estado", "ok"), ("tipo", "sleep")))] == 1
        assert after[("pfo3_errors_total", (("codigo", "json_invalido"),))] == 1
        assert after[("pfo3_task_duration_seconds_count", ())] == 6
        assert after[("pfo3_task_duration_seconds_bucket", (("le", "0.25"),))] == 6
        assert after[("pfo3_task_duration_seconds_bucket", (("le", "0.1"),))] == 5
        assert after[("pfo3_connections", ())] == 1
        out = subprocess.run(
            [str(Path(sys.executable).parent / "pfo3-client"), "--port", str(server.port),
             "--stats", "--timeout", "10"],
            capture_output=True, text=True, timeout=30, env=server_env())
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)
        assert stats["tareas"] == {"sleep": {"ok": 1}, "uppercase": {"ok": 5}}
        assert stats["errores"] == {"json_invalido": 1}
        assert stats["conexiones"] == 2
        assert stats["latencia"]["tareas"] == 1 and stats["latencia"]["p50"] >= 0.2
        c.close()
    finally:
        server.stop()


def test_healthz_is_503_while_draining(tmp_path: Path) -> None:
    """
    After SIGTERM, while a task in flight is finishing, the metrics port
    still answers and /healthz says 503 draining; the process then exits.
    """
    mport = free_port()
    server = start_server(tmp_path, "--metrics", f"tcp:{mport}:interface=127.0.0.1")
    try:
        wait_for_port(mport, proc=server.proc)
        c = LineSocket(server.port)
        c.send_json({"tarea_id": "s", "tipo": "sleep", "contenido": 3})
        until(lambda: scrape(mport)[("pfo3_tasks_in_flight", ())] == 1)
        server.proc.send_signal(signal.SIGTERM)
        assert until(lambda: http_get(mport, "/healthz")[0] == 503)
        assert http_get(mport, "/healthz") == (503, b"draining\n")
        assert c.read_json()["resultado"] == "Esperé 3 segundos"
        assert server.proc.wait(20) == -signal.SIGTERM
    finally:
        server.stop()


def test_json_logs(tmp_path: Path) -> None:
    """
    With --log-format json every line twistd writes is a JSON object, and
    a --log-tasks event carries the task's fields.
    """
    server = start_server(tmp_path, "--log-format", "json", "--log-tasks", "1")
    try:
        c = LineSocket(server.port)
        c.send_json({"tarea_id": "t1", "tipo": "reverse", "contenido": "hola"})
        assert c.read_json()["resultado"] == "aloh"
        c.close()

        def task_event() -> Any:
            for line in server.log.read_text().splitlines():
                event = json.loads(line)
                if event.get("tarea_id") == "t1":
                    return event
            return None

        event = until(task_event)
        assert {k: event[k] for k in ("tipo", "worker", "estado")} == {
            "tipo": "reverse", "worker": 0, "estado": "ok"}
        assert event["peer"].startswith("127.0.0.1:")
        assert isinstance(event["duration"], float)
        assert "identity" not in event
        assert event["level"] == "info" and event["message"].startswith("tarea t1 ")
    finally:
        server.stop()
    for line in server.log.read_text().splitlines():
        json.loads(line)


def test_worker_and_orchestrator_metrics_on_rabbitmq(cluster: Cluster) -> None:  # noqa: F811
    """
    With RabbitMQ: an orchestrator's /metrics shows the broker up, the
    queue's depth and consumers; a pfo3-worker --metrics shows its own
    task counts after running tasks, and /healthz 200 on both.
    """
    oport = free_port()
    port = cluster.orchestrator("--metrics", f"tcp:{oport}:interface=127.0.0.1")
    samples = scrape(oport)
    assert samples[("pfo3_broker_up", ())] == 1
    assert samples[("pfo3_broker_queue_consumers", ())] == 0
    c = LineSocket(port)
    c.send_json({"tarea_id": "q", "tipo": "uppercase", "contenido": "a"})
    until(lambda: scrape(oport).get(("pfo3_broker_queue_depth", ())) == 1)
    assert scrape(oport)[("pfo3_broker_oldest_task_age_seconds", ())] >= 0
    wport = free_port()
    cluster.worker("w1", "--metrics", f"tcp:{wport}:interface=127.0.0.1")
    assert c.read_json()["resultado"] == "A"
    c.send_json({"tarea_id": "s", "tipo": "sleep", "contenido": 0.1})
    assert c.read_json()["tarea_id"] == "s"
    ws = scrape(wport)
    assert ws[("pfo3_worker_tasks_total", (("estado", "ok"), ("tipo", "uppercase")))] == 1
    assert ws[("pfo3_worker_tasks_total", (("estado", "ok"), ("tipo", "sleep")))] == 1
    assert ws[("pfo3_worker_task_duration_seconds_count", ())] == 2
    assert ws[("pfo3_broker_up", ())] == 1
    assert http_get(wport, "/healthz") == (200, b"ok\n")
    samples = until(lambda: (lambda s: s if s[("pfo3_broker_queue_consumers", ())] == 1
                             else None)(scrape(oport)))
    assert samples[("pfo3_broker_queue_depth", ())] == 0
    assert samples[("pfo3_tasks_total", (("estado", "ok"), ("tipo", "uppercase")))] == 1
    assert http_get(oport, "/healthz") == (200, b"ok\n")
    c.close()
