"""
Configuration of C{twistd pfo3-worker}, and the broker options it shares
with C{twistd pfo3 --broker}.
"""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python import usage

from pfo3.amqp.topology import Topology
from pfo3.blobs.options import BLOB_PARAMETERS, blob_policy, check_blobs
from pfo3.executor import DaemonThreadPool, LocalExecutor
from pfo3.logs import JSONLogsOnParent
from pfo3.protocol import DEFAULT_MAX_LINE
from pfo3.tasks import default_registry

#: The options both sides of a cluster must agree on (the broker refuses a
#: queue declared again with other arguments).
BROKER_PARAMETERS: List[List[Any]] = [
    ["broker-prefix", None, "pfo3",
     "Prefix of the queue and exchange names on the broker; the orchestrators "
     "and workers of one cluster must use the same one."],
    ["delivery-limit", None, 3,
     "Times a task may be delivered again after its worker stopped while "
     "running it, before it is set aside and answered 'reintentos_agotados'; "
     "the same on every member of the cluster.", int],
    ["max-backlog", None, 100_000,
     "Messages the broker's task queue may hold (a message is one task, or "
     "a batch of up to 16 inline tasks sent together); past it new tasks are "
     "answered 'ocupado'. The same on every member of the cluster.", int],
    ["broker-ca", None, None,
     "With an amqps:// --broker: the certificate authorities that sign the "
     "broker's certificate (a PEM file, or a folder of *.pem), instead of the "
     "system's. The certificate must also name the broker URL's host."],
    ["broker-cert", None, None,
     "With an amqps:// --broker: a client certificate (PEM) to present, for a "
     "broker that requires one (ssl_options.verify = verify_peer, "
     "fail_if_no_peer_cert = true)."],
    ["broker-key", None, None,
     "The private key (PEM) of --broker-cert, if not in the same file."],
]


def check_broker(options: usage.Options) -> None:
    """
    Validate the broker options (in C{postOptions}).
    """
    from pfo3.amqp.connection import broker_url, client_tls, parameters

    try:
        parameters(options["broker"])
        # From here on the URL alone says how to connect (pika's ssl_options).
        options["broker"] = broker_url(options["broker"], options["broker-ca"],
                                       options["broker-cert"], options["broker-key"])
    except Exception as e:
        raise usage.UsageError(f"invalid --broker: {e}")
    try:
        client_tls(options["broker"])
    except ValueError as e:
        raise usage.UsageError(f"TLS to the broker: {e}")
    for name in ("delivery-limit", "max-backlog"):
        if options[name] < 1:
            raise usage.UsageError(f"--{name} must be at least 1, not {options[name]}")
    if not options["broker-prefix"] or any(c.isspace() for c in options["broker-prefix"]):
        raise usage.UsageError("--broker-prefix must be a non-empty name without spaces")


def topology(options: usage.Options) -> Topology:
    """
    @return: The topology the broker options describe.
    """
    return Topology(options["broker-prefix"], options["delivery-limit"],
                    options["max-backlog"])


class Options(usage.Options):
    """
    Command-line options of C{twistd pfo3-worker}.
    """

    synopsis = "--broker amqp://USER:PASSWORD@HOST:5672/VHOST [options]"
    longdesc = (
        "pfo3 worker: consumes the tasks that 'twistd pfo3 --broker URL' "
        "orchestrators publish to RabbitMQ and runs them with the same task "
        "types and executor as a local server (blocking tasks on a thread "
        "pool, sleeps as timers). Start as many as you like, on any machine "
        "that reaches the broker. A task is acknowledged only once its reply "
        "is safe with the broker: if a worker dies, another one runs it."
    )

    _parameters: List[List[Any]] = [
        ["broker", "b", None, "The broker's amqp:// (or amqps://) URL. Required."],
        ["workers", "w", 4, "Threads in the pool that runs blocking tasks.", int],
        ["capacity", "c", 64,
         "Messages this worker holds at once (unacknowledged deliveries): each "
         "one task, or a batch of up to 16 inline tasks sent together.", int],
        ["name", "n", None,
         "This worker's name, shown in replies as 'worker': 'NAME/THREAD' "
         "(default: host name and process id)."],
        ["timeout", "t", 30.0,
         "Seconds a task may run here before it is cancelled (match the "
         "orchestrators' --timeout).", float],
        ["shutdown-timeout", None, 10.0,
         "On SIGTERM/SIGINT, seconds to finish the tasks held before leaving "
         "them to other workers.", float],
        ["max-line", None, DEFAULT_MAX_LINE,
         "Longest reply line, in bytes, this worker produces: with --blobs, a "
         "longer result is stored as an object for a task sent with \"refs\": true "
         "and refused with 'resultado_demasiado_grande' otherwise. Match the "
         "orchestrators' --max-line (they check every reply line they write "
         "against their own). See docs/security.md.", int],
    ]
    optParameters = _parameters + BROKER_PARAMETERS + BLOB_PARAMETERS + [
        ["metrics", None, None,
         "Serve this worker's Prometheus metrics (/metrics) and a health check "
         "(/healthz: 503 while stopping or without a broker) over HTTP on this server "
         "endpoint, e.g. tcp:9101:interface=127.0.0.1. See docs/operations.md."],
        ["log-format", None, "text",
         "text: twistd's log lines; json: one JSON object per log event instead.", str],
    ]

    optFlags: List[List[Optional[str]]] = [
        ["no-plugins", None,
         "Do not load third-party task types from the 'pfo3.tasks' entry points."],
    ]

    def postOptions(self) -> None:
        if not self["broker"]:
            raise usage.UsageError("--broker is required (e.g. amqp://guest:guest@127.0.0.1:5672/%2F)")
        check_broker(self)
        check_blobs(self)
        for name in ("workers", "capacity", "max-line"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1, not {self[name]}")
        for name in ("timeout", "shutdown-timeout"):
            if not 0 < self[name] < float("inf"):
                raise usage.UsageError(f"--{name} must be a positive number of seconds")
        from pfo3.logs import check_operations

        check_operations(self)


def makeService(options: Options, reactor: Any = None) -> Any:
    """
    Assemble a worker from parsed options.
    """
    from pfo3.amqp.executor import default_name
    from pfo3.amqp.worker import WorkerService
    from pfo3.blobs.executor import BlobExecutor

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    registry = default_registry(entry_points=not options["no-plugins"])
    threadpool = DaemonThreadPool(minthreads=0, maxthreads=options["workers"],
                                  name="pfo3-worker")
    # Tasks whose content is an object are read (and large results stored)
    # here; without --blobs they are answered 'blobs_desactivado'.
    executor = BlobExecutor(LocalExecutor(reactor, threadpool),
                            blob_policy(options, reactor, options["max-line"]))
    worker = WorkerService(
        reactor, options["broker"], topology(options), registry, executor,
        options["name"] or default_name(), capacity=options["capacity"],
        timeout=options["timeout"], shutdown_timeout=options["shutdown-timeout"],
    )
    if not options["metrics"] and options["log-format"] == "text":
        return worker
    from pfo3.logs import use_json_logs
    from pfo3.metrics import worker_metrics

    metrics = worker_metrics(reactor, options["metrics"], worker) if options["metrics"] else None
    service = MetricsLast(worker, metrics)
    if options["log-format"] == "json":
        use_json_logs(service)
    return service


class MetricsLast(JSONLogsOnParent, MultiService):
    """
    A worker and its C{--metrics} listener: the listener starts first and
    stops once the worker has stopped, so that C{/healthz} answers 503
    while the worker finishes what it holds.
    """

    def __init__(self, worker: Service, metrics: Optional[Service]) -> None:
        super().__init__()
        self.worker = worker
        self.metrics = metrics

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.metrics is not None:
            self.metrics.privilegedStartService()
        self.worker.privilegedStartService()

    def startService(self) -> None:
        super().startService()
        if self.metrics is not None:
            self.metrics.startService()
        self.worker.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d: Deferred[Any] = maybeDeferred(self.worker.stopService)
        metrics = self.metrics
        if metrics is not None:
            d.addBoth(lambda _: metrics.stopService())
        return d.addBoth(lambda _: None)
