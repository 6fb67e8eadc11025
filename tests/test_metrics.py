"""
Tests of C{--metrics} (L{pfo3.metrics}), C{--log-format json}
(L{pfo3.logs}) and their options, in memory with a fake clock: a scrape
parsed back gives the counts of a known sequence of tasks, refusals and
timeouts; C{/healthz} follows draining and the broker; the listener outlives
the drain; a worker exposes its own counters; JSON log lines carry the
task's fields.
"""

from __future__ import annotations

import io
import json
from typing import Any, Dict, List, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import Application, IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogLevel
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from pfo3 import tap
from pfo3.amqp import tap as worker_tap
from pfo3.logs import event_as_json, json_observer
from pfo3.metrics import MetricsResource, WorkerCollector, server_registry
from pfo3.service import TaskServerService
from pfo3.stats import BrokerProbe, ServerStats
from pfo3.store import MemoryStore
from pfo3.tasks import BUILTINS, TaskRegistry
from pfo3.testing import FakeReactor, make_server

from .conftest import connect_transport, take_replies
from .test_amqp import Cluster
from .test_stats import never_registry

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def scrape(registry: Any) -> Samples:
    """
    @return: Every sample of a scrape of C{registry}, parsed back from the
        text format, by (name, sorted labels).
    """
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode("utf-8")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def get(resource: MetricsResource, path: bytes) -> Tuple[int, bytes, Dict[bytes, Any]]:
    """
    @return: The status, body and headers of a GET of C{path}.
    """
    request = DummyRequest([])
    request.path = path
    result = resource.render_GET(request)
    if isinstance(result, bytes):
        request.write(result)
        request.finish()
    assert request.finished
    headers = dict(request.responseHeaders.getAllRawHeaders())
    return request.responseCode or 200, b"".join(request.written), headers


class ServerMetricsTests(SynchronousTestCase):
    """
    The server's collector and the HTTP resource.
    """

    def setUp(self) -> None:
        self.pending: List[Deferred[Any]] = []
        self.reactor = FakeReactor()
        self.factory = make_server(never_registry(self.pending), reactor=self.reactor,
                                   timeout=10, max_tasks=3, store=MemoryStore(self.reactor))
        self.stats = ServerStats(self.factory)
        self.registry = server_registry(self.stats)
        self.resource = MetricsResource(self.registry, self.stats.healthy)
        self.proto, self.transport = connect_transport(self.factory)

    def test_known_sequence(self) -> None:
        """
        After inline tasks, a sleep, a timeout, a refusal for a full server
        and a bad line, the scrape has each count, the histogram (inline
        tasks at 0), what is in flight and the connections.
        """
        self.proto.dataReceived(
            b'{"tipo": "uppercase", "contenido": "a"}\n'
            b'{"tipo": "reverse", "contenido": "b"}\n'
            b'{"tipo": "sleep", "contenido": 1, "tarea_id": "s"}\n'
            b'{"tipo": "nunca", "contenido": 1, "tarea_id": "n1"}\n'
            b'{"tipo": "nunca", "contenido": 1, "tarea_id": "n2"}\n'
            b'{"tipo": "nunca", "contenido": 1, "tarea_id": "n3"}\n'
            b'[]\n')
        self.reactor.advance(1)
        samples = scrape(self.registry)
        self.assertEqual(samples[("pfo3_tasks_in_flight", ())], 2)
        self.reactor.advance(9)
        take_replies(self.transport)
        samples = scrape(self.registry)
        tasks = {labels: v for (name, labels), v in samples.items()
                 if name == "pfo3_tasks_total"}
        self.assertEqual(tasks, {
            (("estado", "ok"), ("tipo", "uppercase")): 1,
            (("estado", "ok"), ("tipo", "reverse")): 1,
            (("estado", "ok"), ("tipo", "sleep")): 1,
            (("estado", "timeout"), ("tipo", "nunca")): 2,
        })
        errors = {dict(labels)["codigo"]: v for (name, labels), v in samples.items()
                  if name == "pfo3_errors_total"}
        self.assertEqual(errors, {"ocupado": 1, "no_es_objeto": 1, "timeout": 2})
        hist = "pfo3_task_duration_seconds"
        self.assertEqual(samples[(f"{hist}_count", ())], 5)
        self.assertEqual(samples[(f"{hist}_sum", ())], 21.0)
        self.assertEqual(samples[(f"{hist}_bucket", (("le", "0.0005"),))], 2)
        self.assertEqual(samples[(f"{hist}_bucket", (("le", "1.0"),))], 3)
        self.assertEqual(samples[(f"{hist}_bucket", (("le", "10.0"),))], 5)
        self.assertEqual(samples[(f"{hist}_bucket", (("le", "+Inf"),))], 5)
        self.assertEqual(samples[("pfo3_tasks_in_flight", ())], 0)
        self.assertEqual(samples[("pfo3_connections", ())], 1)
        self.assertEqual(samples[("pfo3_store_pending", ())], 0)
        self.assertEqual(samples[("pfo3_store_dropped_total", ())], 0)
        self.assertEqual(samples[("pfo3_draining", ())], 0)
        self.assertEqual(samples[("pfo3_uptime_seconds", ())], 10)
        self.assertEqual(samples[("pfo3_executor_threads", ())], 1)
        self.assertNotIn(("pfo3_broker_up", ()), samples)

    def test_http(self) -> None:
        """
        /metrics answers the text format with Prometheus's content type;
        /healthz 200 while serving and 503 while draining; anything else 404.
        """
        status, body, headers = get(self.resource, b"/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b"pfo3_tasks_in_flight 0.0", body)
        self.assertTrue(headers[b"Content-Type"][0].startswith(b"text/plain; version=0.0.4"))
        self.assertEqual(get(self.resource, b"/healthz")[:2], (200, b"ok\n"))
        self.factory.orchestrator.drain()
        self.assertEqual(get(self.resource, b"/healthz")[:2], (503, b"draining\n"))
        self.assertEqual(get(self.resource, b"/nada")[0], 404)

    def test_listener_outlives_the_drain(self) -> None:
        """
        The metrics listener starts with the server and stops only after
        the tasks in flight were answered, so /healthz can say 503 while the
        server drains.
        """
        metrics = Service()
        service = TaskServerService(self.factory, self.factory.orchestrator.executor,
                                    self.reactor, stats=self.stats, metrics=metrics)
        service.startService()
        self.assertTrue(metrics.running)
        self.proto.dataReceived(b'{"tipo": "sleep", "contenido": 2}\n')
        stopped = service.stopService()
        self.assertTrue(metrics.running)
        self.assertEqual(self.stats.healthy(), (False, "draining"))
        self.reactor.advance(2)
        self.proto.connectionLost()
        self.successResultOf(stopped)
        self.assertFalse(metrics.running)


class BrokerMetricsTests(SynchronousTestCase):
    """
    In distributed mode: the broker's gauges, the health check, and the
    worker's own metrics.
    """

    def setUp(self) -> None:
        self.cluster = Cluster(TaskRegistry(BUILTINS))
        self.probe = BrokerProbe(self.cluster.view, self.cluster.topology.tasks,
                                 self.cluster.clock)
        self.stats = ServerStats(self.cluster.factory, self.probe)
        self.resource = MetricsResource(server_registry(self.stats), self.stats.healthy,
                                        self.probe.refresh)

    def samples(self) -> Dict[str, Any]:
        status, body, _ = get(self.resource, b"/metrics")
        self.assertEqual(status, 200)
        out: Dict[str, Any] = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                if not s.labels:
                    out[s.name] = s.value
        return out

    def test_queue_depth_then_worker(self) -> None:
        """
        A scrape asks the broker for the queue's depth first: two messages
        waiting (tasks sent apart), no consumer; after a worker ran them, an
        empty queue, one consumer, and the worker's own counters.
        """
        proto, transport = self.cluster.client()
        proto.dataReceived(b'{"tipo": "uppercase", "contenido": "a"}\n')
        self.cluster.clock.advance(0)
        proto.dataReceived(b'{"tipo": "reverse", "contenido": "b"}\n')
        self.cluster.clock.advance(0)
        samples = self.samples()
        self.assertEqual((samples["pfo3_broker_up"], samples["pfo3_broker_queue_depth"],
                          samples["pfo3_broker_queue_consumers"]), (1, 2, 0))
        worker = self.cluster.worker("w1")
        self.cluster.clock.advance(1)
        samples = self.samples()
        self.assertEqual((samples["pfo3_broker_queue_depth"],
                          samples["pfo3_broker_queue_consumers"]), (0, 1))
        self.assertEqual(len(take_replies(transport)), 2)
        worker_registry = CollectorRegistry(auto_describe=False)
        worker_registry.register(WorkerCollector(worker))
        ws = scrape(worker_registry)
        self.assertEqual(ws[("pfo3_worker_tasks_total",
                             (("estado", "ok"), ("tipo", "uppercase")))], 1)
        self.assertEqual(ws[("pfo3_worker_tasks_total",
                             (("estado", "ok"), ("tipo", "reverse")))], 1)
        self.assertEqual(ws[("pfo3_worker_task_duration_seconds_count", ())], 2)
        self.assertEqual(ws[("pfo3_worker_held_tasks", ())], 0)
        self.assertEqual(ws[("pfo3_worker_capacity", ())], 8)

    def test_broker_down_is_unhealthy(self) -> None:
        """
        Without the broker, /healthz is 503 and the scrape says the broker
        is down, without a depth.
        """
        self.cluster.view.lose()
        self.assertEqual(get(self.resource, b"/healthz")[:2], (503, b"broker down\n"))
        samples = self.samples()
        self.assertEqual(samples["pfo3_broker_up"], 0)
        self.assertNotIn("pfo3_broker_queue_depth", samples)


class JSONLogTests(SynchronousTestCase):
    """
    C{--log-format json}.
    """

    def test_task_event_fields(self) -> None:
        """
        A per-task event becomes one JSON object with its message and the
        task's fields; an anonymous identity is left out.
        """
        event = {
            "log_format": "tarea {tarea_id} tipo={tipo}", "log_level": LogLevel.info,
            "log_namespace": "pfo3", "log_time": 0.0, "tarea_id": "t1", "tipo": "sleep",
            "worker": 0, "estado": "ok", "duration": 0.5, "peer": "127.0.0.1:5",
            "identity": "-",
        }
        obj = json.loads(event_as_json(event))
        self.assertEqual(obj, {
            "time": "1970-01-01T00:00:00.000000+00:00", "level": "info", "namespace": "pfo3",
            "message": "tarea t1 tipo=sleep", "tarea_id": "t1", "tipo": "sleep",
            "worker": 0, "estado": "ok", "duration": 0.5, "peer": "127.0.0.1:5",
        })
        event["identity"] = "alice"
        self.assertEqual(json.loads(event_as_json(event))["identity"], "alice")

    def test_observer_writes_lines(self) -> None:
        """
        The observer writes one line per event, even for a field JSON
        cannot carry (written as its repr).
        """
        out = io.StringIO()
        observe = json_observer(out)
        observe({"log_format": "a", "log_level": LogLevel.warn, "log_time": 1.0, "x": {1, 2}})
        observe({"log_format": "b", "log_level": LogLevel.info, "log_time": 2.0})
        lines = out.getvalue().splitlines()
        self.assertEqual([json.loads(line)["message"] for line in lines], ["a", "b"])
        self.assertEqual(json.loads(lines[0])["x"], "{1, 2}")

    def test_twistd_application_gets_the_observer(self) -> None:
        """
        With --log-format json, the service makes the JSON observer the log
        observer of the application twistd gives it (which twistd then uses
        instead of its text one); with text it leaves the application alone.
        """
        for fmt, expected in (("json", True), ("text", False)):
            options = tap.Options()
            options.parseOptions(["--log-format", fmt, "--port", "tcp:0"])
            service = tap.makeService(options, FakeReactor())
            application = Application("pfo3")
            service.setServiceParent(application)
            observer = application.getComponent(ILogObserver, None)
            self.assertEqual(observer is not None, expected)
            self.assertIn(service, list(IService(application)))


class OptionTests(SynchronousTestCase):
    """
    The new options of C{twistd pfo3} and C{twistd pfo3-worker}.
    """

    def test_bad_values(self) -> None:
        """
        An endpoint that cannot be parsed and an unknown log format are
        usage errors, on both commands.
        """
        broker = ["--broker", "amqp://guest:guest@127.0.0.1:5672/%2F"]
        for options, extra in ((tap.Options, []), (worker_tap.Options, broker)):
            with self.assertRaises(usage.UsageError):
                options().parseOptions(["--metrics", "nada:9100", *extra])
            with self.assertRaises(usage.UsageError):
                options().parseOptions(["--log-format", "xml", *extra])

    def test_server_service(self) -> None:
        """
        --metrics gives the server a metrics listener, which is not one of
        its child services (those stop first); without it there is none.
        """
        options = tap.Options()
        options.parseOptions(["--metrics", "tcp:0:interface=127.0.0.1"])
        service = tap.makeService(options, FakeReactor())
        self.assertIsNotNone(service.metrics)
        self.assertNotIn(service.metrics, list(service))
        options = tap.Options()
        options.parseOptions([])
        self.assertIsNone(tap.makeService(options, FakeReactor()).metrics)

    def test_worker_service(self) -> None:
        """
        A worker with --metrics is wrapped with its listener; without
        --metrics or JSON logs it is the bare worker service.
        """
        from pfo3.amqp.worker import WorkerService

        broker = ["--broker", "amqp://guest:guest@127.0.0.1:5672/%2F"]
        options = worker_tap.Options()
        options.parseOptions([*broker, "--metrics", "tcp:0"])
        wrapped = worker_tap.makeService(options, MemoryReactorClock())
        self.assertIsInstance(wrapped, worker_tap.MetricsLast)
        self.assertIsInstance(wrapped.worker, WorkerService)
        self.assertIsNotNone(wrapped.metrics)
        options = worker_tap.Options()
        options.parseOptions(broker)
        self.assertIsInstance(worker_tap.makeService(options, MemoryReactorClock()),
                              WorkerService)

    def test_client_stats_flag(self) -> None:
        """
        pfo3-client --stats takes no task: with --tipo or --batch it is a
        usage error.
        """
        from pfo3.cli import Options as ClientOptions

        options = ClientOptions()
        options.parseOptions(["--stats"])
        self.assertTrue(options["stats"])
        for extra in (["--tipo", "1"], ["--batch"]):
            with self.assertRaises(usage.UsageError):
                ClientOptions().parseOptions(["--stats", *extra])


class _Stopping(Service):
    """
    A service whose stop waits for the test.
    """

    def __init__(self) -> None:
        self.stopping: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stopping


class MetricsLastTests(SynchronousTestCase):
    """
    The worker's metrics listener outlives the worker's stop.
    """

    def test_order(self) -> None:
        """
        The listener starts before the worker and stops only once the
        worker has stopped, so /healthz answers while the worker finishes
        what it holds.
        """
        worker, metrics = _Stopping(), Service()
        both = worker_tap.MetricsLast(worker, metrics)
        both.startService()
        self.assertTrue(worker.running and metrics.running)
        stopped = both.stopService()
        self.assertFalse(worker.running)
        self.assertTrue(metrics.running)
        self.assertNoResult(stopped)
        worker.stopping.callback(None)
        self.successResultOf(stopped)
        self.assertFalse(metrics.running)


class BlobErrorMetricsTests(SynchronousTestCase):
    """
    C{pfo3_blob_errors_total{kind}}: failures of the object storage, counted
    where they happen (the storage's own calls), for tasks and background
    work alike, on the server's and on a worker's metrics.
    """

    def broken_storage(self) -> Any:
        """
        A C{file:} storage whose folder is a regular file: every call fails
        with C{almacen_objetos_no_disponible}; its I/O runs synchronously.
        """
        import os
        import tempfile

        from pfo3.blobs import FileBlobs
        from pfo3.testing import SynchronousThreadPool

        fd, path = tempfile.mkstemp(prefix="pfo3-no-folder-")
        os.write(fd, b"no soy una carpeta")
        os.close(fd)
        self.addCleanup(os.unlink, path)
        pool: Any = SynchronousThreadPool()
        pool.started = True  # FileBlobs.start and stop leave it alone
        return FileBlobs(path, FakeReactor(), threadpool=pool)

    def blob_errors(self, registry: Any) -> Dict[str, float]:
        return {dict(labels)["kind"]: v for (name, labels), v in scrape(registry).items()
                if name == "pfo3_blob_errors_total"}

    def test_server_counts_task_and_background_failures(self) -> None:
        """
        A task whose content the storage cannot read, the retention's sweep
        and the deletion of a forgotten record's objects each count one
        C{unavailable} failure; the scrape reports every kind, zeros too.
        """
        from pfo3 import blobs
        from pfo3.blobs.executor import BlobExecutor
        from pfo3.blobs.options import Retention
        from pfo3.blobs.requests import BlobPolicy
        from pfo3.executor import LocalExecutor
        from pfo3.orchestrator import Orchestrator
        from pfo3.protocol import TaskFactory
        from pfo3.testing import SynchronousThreadPool

        clock = FakeReactor()
        storage = self.broken_storage()
        policy = BlobPolicy(storage)
        orch = Orchestrator(
            TaskRegistry(BUILTINS), BlobExecutor(LocalExecutor(clock, SynchronousThreadPool()),
                                                 policy), clock, blobs=policy)
        registry = server_registry(ServerStats(TaskFactory(orch)))
        self.assertEqual(self.blob_errors(registry),
                         {"unavailable": 0, "access_denied": 0, "bucket_missing": 0})
        proto, transport = connect_transport(TaskFactory(orch))
        proto.dataReceived(json.dumps({"tipo": "uppercase", "contenido_ref": blobs.new_ref(),
                                       "tarea_id": "c"}).encode() + b"\n")
        [reply] = take_replies(transport)
        self.assertEqual(reply["codigo"], "almacen_objetos_no_disponible")
        self.assertEqual(self.blob_errors(registry)["unavailable"], 1)
        retention = Retention(storage, clock, 3600)
        retention.sweep()
        self.assertEqual(self.blob_errors(registry)["unavailable"], 2)
        policy.forget([blobs.new_ref()])
        self.assertEqual(self.blob_errors(registry),
                         {"unavailable": 3, "access_denied": 0, "bucket_missing": 0})

    def test_kinds(self) -> None:
        """
        Refused credentials and a missing bucket count as their own kinds;
        a missing object is no failure of the storage.
        """
        from collections import Counter

        from twisted.internet.defer import fail

        from pfo3 import blobs
        from pfo3.errors import BlobAccessDenied, BlobBucketMissing, UnknownRef

        errors: Counter[str] = Counter()
        for error in (BlobAccessDenied("no"), BlobBucketMissing("no"), UnknownRef("no")):
            d: Deferred[Any] = blobs.counted(fail(error), errors)
            self.failureResultOf(d, type(error))
        self.assertEqual(errors, {"access_denied": 1, "bucket_missing": 1})

    def test_server_without_blobs_reports_none(self) -> None:
        """
        Without object storage there is no C{pfo3_blob_errors_total}.
        """
        registry = server_registry(ServerStats(make_server(reactor=FakeReactor())))
        self.assertEqual(self.blob_errors(registry), {})

    def test_worker_counts_failures(self) -> None:
        """
        In distributed mode the worker reads the objects: its storage's
        failure is answered to the client and counted on the worker's
        metrics.
        """
        from pfo3 import blobs
        from pfo3.amqp.worker import WorkerService
        from pfo3.blobs import MemoryBlobs
        from pfo3.blobs.executor import BlobExecutor
        from pfo3.blobs.requests import BlobPolicy
        from pfo3.executor import LocalExecutor
        from pfo3.testing import SynchronousThreadPool

        cluster = Cluster(TaskRegistry(BUILTINS))
        cluster.orchestrator.blobs = BlobPolicy(MemoryBlobs())
        holder: List[WorkerService] = []
        view = cluster.broker.view(lambda raw, ch: holder[0].setup(raw, ch), prefetch=8)
        executor = BlobExecutor(LocalExecutor(cluster.clock, SynchronousThreadPool()),
                                BlobPolicy(self.broken_storage()))
        worker = WorkerService(cluster.clock, "amqp://unused", cluster.topology,
                               cluster.registry, executor, "w1", capacity=8, timeout=20,
                               broker=view)  # type: ignore[arg-type]
        holder.append(worker)
        worker.startService()
        proto, transport = cluster.client()
        proto.dataReceived(json.dumps({"tipo": "uppercase", "contenido_ref": blobs.new_ref(),
                                       "tarea_id": "c"}).encode() + b"\n")
        cluster.clock.advance(1)
        [reply] = take_replies(transport)
        self.assertEqual(reply["codigo"], "almacen_objetos_no_disponible")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkerCollector(worker))
        self.assertEqual(self.blob_errors(registry),
                         {"unavailable": 1, "access_denied": 0, "bucket_missing": 0})
