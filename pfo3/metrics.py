"""
C{--metrics ENDPOINT}: Prometheus metrics and a health check over HTTP.

The numbers are the plain counters the server keeps anyway
(L{pfo3.tally.Tally}, tasks in flight, connections, the store's backlog);
a custom collector turns them into metric families when Prometheus scrapes,
on its own L{CollectorRegistry}.  No task pays for a lock or a
C{prometheus_client} object.  The scrape runs in the event loop (a small
L{twisted.web} resource calling C{generate_latest}), never on the task
thread pool; in distributed mode it first asks the broker for the queue's
depth (L{pfo3.stats.BrokerProbe}, at most once a second).

  - C{GET /metrics}: the text exposition format.
  - C{GET /healthz}: 200 C{ok} while the server takes tasks; 503 with the
    reason while it drains (after SIGTERM) or, in distributed mode, while
    it has no broker connection.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Tuple

from prometheus_client import generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from pfo3.stats import BrokerProbe, ServerStats
from pfo3.tally import Tally

#: The classic text format, which every Prometheus version reads (recent
#: prometheus_client releases call the same bytes version 1.0.0).
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: Health: (takes work, why not).
Health = Callable[[], Tuple[bool, str]]


def _tally_families(prefix: str, tally: Tally) -> Iterator[Metric]:
    tasks = CounterMetricFamily(
        f"{prefix}_tasks", "Tasks that ended, by task type and final state.",
        labels=["tipo", "estado"])
    for (tipo, estado), n in sorted(tally.by_outcome().items()):
        tasks.add_metric([tipo, estado], n)
    yield tasks
    buckets, _, total = tally.histogram()
    yield HistogramMetricFamily(
        f"{prefix}_task_duration_seconds",
        "Seconds from a task's start to its end; tasks answered inline count as 0.",
        buckets=buckets, sum_value=total)


def _blob_families(policy: Any) -> Iterator[Metric]:
    """
    @param policy: The process's L{pfo3.blobs.requests.BlobPolicy}, or
        L{None} without object storage (then nothing is reported).
    """
    if policy is None:
        return
    from pfo3.blobs import ERROR_KINDS

    errors = policy.store.errors
    family = CounterMetricFamily(
        "pfo3_blob_errors",
        "Failures of the object storage (--blobs), by kind: unavailable (down, unreachable, "
        "timed out, failed), access_denied (credentials refused), bucket_missing; counted "
        "for tasks, uploads and the background deletions and sweeps alike.",
        labels=["kind"])
    for kind in ERROR_KINDS:
        family.add_metric([kind], errors[kind])
    yield family


def _broker_families(probe: BrokerProbe) -> Iterator[Metric]:
    yield GaugeMetricFamily("pfo3_broker_up", "1 while connected to the broker.",
                            value=1 if probe.connected else 0)
    if probe.depth is not None:
        yield GaugeMetricFamily(
            "pfo3_broker_queue_depth",
            "Messages waiting in the broker's task queue (each one task, or a batch of "
            "inline tasks sent together).",
            value=probe.depth)
    if probe.consumers is not None:
        yield GaugeMetricFamily(
            "pfo3_broker_queue_consumers", "Consumers (worker channels) of the task queue.",
            value=probe.consumers)
    age = probe.oldest_age()
    if age is not None:
        yield GaugeMetricFamily(
            "pfo3_broker_oldest_task_age_seconds",
            "Approximate age of the oldest task in the queue: 0 when it is empty, else "
            "the age of the oldest task this process published and has no reply for.",
            value=age)


class ServerCollector(Collector):
    """
    The metrics of a C{twistd pfo3} server, read from its counters at
    scrape time.
    """

    def __init__(self, stats: ServerStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        counts = stats.counts()
        tally = counts.tally
        yield from _tally_families("pfo3", tally)
        errors = CounterMetricFamily(
            "pfo3_errors", "Error lines answered, by codigo: refusals (ocupado, apagando, "
            "token_faltante, json_invalido, ...) and failed tasks (timeout, tarea_fallida).",
            labels=["codigo"])
        for codigo, n in sorted(tally.errors.items()):
            errors.add_metric([codigo], n)
        yield errors
        yield GaugeMetricFamily("pfo3_tasks_in_flight",
                                "Tasks accepted and not yet answered.", value=counts.in_flight)
        yield GaugeMetricFamily("pfo3_connections", "Open client connections.",
                                value=counts.connections or 0)
        yield GaugeMetricFamily("pfo3_executor_threads",
                                "Threads for blocking tasks (0 in distributed mode).",
                                value=counts.threads)
        yield GaugeMetricFamily("pfo3_executor_running",
                                "Blocking task functions running now.", value=counts.running)
        yield GaugeMetricFamily(
            "pfo3_executor_abandoned",
            "Blocking task functions still running whose task was given up on.",
            value=counts.abandoned)
        if counts.store_pending is not None:
            yield GaugeMetricFamily("pfo3_store_pending",
                                    "Record updates waiting to be written to the store.",
                                    value=counts.store_pending)
        if counts.store_dropped is not None:
            yield CounterMetricFamily(
                "pfo3_store_dropped",
                "Record updates given up (the store's queue full, or unwritten at stop).",
                value=counts.store_dropped)
        yield GaugeMetricFamily("pfo3_draining", "1 while the server stops and drains.",
                                value=1 if counts.draining else 0)
        yield GaugeMetricFamily("pfo3_uptime_seconds", "Seconds since the server started.",
                                value=stats.orchestrator.clock.seconds() - counts.started)
        yield from _blob_families(stats.orchestrator.blobs)
        if stats.probe is not None:
            yield from _broker_families(stats.probe)


class WorkerCollector(Collector):
    """
    The metrics of a C{twistd pfo3-worker}, read from its counters at
    scrape time.
    """

    def __init__(self, worker: Any, probe: Optional[BrokerProbe] = None) -> None:
        """
        @param worker: A L{pfo3.amqp.worker.WorkerService}.
        """
        self.worker = worker
        self.probe = probe

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        yield from _tally_families("pfo3_worker", w.tally)
        yield GaugeMetricFamily("pfo3_worker_held_tasks",
                                "Tasks received and not yet acknowledged.", value=len(w.held))
        yield GaugeMetricFamily("pfo3_worker_capacity",
                                "Tasks this worker holds at most (prefetch).",
                                value=w.capacity)
        yield GaugeMetricFamily("pfo3_worker_unconfirmed_replies",
                                "Replies published and not yet confirmed by the broker.",
                                value=w._unacked)
        yield GaugeMetricFamily("pfo3_worker_threads", "Threads for blocking tasks.",
                                value=w.executor.workers)
        yield GaugeMetricFamily("pfo3_worker_running", "Blocking task functions running now.",
                                value=w.executor.running)
        yield GaugeMetricFamily("pfo3_uptime_seconds", "Seconds since the worker started.",
                                value=w.reactor.seconds() - w.started)
        # A worker's executor is a BlobExecutor (pfo3.amqp.tap); its policy
        # is None without --blobs.
        yield from _blob_families(getattr(w.executor, "policy", None))
        if self.probe is not None:
            yield from _broker_families(self.probe)


class MetricsResource(Resource):
    """
    C{/metrics} and C{/healthz}; anything else is 404.
    """

    isLeaf = True

    def __init__(
        self, registry: CollectorRegistry, health: Health,
        refresh: Callable[[], Deferred[None]] = lambda: succeed(None),
    ) -> None:
        """
        @param refresh: Called before each scrape (the broker probe).
        """
        super().__init__()
        self.registry = registry
        self.health = health
        self.refresh = refresh

    def render_GET(self, request: Request) -> Any:
        path = request.path.rstrip(b"/") or b"/"
        if path == b"/healthz":
            ok, why = self.health()
            request.setResponseCode(200 if ok else 503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return why.encode("utf-8") + b"\n"
        if path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found: try /metrics or /healthz\n"
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = self.refresh()
        d.addCallback(lambda _: self._scrape(request, gone))
        d.addErrback(self._failed, request, gone)
        return NOT_DONE_YET

    def _scrape(self, request: Request, gone: List[bool]) -> None:
        body = generate_latest(self.registry)
        if gone:
            return
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: Request, gone: List[bool]) -> None:
        if gone or request.finished:
            return
        request.setResponseCode(500)
        request.write(f"scrape failed: {failure.getErrorMessage()}\n".encode())
        request.finish()

    def render_HEAD(self, request: Request) -> Any:
        return self.render_GET(request)


def server_registry(stats: ServerStats) -> CollectorRegistry:
    """
    @return: A registry with the server's collector, and nothing else.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(stats))
    return registry


class _QuietSite(Site):
    """
    A site that writes no access log: a scrape a second would be a log line
    a second.
    """

    def log(self, request: Any) -> None:
        pass


def metrics_service(reactor: Any, description: str, resource: Resource) -> \
        StreamServerEndpointService:
    """
    @return: A service listening on the endpoint C{description} and serving
        C{resource} over HTTP.
    """
    site = _QuietSite(resource)
    site.noisy = False
    site.displayTracebacks = False
    return StreamServerEndpointService(endpoints.serverFromString(reactor, description), site)


def server_metrics(reactor: Any, description: str, stats: ServerStats) -> \
        StreamServerEndpointService:
    """
    @return: The C{--metrics} service of a server.
    """
    refresh = stats.probe.refresh if stats.probe is not None else (lambda: succeed(None))
    return metrics_service(reactor, description, MetricsResource(
        server_registry(stats), stats.healthy, refresh))


def worker_metrics(reactor: Any, description: str, worker: Any) -> StreamServerEndpointService:
    """
    @return: The C{--metrics} service of a worker (L{pfo3.amqp.worker.WorkerService}).
    """
    probe = BrokerProbe(worker.broker, worker.topology.tasks, reactor)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(worker, probe))

    def health() -> Tuple[bool, str]:
        if worker._stopping:
            return False, "draining"
        if worker.broker.channel is None:
            return False, "broker down"
        return True, "ok"

    return metrics_service(reactor, description, MetricsResource(registry, health, probe.refresh))
