"""
Configuration: C{twistd pfo3} options and the service they build.
"""

from __future__ import annotations

import os
import sys
from typing import Any, List, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage

from pfo3.amqp.tap import BROKER_PARAMETERS, check_broker
from pfo3.amqp.tap import topology as broker_topology
from pfo3.auth import DEFAULT_LEEWAY, IAuthenticator, authenticator_from_options
from pfo3.blobs.executor import BlobExecutor
from pfo3.blobs.options import BLOB_PARAMETERS, blob_policy, check_blobs
from pfo3.executor import DaemonThreadPool, IExecutor, LocalExecutor
from pfo3.framing import DEFAULT_MAX_BUFFERED
from pfo3.gate import (
    DEFAULT_AUTH_TIMEOUT,
    DEFAULT_MAX_AUTH_FAILURES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_UNAUTHENTICATED,
    DEFAULT_PROXIES,
    Gate,
    parse_networks,
)
from pfo3.logs import check_operations, use_json_logs, use_process_logs
from pfo3.orchestrator import Orchestrator
from pfo3.processes import ChildRole
from pfo3.processes.ports import SharedPorts
from pfo3.protocol import DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_LINE, TaskFactory
from pfo3.proxyheader import strict
from pfo3.service import TaskServerService
from pfo3.stats import BrokerProbe, ServerStats
from pfo3.store import DEFAULT_MAX_AGE, DEFAULT_MAX_RECORDS, MemoryStore, from_url
from pfo3.tasks import default_registry
from pfo3.tlsid import is_tls, peer_certificate_identity

log = Logger()

DEFAULT_PORT = "tcp:9000"

#: Listen queue length given to tcp:, ssl: and unix: endpoints that do not
#: set their own.  Twisted's default (50) makes a burst of a few hundred
#: connects wait for SYN retries; Linux caps it at net.core.somaxconn.
DEFAULT_BACKLOG = 1024

_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")


def with_backlog(description: str, backlog: int) -> str:
    """
    @return: C{description} with C{backlog=N} added, when it names an
        endpoint that takes one (also inside C{haproxy:}) and sets none.
    """
    kind, sep, rest = description.partition(":")
    kind = kind.strip().lower()
    if kind == "haproxy" and sep:
        return f"{kind}:{with_backlog(rest, backlog)}"
    if kind in _BACKLOG_TYPES and "backlog=" not in rest:
        return f"{description}:backlog={backlog}"
    return description


def client_authorities(path: Optional[str], ports: List[str]) -> List[Any]:
    """
    @return: The certificate authorities of C{--tls-client-ca PATH}, none
        without it.
    @raise usage.UsageError: When they cannot be read, or no port is ssl:.
    """
    if path is None:
        return []
    if not any(is_tls(description) for description in ports):
        raise usage.UsageError("--tls-client-ca needs at least one ssl: --port")
    from pfo3.tlsid import load_authorities

    try:
        return load_authorities(path)
    except ValueError as e:
        raise usage.UsageError(f"--tls-client-ca: {e}")


def check_shareable(options: usage.Options) -> None:
    """
    With C{--processes N}: refuse endpoints whose sockets the processes
    cannot share.
    """
    from pfo3.processes.ports import shareable

    named = [("--port", d) for d in options["ports"]] + [("--web", d) for d in options["web"]]
    if options["metrics"]:
        named.append(("--metrics", options["metrics"]))
    for option, description in named:
        if not shareable(description):
            raise usage.UsageError(
                f"{option} {description!r} cannot be shared by --processes: only tcp:, "
                "tcp6:, ssl:, unix: and haproxy: endpoints can (docs/processes.md)")


class Options(usage.Options):
    """
    Command-line options of C{twistd pfo3}.
    """

    synopsis = "[--port ENDPOINT ...] [options]"
    longdesc = (
        "pfo3 task server: clients send one JSON object per line, e.g. "
        '{"tarea_id": "a1", "tipo": "uppercase", "contenido": "hola"}, and get one '
        "JSON line back per task, in the order the tasks finish. "
        "--port takes any Twisted server endpoint and may be repeated: "
        "tcp:9000, tcp:9000:interface=127.0.0.1, "
        "ssl:9443:privateKey=key.pem:certKey=cert.pem, unix:/tmp/pfo3.sock, "
        "haproxy:tcp:9001 (PROXY protocol behind HAProxy), haproxy:ssl:9443:... "
        "(the PROXY header in clear, then TLS, as HAProxy sends them). "
        "The protocol is described in docs/protocol.md."
    )

    optParameters: List[List[Any]] = [
        ["workers", "w", 4, "Threads in the pool that runs blocking tasks.", int],
        ["timeout", "t", 30.0,
         "Seconds a task may run before it is cancelled and answered with "
         "'timeout'; a sleep longer than this is refused at once.", float],
        ["max-line", None, DEFAULT_MAX_LINE,
         "Longest request line accepted, in bytes; a longer one is answered "
         "with 'linea_demasiado_larga' and skipped.", int],
        ["max-buffered", None, DEFAULT_MAX_BUFFERED,
         "Bytes that the unfinished lines of all connections may hold "
         "together; past it, a line still growing beyond 16 KiB is answered "
         "with 'buffer_lleno' and skipped (short lines are never refused). "
         "At least --max-line.", int],
        ["max-inflight", None, DEFAULT_MAX_INFLIGHT,
         "Tasks one connection may have in flight; past it the server stops "
         "reading that connection until replies drain (backpressure).", int],
        ["max-tasks", None, 50_000,
         "Tasks in flight over all connections past which new ones are "
         "answered with 'ocupado'.", int],
        ["shutdown-timeout", None, 10.0,
         "On SIGTERM/SIGINT, seconds to let tasks in flight finish before "
         "cancelling them.", float],
        ["idle-timeout", None, 300.0,
         "Close a connection that has had no task in flight and sent nothing "
         "for this many seconds; 0 keeps idle connections forever.", float],
        ["gc-threshold", None, 10_000,
         "At start, freeze the objects of the set-up server out of the garbage "
         "collector's reach and run its youngest generation every N "
         "allocations (Python's default is 700); fewer full collections while "
         "many tasks are in flight. 0 leaves the collector as Python sets it.", int],
        ["backlog", None, DEFAULT_BACKLOG,
         "Listen queue length for tcp:, ssl: and unix: endpoints that set no "
         "backlog= of their own (the kernel caps it at net.core.somaxconn).", int],
        ["store", None, "memory:",
         "Where every task is recorded (for op: estado, background and "
         "idempotent tasks): memory: (bounded, nothing on disk), sqlite:PATH, "
         "postgresql://user@host:port/db (shared by several servers) or none.", str],
        ["store-max-age", None, DEFAULT_MAX_AGE,
         "Seconds a finished task stays recorded before the periodic purge "
         "forgets it.", float],
        ["store-max-records", None, DEFAULT_MAX_RECORDS,
         "Records the memory: store keeps at most (the oldest half goes when it is "
         "full).", int],
        ["processes", None, 1,
         "Run the server as this many processes (one event loop each) sharing "
         "its listening sockets: --port, --web and --metrics are opened once by a "
         "parent process that runs and stops the others. Counts (op: stats, "
         "/metrics) are totals over all of them; limits such as --max-tasks and "
         "--max-connections apply to each. 1: one process, as without it. See "
         "docs/processes.md.", int],
        ["log-tasks", None, 0,
         "Log one event (tarea_id, tipo, worker, duration, estado, peer) for "
         "every N-th task; 0 logs none, 1 logs all.", int],
    ]

    # Authentication and abuse limits (docs/security.md).
    optParameters += [
        ["jwt-secret-file", None, None,
         "Require a JWT with every task, signed with HS256 and the secret in "
         "this file (at least 32 bytes). The environment variable "
         "PFO3_JWT_SECRET may hold the secret instead. Without it or "
         "--jwt-public-key the server is open (its start-up log says so)."],
        ["jwt-public-key", None, None,
         "Require a JWT with every task, signed with RS256 or ES256 and "
         "checked with the PEM public key in this file."],
        ["jwt-issuer", None, None, "Accept only tokens whose 'iss' is this."],
        ["jwt-audience", None, None, "Accept only tokens whose 'aud' names this."],
        ["jwt-leeway", None, DEFAULT_LEEWAY,
         "Seconds of clock skew tolerated on a token's 'exp' and 'nbf'.", float],
        ["rate-limit", None, 0.0,
         "Tasks per second each identity may start (a token's 'tasa' claim "
         "sets its own); past it tasks are answered 'tasa_excedida'. 0: no "
         "limit. Without authentication all clients are one identity.", float],
        ["max-connections", None, DEFAULT_MAX_CONNECTIONS,
         "Open connections in all; past it new ones are answered "
         "'demasiadas_conexiones' and closed. 0: no limit.", int],
        ["max-connections-per-peer", None, 0,
         "Open connections per client address (behind HAProxy, the address "
         "in its PROXY header). 0: no limit (clients behind one NAT share an "
         "address).", int],
        ["max-unauthenticated", None, DEFAULT_MAX_UNAUTHENTICATED,
         "With authentication on: connections that have not authenticated "
         "yet; past it new ones are refused.", int],
        ["auth-timeout", None, DEFAULT_AUTH_TIMEOUT,
         "With authentication on: seconds a connection may stay without "
         "authenticating before it is closed.", float],
        ["max-auth-failures", None, DEFAULT_MAX_AUTH_FAILURES,
         "With authentication on: refused tokens (invalid or expired) a "
         "connection may send; the last refusal is its last line and it is "
         "closed. 0: no limit.", int],
    ]

    optParameters += [
        ["broker", "b", None,
         "Distributed mode: publish tasks to this RabbitMQ (amqp://USER:PASSWORD@"
         "HOST:5672/VHOST) for 'twistd pfo3-worker' processes to run, instead of "
         "running them here."],
        ["name", None, None,
         "Distributed mode: this orchestrator's name on the broker, which names "
         "its reply queue (default: host name and process id)."],
    ] + BROKER_PARAMETERS

    optParameters += [
        ["tls-client-ca", None, None,
         "Mutual TLS: on every ssl: port, refuse clients that do not present a "
         "certificate signed by these certificate authorities (a PEM file, or a "
         "folder of *.pem files such as the tls/ca that 'pfo3-certs ca' makes). "
         "See docs/security.md."],
    ]

    # Operations (docs/operations.md).
    optParameters += [
        ["metrics", None, None,
         "Serve Prometheus metrics (/metrics) and a health check (/healthz: 503 while "
         "draining or without a broker) over HTTP on this server endpoint, e.g. "
         "tcp:9100:interface=127.0.0.1. See docs/operations.md."],
        ["log-format", None, "text",
         "text: twistd's log lines; json: one JSON object per log event instead, "
         "with its fields (tarea_id, tipo, worker, duration, estado, peer, identity "
         "for the --log-tasks events).", str],
    ]
    optParameters += BLOB_PARAMETERS

    optFlags: List[List[Optional[str]]] = [
        ["no-inline", None,
         "Run the cheap built-in text tasks on the thread pool too, instead "
         "of inline in the event loop (slower; see docs/execution.md)."],
        ["no-plugins", None,
         "Do not load third-party task types from the 'pfo3.tasks' entry "
         "points."],
    ]

    def __init__(self) -> None:
        super().__init__()
        #: The options as given (L{parseOptions}), for --processes.
        self.arguments: List[str] = []
        self["ports"] = []
        self["proxy-from"] = []
        self["web"] = []
        self["web-cors"] = []

    def opt_web(self, endpoint: str) -> None:
        """
        Serve the HTTP API, the WebSocket endpoint (/ws) and the dashboard
        (/) on this server endpoint: tcp:8080, ssl:8443:privateKey=...
        (repeatable; none by default). See docs/web.md.
        """
        self["web"].append(endpoint)

    def opt_web_cors(self, origin: str) -> None:
        """
        Let pages from this origin (https://app.example, or * for any) call
        the HTTP API and open WebSockets (repeatable; none by default: only
        the dashboard's own origin).
        """
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise usage.UsageError(f"--web-cors: {origin!r} is not an origin (https://host)")
        self["web-cors"].append(origin)

    def opt_proxy_from(self, network: str) -> None:
        """
        Believe PROXY headers on haproxy: endpoints only from this address
        or network (repeatable; default 127.0.0.0/8 and ::1: HAProxy on this
        machine). Anyone else reaching a haproxy: port is disconnected.
        """
        try:
            parse_networks([network])
        except ValueError as e:
            raise usage.UsageError(f"--proxy-from: {e}")
        self["proxy-from"].append(network)

    def opt_port(self, endpoint: str) -> None:
        """
        Listen on this server endpoint (repeatable; default tcp:9000).
        """
        self["ports"].append(endpoint)

    opt_p = opt_port

    def parseOptions(self, options: Optional[List[str]] = None) -> None:
        """
        Parse C{options} (the command line by default), keeping them: with
        C{--processes N}, each process runs with the same ones.
        """
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def postOptions(self) -> None:
        if not self["ports"]:
            self["ports"] = [DEFAULT_PORT]
        for name in ("workers", "max-line", "max-inflight", "max-tasks", "backlog",
                     "processes"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1, not {self[name]}")
        if self["max-buffered"] < self["max-line"]:
            raise usage.UsageError("--max-buffered must be at least --max-line")
        for name in ("timeout", "shutdown-timeout"):
            if not self[name] > 0 or self[name] == float("inf"):
                raise usage.UsageError(f"--{name} must be a positive number of seconds")
        if not 0 <= self["idle-timeout"] < float("inf"):
            raise usage.UsageError("--idle-timeout must be 0 or a positive number of seconds")
        if self["gc-threshold"] < 0:
            raise usage.UsageError("--gc-threshold must be 0 or more")
        if self["log-tasks"] < 0:
            raise usage.UsageError("--log-tasks must be 0 or more")
        if self["store-max-records"] < 1:
            raise usage.UsageError("--store-max-records must be at least 1")
        if not 0 < self["store-max-age"] < float("inf"):
            raise usage.UsageError("--store-max-age must be a positive number of seconds")
        for name in ("max-connections", "max-connections-per-peer", "max-auth-failures"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must be 0 or more")
        if self["max-unauthenticated"] < 1:
            raise usage.UsageError("--max-unauthenticated must be at least 1")
        for name in ("auth-timeout", "jwt-leeway", "rate-limit"):
            if not 0 <= self[name] < float("inf") or (name == "auth-timeout"
                                                      and not self[name]):
                raise usage.UsageError(f"--{name} must be a positive number")
        self["authenticator"] = authenticator(self)
        if self["broker"]:
            check_broker(self)
        else:
            for name in ("broker-ca", "broker-cert", "broker-key"):
                if self[name]:
                    raise usage.UsageError(f"--{name} is for the broker: it needs --broker")
        check_blobs(self)
        if self["processes"] > 1:
            check_shareable(self)
        from twisted.internet import reactor

        for description in self["ports"]:
            try:
                endpoints.serverFromString(reactor, with_backlog(description, self["backlog"]))
            except Exception as e:
                raise usage.UsageError(f"invalid --port {description!r}: {e}")
        for description in self["web"]:
            try:
                endpoints.serverFromString(reactor, with_backlog(description, self["backlog"]))
            except Exception as e:
                raise usage.UsageError(f"invalid --web {description!r}: {e}")
        from_url(self["store"], reactor)  # raises UsageError; touches no database
        self["client-authorities"] = client_authorities(self["tls-client-ca"], self["ports"])
        check_operations(self)


def makeService(options: Options, reactor: Any = None) -> Service:
    """
    Assemble a server from parsed options: one process's, or with
    C{--processes N} the parent's, which runs N of them (L{pfo3.processes}).

    @param reactor: The reactor to run on; the global one by default.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    role = ChildRole.from_environment()
    if role is None and options["processes"] > 1:  # a child never starts children
        from pfo3.processes import Supervisor, child_arguments

        supervisor = Supervisor(reactor, options["processes"],
                                child_arguments(options.arguments),
                                lambda binder: listen_everywhere(options, binder))
        if options["log-format"] == "json":
            use_json_logs(supervisor)
        return supervisor
    return server_service(options, reactor, role)


def server_service(options: Options, reactor: Any,
                   role: Optional[ChildRole] = None) -> TaskServerService:
    """
    Assemble one process's server.

    @param role: When this process is one of several (C{--processes N}),
        what its parent told it; it then listens on the sockets it
        inherited and its counts are added up with the others'.
    """
    listener = reactor if role is None else SharedPorts(reactor, role.ports)
    registry = default_registry(entry_points=not options["no-plugins"])
    store = from_url(options["store"], reactor, max_age=options["store-max-age"],
                     max_records=options["store-max-records"], reactor=reactor)
    executor: IExecutor
    if options["broker"]:
        from pfo3.amqp.executor import AMQPExecutor

        name = options["name"] or ""
        if name and role is not None:
            name = f"{name}-{role.index}"  # each process has its own reply queue
        executor = AMQPExecutor.from_url(
            reactor, options["broker"], broker_topology(options), options["timeout"],
            # A store in memory dies with this process: no successor could
            # complete its records, so tasks need not carry their keys.
            name=name, store=None if isinstance(store, MemoryStore) else store)
    else:
        threadpool = DaemonThreadPool(
            minthreads=0, maxthreads=options["workers"], name="pfo3")
        executor = LocalExecutor(reactor, threadpool, inline=not options["no-inline"])
    blobs = blob_policy(options, reactor, options["max-line"])
    if blobs is not None and not options["broker"]:
        executor = BlobExecutor(executor, blobs)  # distributed: the workers read objects
    orchestrator = Orchestrator(
        registry, executor, reactor,
        timeout=options["timeout"],
        max_tasks=options["max-tasks"],
        log_every=options["log-tasks"],
        store=store,
        authenticator=options["authenticator"],
        rate=options["rate-limit"],
        blobs=blobs,
    )
    gate = Gate(
        reactor,
        max_connections=options["max-connections"],
        max_per_peer=options["max-connections-per-peer"],
        auth_required=orchestrator.authenticator.required,
        max_unauthenticated=options["max-unauthenticated"],
        auth_timeout=options["auth-timeout"],
        max_auth_failures=options["max-auth-failures"],
        proxies=parse_networks(options["proxy-from"] or DEFAULT_PROXIES),
        certificate_identity=peer_certificate_identity
        if options.get("client-authorities") else None,
    )
    factory = TaskFactory(
        orchestrator, options["max-line"], options["max-inflight"], options["idle-timeout"],
        max_buffered=options["max-buffered"], gate=gate,
    )
    probe = None
    if options["broker"]:
        amqp: Any = executor
        probe = BrokerProbe(amqp.broker, broker_topology(options).tasks, reactor, amqp.oldest)
    stats: ServerStats
    if role is None:
        stats = ServerStats(factory, probe)
    else:
        from pfo3.processes.counts import SharedStats, SnapshotFolder

        stats = SharedStats(factory, SnapshotFolder(role.stats, role.index), reactor, probe)
    metrics = None
    if options["metrics"]:
        from pfo3.metrics import server_metrics

        metrics = server_metrics(listener, options["metrics"], stats)
    service = TaskServerService(
        factory, executor, reactor, options["shutdown-timeout"], options["gc-threshold"],
        handle_signals=True, stats=stats, metrics=metrics,
    )
    if role is not None:
        use_process_logs(service, options["log-format"], os.getpid())
    elif options["log-format"] == "json":
        use_json_logs(service)
    for endpoint in task_endpoints(options, listener, announce=role is None or not role.index):
        StreamServerEndpointService(endpoint, factory).setServiceParent(service)
    if options["web"]:
        web_service(options, factory, reactor, listener).setServiceParent(service)
    if role is not None:
        from pfo3.processes import become_child

        become_child(reactor, role, stats)
    return service


def task_endpoints(options: Options, listener: Any, announce: bool = True) -> \
        List[IStreamServerEndpoint]:
    """
    @param listener: The reactor the endpoints listen with.
    @param announce: Log which ports require client certificates.
    @return: The C{--port} endpoints, each with its wrappers: a strict
        PROXY header on C{haproxy:}, the PROXY header before TLS on
        C{haproxy:ssl:}, client certificates with C{--tls-client-ca}.
    """
    found = []
    for description in options["ports"]:
        endpoint = endpoints.serverFromString(
            listener, with_backlog(description, options["backlog"]))
        if is_tls(description):
            from pfo3.tlsid import proxy_header_before_tls, require_client_certificates

            if options.get("client-authorities"):
                require_client_certificates(endpoint, options["client-authorities"])
                if announce:
                    log.info("--port {port} requires client certificates from {path}",
                             port=description, path=options["tls-client-ca"])
            endpoint = proxy_header_before_tls(endpoint)
        elif options.get("client-authorities") and announce:
            log.warn("--port {port} is not ssl:, so it asks no client certificate",
                     port=description)
        found.append(strict(endpoint))
    return found


def web_endpoints(options: Options, listener: Any) -> List[IStreamServerEndpoint]:
    """
    @return: The C{--web} endpoints, listening with C{listener}.
    """
    return [endpoints.serverFromString(listener, with_backlog(d, options["backlog"]))
            for d in options["web"]]


def listen_everywhere(options: Options, listener: Any) -> List[Deferred[Any]]:
    """
    Listen on every endpoint of the server (C{--port}, C{--web},
    C{--metrics}) with C{listener}, serving nothing: how the parent of
    C{--processes N} opens the sockets its children share.

    @return: The endpoints' Deferreds of their listening ports.
    """
    everything = task_endpoints(options, listener, announce=False) + web_endpoints(
        options, listener)
    if options["metrics"]:
        everything.append(endpoints.serverFromString(listener, options["metrics"]))
    return [e.listen(Factory()) for e in everything]


def web_service(options: Options, factory: TaskFactory, reactor: Any,
                listener: Any = None) -> MultiService:
    """
    The C{--web} endpoints, serving the same orchestrator and gate as the
    TCP ports (see L{pfo3.web}).

    @param listener: The reactor the endpoints listen with, if not
        C{reactor}.
    """
    from pfo3.web import Gateway, WebService, make_site

    gateway = Gateway(factory.orchestrator, factory.gate, max_message=options["max-line"],
                      max_inflight=options["max-inflight"], cors=options["web-cors"])
    site = make_site(gateway, reactor, idle_timeout=options["idle-timeout"],
                     ping_interval=min(options["idle-timeout"], 60.0))
    web = WebService(site)
    for endpoint in web_endpoints(options, reactor if listener is None else listener):
        StreamServerEndpointService(endpoint, site).setServiceParent(web)
    return web


def authenticator(options: Options) -> IAuthenticator:
    """
    The authenticator the options ask for (with the environment's
    C{PFO3_JWT_SECRET}).
    """
    return authenticator_from_options(
        options["jwt-secret-file"], options["jwt-public-key"], options["jwt-issuer"],
        options["jwt-audience"], options["jwt-leeway"],
        env_secret=os.environ.get("PFO3_JWT_SECRET"))
