"""
Throughput and latency of the web gateway against the TCP protocol, in one
run against one real C{twistd -n pfo3 --web}: the figures of C{docs/web.md}
("Performance").  Each protocol carries the same inline task (C{uppercase})
from one Python client process; the test prints tasks/s and latency
percentiles and checks only that every task was answered.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest

from pfo3.web.panel import percentile

from .conftest import LineSocket
from .test_web_process import Web, start_web

pytestmark = pytest.mark.integration

TASKS = 3000
WINDOW = 50
HTTP_CLIENTS = 8


def pipelined(send: Callable[[str], None], recv: Callable[[], Dict[str, object]]) -> List[float]:
    """
    Keep C{WINDOW} tasks in flight on one connection until C{TASKS} are
    answered.

    @return: Each task's latency, in seconds.
    """
    started: Dict[str, float] = {}
    latencies: List[float] = []
    sent = 0
    while len(latencies) < TASKS:
        while sent < TASKS and len(started) < WINDOW:
            tid = f"t{sent}"
            started[tid] = time.perf_counter()
            send(json.dumps({"tarea_id": tid, "tipo": "uppercase", "contenido": "hola"}))
            sent += 1
        reply = recv()
        assert reply["estado"] == "ok", reply
        latencies.append(time.perf_counter() - started.pop(str(reply["tarea_id"])))
    return latencies


def over_tcp(web: Web) -> List[float]:
    tcp = LineSocket(web.server.port)
    try:
        return pipelined(lambda text: tcp.send(text.encode() + b"\n"), tcp.read_json)
    finally:
        tcp.close()


def over_websocket(web: Web) -> List[float]:
    with web.ws() as ws:
        return pipelined(ws.send, lambda: json.loads(ws.recv(timeout=10)))


def over_http(web: Web) -> List[float]:
    latencies: List[float] = []
    lock = threading.Lock()
    body = json.dumps({"tipo": "uppercase", "contenido": "hola"})

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
        mine = []
        for _ in range(TASKS // HTTP_CLIENTS):
            started = time.perf_counter()
            connection.request("POST", "/tareas", body)
            response = connection.getresponse()
            assert response.status == 200, response.read()
            response.read()
            mine.append(time.perf_counter() - started)
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(HTTP_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(latencies) == TASKS // HTTP_CLIENTS * HTTP_CLIENTS
    return latencies


def measure(run: Callable[[Web], List[float]], web: Web) -> Tuple[float, float, float]:
    started = time.perf_counter()
    latencies = sorted(run(web))
    elapsed = time.perf_counter() - started
    return (len(latencies) / elapsed, percentile(latencies, 0.5) * 1000,
            percentile(latencies, 0.99) * 1000)


def test_throughput_and_latency(tmp_path: Path) -> None:
    """
    TCP, WebSocket and HTTP each answer every one of their tasks; the
    figures (tasks/s, p50 and p99 in ms) are printed side by side.
    """
    web = start_web(tmp_path)
    try:
        over_tcp(web)  # warm up
        figures = {
            f"tcp (1 connection, {WINDOW} in flight)": measure(over_tcp, web),
            f"websocket (1 connection, {WINDOW} in flight)": measure(over_websocket, web),
            f"http ({HTTP_CLIENTS} keep-alive connections)": measure(over_http, web),
        }
    finally:
        web.server.stop()
    print()
    print("| protocol | tasks/s | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for name, (rate, p50, p99) in figures.items():
        print(f"| {name} | {rate:,.0f} | {p50:.2f} | {p99:.2f} |")
    assert all(rate > 0 for rate, _, _ in figures.values())
