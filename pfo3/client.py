"""
A Twisted client for pfo3.

L{TaskClient} is the client side of the line protocol: it writes requests
with L{pfo3.wire.encode_request} and L{pfo3.wire.encode_operation}, reads
replies with L{pfo3.wire.decode_reply}, and matches each reply to its request
by C{tarea_id}, so one connection carries many tasks at once and replies may
come back in any order (the server answers in completion order).

    d = connect(reactor, "tcp:host=127.0.0.1:port=9000")
    d.addCallback(lambda client: client.submit("uppercase", "hola"))
    # fires with {"estado": "ok", "resultado": "HOLA", "tarea_id": ..., "worker": N}

How a request can fail:

  - the server answers with an error reply: the Deferred fails with the
    L{pfo3.errors.Pfo3Error} subclass of its C{codigo} (see
    L{pfo3.errors.error_from_reply}), carrying C{codigo}, C{mensaje} and
    C{tarea_id};
  - the connection goes away first: L{ConnectionClosed};
  - the caller's C{timeout} passes first: L{ReplyTimeout} (a late reply is
    then dropped quietly);
  - the request cannot be sent at all (a C{tarea_id} already pending on this
    connection, a line longer than the server accepts, C{contenido} that is
    not JSON): the Deferred fails at once, before anything is written.

L{BlockingClient} offers the same client to scripts that do not run a
reactor.  The command line (C{pfo3-client}, C{python -m pfo3.cli}) lives in
L{pfo3.cli}, which depends on this module, never the reverse.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, TypeVar, Union

from twisted.internet import endpoints, error
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from pfo3 import wire
from pfo3.errors import DuplicateTaskId, LineTooLong, Pfo3Error, error_from_reply
from pfo3.protocol import DEFAULT_MAX_LINE

log = Logger(namespace="pfo3.client")

#: A decoded reply line.
Reply = Dict[str, Any]

#: Longest reply line accepted.  Replies can be longer than requests (the
#: result of a task, the list of task types), so this is generous.
MAX_REPLY = 64 * 1024 * 1024

_T = TypeVar("_T")


class ClientError(Exception):
    """
    Base of the failures the client detects itself (as opposed to the
    server's error replies, which are L{pfo3.errors.Pfo3Error}).

    @ivar tarea_id: The request concerned, when there is one.
    """

    def __init__(self, mensaje: str, tarea_id: Optional[str] = None) -> None:
        super().__init__(mensaje)
        self.mensaje = mensaje
        self.tarea_id = tarea_id


class ConnectionClosed(ClientError):
    """
    The connection closed (or was never open) before the reply arrived.

    @ivar reason: Why the connection closed, in a few words.
    """

    def __init__(
        self, mensaje: str, tarea_id: Optional[str] = None, reason: Optional[str] = None
    ) -> None:
        super().__init__(mensaje, tarea_id)
        self.reason = reason


class ReplyTimeout(ClientError, TimeoutError):
    """
    No reply came within the caller's timeout; the request was abandoned.

    @ivar seconds: The timeout that passed.
    """

    def __init__(self, mensaje: str, tarea_id: Optional[str], seconds: float) -> None:
        ClientError.__init__(self, mensaje, tarea_id)
        self.seconds = seconds


class ServerNotVerified(ClientError):
    """
    The server's TLS certificate does not prove it is the host the client
    asked for (its subjectAltName names another host, or none).
    """


#: The alerts a server sends about the client's certificate (RFC 8446, 6.2).
_CLIENT_CERTIFICATE_ALERTS = (
    "alert unknown ca", "alert bad certificate", "alert certificate expired",
    "alert certificate revoked", "alert certificate unknown",
    "alert unsupported certificate", "alert access denied",
)


def _describe_loss(reason: Failure) -> str:
    if reason.check(ServerNotVerified):
        return str(reason.value)
    if reason.check(ConnectionDone):
        return "el servidor cerró la conexión"
    if type(reason.value).__module__.startswith("service_identity"):
        return ("no se pudo verificar la identidad del servidor: "
                + (str(reason.value) or type(reason.value).__name__))
    if reason.type is not None and reason.type.__module__.startswith("OpenSSL"):
        # pyOpenSSL errors carry a list of (library, function, reason).
        details = [
            item[-1] for item in (reason.value.args[0] if reason.value.args else [])
            if isinstance(item, tuple) and item
        ]
        said = "; ".join(str(d) for d in details) or reason.getErrorMessage()
        if "certificate required" in said:
            return (f"el servidor exige un certificado de cliente ({said}; añada "
                    "certificate= y privateKey= al endpoint tls:)")
        if any(alert in said for alert in _CLIENT_CERTIFICATE_ALERTS):
            return f"el servidor rechazó el certificado de cliente ({said})"
        return f"falló la conexión TLS con el servidor ({said})"
    return f"se perdió la conexión con el servidor ({reason.getErrorMessage()})"


def host_to_verify(description: str) -> Optional[str]:
    """
    @return: The host name a C{tls:} client endpoint description verifies
        the server's certificate against, or L{None} for other endpoints.
    """
    # Twisted's descriptions separate fields with ':' and escape it as '\:'.
    parts = [p.replace("\x00", ":") for p in description.replace("\\:", "\x00").split(":")]
    if parts[0].strip().lower() != "tls":
        return None
    for part in parts[1:]:
        if part.startswith("host="):
            return part[len("host="):]
    positional = [p for p in parts[1:] if "=" not in p]
    return positional[0] if positional else None


def _check_host(certificate: Any, host: str) -> None:
    """
    @raise ServerNotVerified: unless C{certificate} (pyOpenSSL's) is valid
        for C{host}, by its subjectAltName as RFC 6125 asks.
    """
    from service_identity import CertificateError, VerificationError
    from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
    from service_identity.pyopenssl import extract_patterns
    from twisted.internet.abstract import isIPAddress, isIPv6Address

    try:
        if certificate is None:
            raise CertificateError("the server sent no certificate")
        wanted = (IPAddress_ID(host) if isIPAddress(host) or isIPv6Address(host)
                  else DNS_ID(host))
        verify_service_identity(extract_patterns(certificate), [wanted], [])
    except (CertificateError, VerificationError) as e:
        raise ServerNotVerified(
            f"no se pudo verificar la identidad del servidor: su certificado no es "
            f"válido para {host!r} ({e})") from e


@implementer(IHandshakeListener)
class TaskClient(LineOnlyReceiver):
    """
    One connection to a pfo3 server, with any number of requests in flight.

    Build it with L{connect}, or connect it yourself with
    L{twisted.internet.endpoints.connectProtocol}.

    @ivar clock: Drives the per-call timeouts.
    @ivar max_request: Longest request line sent, in bytes (without the
        newline).  A longer one fails at once with
        L{pfo3.errors.LineTooLong}; the server would answer it with an error
        that carries no C{tarea_id}.  The default is the server's default.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_REPLY

    def __init__(
        self, clock: IReactorTime, max_request: int = DEFAULT_MAX_LINE,
        tls_host: Optional[str] = None,
    ) -> None:
        """
        @param tls_host: Over TLS, the host the server's certificate must be
            valid for; L{verified} fires once it is checked.
        """
        self.clock = clock
        self.max_request = max_request
        self.tls_host = tls_host
        self.verified: Deferred[None] = Deferred()
        if tls_host is None:
            self.verified.callback(None)
        self._pending: Dict[str, Deferred[Reply]] = {}
        # Requests given up on (timeout, cancel) that the server still runs.
        self._abandoned: Set[str] = set()
        self._closed_because: Optional[str] = None
        self._problem: Optional[str] = None
        self._waiters: List[Deferred[None]] = []

    @property
    def pending(self) -> int:
        """
        Requests sent and not yet answered (nor given up on).
        """
        return len(self._pending)

    @property
    def closed(self) -> bool:
        """
        Whether the connection was open and has closed since.
        """
        return self._closed_because is not None

    # -- requests -------------------------------------------------------------

    def submit(
        self,
        tipo: Union[str, int],
        contenido: Any,
        tarea_id: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Deferred[Reply]:
        """
        Send one task.

        @param tipo: A task type's name, alias or code.
        @param contenido: The task's input (anything JSON can carry).
        @param tarea_id: The request's identifier; a new UUID by default.
        @param timeout: Seconds to wait for the reply; no limit by default.
        @return: A Deferred firing with the whole success reply
            (C{estado}, C{resultado}, C{tarea_id}, C{worker}), or failing as
            the module docstring describes.  Cancelling it abandons the
            request.
        """
        if tarea_id is None:
            tarea_id = str(uuid.uuid4())
        try:
            line = wire.encode_request(tipo, contenido, tarea_id)
        except (TypeError, ValueError) as e:
            return fail(e)
        return self._send(tarea_id, line, timeout)

    def ping(self, timeout: Optional[float] = None) -> Deferred[str]:
        """
        @return: A Deferred firing with C{"pong"}.
        """
        return self._control("ping", timeout).addCallback(_resultado)

    def tipos(self, timeout: Optional[float] = None) -> Deferred[List[Dict[str, Any]]]:
        """
        @return: A Deferred firing with the server's task types, each
            C{{"codigo": int, "tipo": str, "alias": [...], "descripcion": str}},
            ordered by code.
        """
        return self._control("tipos", timeout).addCallback(_resultado)

    def stats(self, timeout: Optional[float] = None) -> Deferred[Dict[str, Any]]:
        """
        @return: A Deferred firing with the server's summary (C{op: stats};
            C{docs/operations.md} describes its fields).
        """
        return self._control("stats", timeout).addCallback(_resultado)

    def authenticate(self, token: str, timeout: Optional[float] = None) -> Deferred[Any]:
        """
        Prove who this connection's tasks come from (C{op: auth}).

        @return: A Deferred firing with the server's answer
            (C{{"identidad": ..., "expira": ...}}), or failing with the
            server's refusal (C{token_invalido}, C{token_expirado}, ...).
        """
        return self._control("auth", timeout, token).addCallback(_resultado)

    def upload_slot(self, size: int, timeout: Optional[float] = None) -> Deferred[Any]:
        """
        Ask where to upload C{size} bytes (C{op: subir}; a server with
        C{--blobs}, see C{docs/blobs.md}).

        @return: A Deferred firing with C{{"ref", "url", "expira", "metodo"}}:
            upload the bytes with an HTTP C{PUT} to C{url}, then send the
            task with L{submit_ref}.
        """
        tarea_id = f"subir-{uuid.uuid4()}"
        line = (json.dumps({"op": "subir", "bytes": size, "tarea_id": tarea_id})
                + "\n").encode()
        return self._send(tarea_id, line, timeout).addCallback(_resultado)

    def submit_ref(
        self, tipo: Union[str, int], ref: Optional[str], tarea_id: Optional[str] = None,
        timeout: Optional[float] = None, refs: bool = False, contenido: Any = None,
    ) -> Deferred[Reply]:
        """
        Send one task whose content is an uploaded object (C{contenido_ref}),
        or inline C{contenido} when C{ref} is L{None}.

        @param refs: Say that this client understands C{resultado_ref}: a
            large result then comes as a reference to an object.
        @return: As L{submit}; a reply with C{resultado_ref} instead of
            C{resultado} when C{refs} is true and the result was large.
        """
        if tarea_id is None:
            tarea_id = str(uuid.uuid4())
        req: Dict[str, Any] = {"tarea_id": tarea_id, "tipo": tipo}
        if ref is not None:
            req["contenido_ref"] = ref
        else:
            req["contenido"] = contenido
        if refs:
            req["refs"] = True
        line = (json.dumps(req, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
        return self._send(tarea_id, line, timeout)

    def _control(
        self, op: str, timeout: Optional[float], token: Optional[str] = None
    ) -> Deferred[Reply]:
        tarea_id = f"{op}-{uuid.uuid4()}"
        return self._send(tarea_id, wire.encode_operation(op, tarea_id, token), timeout)

    def _send(self, tarea_id: str, line: bytes, timeout: Optional[float]) -> Deferred[Reply]:
        if self._closed_because is not None or self.transport is None:
            return fail(ConnectionClosed(
                "No hay conexión con el servidor"
                + (f": {self._closed_because}." if self._closed_because else "."),
                tarea_id, self._closed_because,
            ))
        if tarea_id in self._pending or tarea_id in self._abandoned:
            return fail(DuplicateTaskId(
                f"Ya hay una tarea en curso con tarea_id {tarea_id!r} en esta conexión.",
                tarea_id,
            ))
        if len(line) - 1 > self.max_request:
            return fail(LineTooLong(
                f"La solicitud ocupa {len(line) - 1} bytes; el máximo es "
                f"{self.max_request} bytes.",
                tarea_id,
            ))

        def abandon(d: Deferred[Reply]) -> None:
            if self._pending.pop(tarea_id, None) is not None:
                self._abandoned.add(tarea_id)

        d: Deferred[Reply] = Deferred(abandon)
        self._pending[tarea_id] = d
        self.transport.write(line)
        if timeout is not None:
            def timed_out(result: Any, seconds: float) -> Any:
                raise ReplyTimeout(
                    f"Sin respuesta a la tarea {tarea_id} tras {seconds:g} s.",
                    tarea_id, seconds,
                )

            d.addTimeout(timeout, self.clock, onTimeoutCancel=timed_out)
        return d

    # -- replies --------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if line[-1:] == b"\r":
            line = line[:-1]
        if not line.strip():
            return
        try:
            reply = wire.decode_reply(line)
        except (ValueError, RecursionError):
            log.error("The server sent a line that is not a reply: {line!r}", line=line[:200])
            self._give_up("el servidor envió una línea que no es una respuesta JSON")
            return
        tarea_id = reply.get("tarea_id")
        d = self._pending.pop(tarea_id, None) if isinstance(tarea_id, str) else None
        if d is None:
            if isinstance(tarea_id, str) and tarea_id in self._abandoned:
                self._abandoned.discard(tarea_id)
                return
            if tarea_id is None and reply.get("estado") == "error" and self._pending:
                self._unattributed(reply)
                return
            else:
                log.warn(
                    "Dropping a reply that matches no pending request: {reply!r}",
                    reply=reply, tarea_id=tarea_id,
                )
                return
        if reply.get("estado") == "ok":
            d.callback(reply)
        else:
            error = error_from_reply(reply)
            if error.tarea_id is None:
                error.tarea_id = tarea_id
            d.errback(error)

    def _unattributed(self, reply: Reply) -> None:
        """
        An error that names no task (a line the server could not read, or
        refused before reading it whole) concerns one of the requests not
        yet answered, and nothing says which.  When only one is pending it
        gets the error; otherwise every pending request fails with it, so
        that none waits forever for a reply that will not come, and their
        late replies, if any, are dropped.
        """
        pending, self._pending = self._pending, {}
        if len(pending) > 1:
            log.warn("The server answered an error that names no task while {n} were "
                     "pending; failing them all: {reply!r}", n=len(pending), reply=reply)
            self._abandoned.update(pending)
        for tarea_id, d in pending.items():
            error = error_from_reply(reply)
            error.tarea_id = tarea_id
            d.errback(error)

    def lineLengthExceeded(self, line: bytes) -> None:
        log.error("The server sent a line longer than {max} bytes", max=self.MAX_LENGTH)
        self._give_up(f"el servidor envió una línea de más de {self.MAX_LENGTH} bytes")

    def _give_up(self, why: str) -> None:
        if self._problem is None:
            self._problem = why
        if self.transport is not None:
            self.transport.loseConnection()

    # -- connection life ------------------------------------------------------

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake succeeded: the chain was verified against the
        trust roots.  Check the host name too, whatever Twisted's own check
        concluded: it lets through a certificate without subjectAltName.
        """
        if self.tls_host is None or self.verified.called:
            return
        try:
            _check_host(self.transport.getPeerCertificate(),  # type: ignore[union-attr]
                        self.tls_host)
        except ServerNotVerified as e:
            self._problem = str(e)
            self.verified.errback(e)
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.verified.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        why = self._problem or _describe_loss(reason)
        if not self.verified.called:
            self.verified.errback(ConnectionClosed(
                f"No se pudo establecer la conexión TLS: {why}.", None, why))
        self._closed_because = why
        pending, self._pending = self._pending, {}
        self._abandoned.clear()
        for tarea_id, d in pending.items():
            d.errback(ConnectionClosed(
                f"Sin respuesta a la tarea {tarea_id}: {why}.", tarea_id, why))
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(None)

    def disconnect(self) -> Deferred[None]:
        """
        Close the connection; requests still pending fail with
        L{ConnectionClosed}.

        @return: A Deferred firing once the connection is closed.
        """
        if self._closed_because is not None or self.transport is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        self._problem = self._problem or "el cliente cerró la conexión"
        self.transport.loseConnection()
        return d


def _resultado(reply: Reply) -> Any:
    return reply.get("resultado")


def connect(
    reactor: Any,
    endpoint: Union[str, IStreamClientEndpoint],
    timeout: Optional[float] = None,
    max_request: int = DEFAULT_MAX_LINE,
    tls_host: Optional[str] = None,
    token: Optional[str] = None,
) -> Deferred[TaskClient]:
    """
    Connect to a pfo3 server.

    @param reactor: The reactor to connect with (also the clock of the
        per-call timeouts).
    @param endpoint: A client endpoint or its description, e.g.
        C{"tcp:host=127.0.0.1:port=9000"},
        C{"tls:example.org:9443:trustRoots=ca-dir"},
        C{"unix:path=/tmp/pfo3.sock"}.
    @param timeout: Seconds to wait for the connection; no limit beyond the
        endpoint's own by default.
    @param max_request: See L{TaskClient.max_request}.
    @param tls_host: Over TLS, the host name the server's certificate must
        be valid for; taken from C{endpoint} when it is a C{tls:}
        description.
    @param token: A bearer token (JWT) that the connection authenticates
        with (C{op: auth}) before the Deferred fires; a refused token fails
        it with the server's error and closes the connection.
    @raise ValueError: if C{endpoint} is a description Twisted cannot parse.
    @return: A Deferred firing with the connected L{TaskClient}.
    """
    host = tls_host
    if isinstance(endpoint, str):
        host = host or host_to_verify(endpoint)
        endpoint = endpoints.clientFromString(reactor, endpoint)
    d: Deferred[TaskClient] = endpoints.connectProtocol(
        endpoint, TaskClient(reactor, max_request, host)
    )
    d.addCallback(_once_verified)
    if token is not None:
        d.addCallback(_authenticated, token, timeout)
    if timeout is not None:
        d.addTimeout(timeout, reactor, onTimeoutCancel=_connect_timed_out)
    return d


def _once_verified(client: TaskClient) -> Deferred[TaskClient]:
    """
    @return: A Deferred firing with C{client} once its server's identity is
        checked (at once when not over TLS), or failing if it cannot be.
    """
    d: Deferred[TaskClient] = Deferred()

    def failed(f: Failure) -> None:
        d.errback(f)

    client.verified.addCallbacks(lambda _: d.callback(client), failed)
    return d


def _authenticated(
    client: TaskClient, token: str, timeout: Optional[float]
) -> Deferred[TaskClient]:
    def refused(f: Failure) -> Failure:
        if client.transport is not None:
            client.transport.loseConnection()
        return f

    d = client.authenticate(token, timeout)
    d.addCallbacks(lambda _: client, refused)
    return d


def _connect_timed_out(result: Any, seconds: float) -> Any:
    raise TimeoutError(f"No se pudo conectar con el servidor en {seconds:g} s.")


# -- for scripts that do not run a reactor ---------------------------------------

_reactor_lock = threading.Lock()
_reactor_thread: Optional[threading.Thread] = None


def _start_reactor_thread(reactor: Any) -> None:
    global _reactor_thread
    with _reactor_lock:
        if _reactor_thread is None and not reactor.running:
            _reactor_thread = threading.Thread(
                target=reactor.run, kwargs={"installSignalHandlers": False},
                name="pfo3-client-reactor", daemon=True,
            )
            _reactor_thread.start()


class BlockingClient:
    """
    L{TaskClient} for code without a reactor: each call blocks until its
    reply (or failure) and returns it (or raises it).

    The global reactor runs in a daemon thread, started by the first
    L{BlockingClient}; never call these methods from the reactor thread.

        with BlockingClient("tcp:host=127.0.0.1:port=9000") as c:
            print(c.submit("uppercase", "hola")["resultado"])
    """

    def __init__(
        self, endpoint: str, timeout: Optional[float] = 30.0, reactor: Any = None,
        token: Optional[str] = None,
    ) -> None:
        """
        @param endpoint: As for L{connect}.
        @param timeout: Default seconds to wait for a connection or a reply;
            L{None} waits forever.
        @param reactor: The reactor; the global one by default.
        @param token: As for L{connect}: every connection authenticates
            with it.
        """
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
            _start_reactor_thread(reactor)
        self.reactor = reactor
        self.timeout = timeout
        self.endpoint = endpoint
        self.token = token
        self._client: TaskClient = self._connect()

    @property
    def client(self) -> TaskClient:
        """
        The connection, opened again first if the server closed it (as it
        does with connections left idle).
        """
        if self._client.closed:
            self._client = self._connect()
        return self._client

    def _connect(self) -> TaskClient:
        return self._call(
            lambda: connect(self.reactor, self.endpoint, self.timeout, token=self.token))

    def _call(self, f: Callable[..., Deferred[_T]], *args: Any) -> _T:
        from twisted.internet.threads import blockingCallFromThread

        result: _T = blockingCallFromThread(self.reactor, f, *args)  # type: ignore[arg-type]
        return result

    def submit(
        self,
        tipo: Union[str, int],
        contenido: Any,
        tarea_id: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Reply:
        """
        Run one task; see L{TaskClient.submit}.

        @param timeout: Overrides the client's default timeout.
        """
        return self._call(
            self.client.submit, tipo, contenido, tarea_id,
            self.timeout if timeout is None else timeout,
        )

    def submit_many(
        self, tasks: Sequence[Sequence[Any]], timeout: Optional[float] = None
    ) -> List[Union[Reply, Exception]]:
        """
        Run several tasks at once over the connection.

        @param tasks: C{(tipo, contenido)} pairs, or C{(tipo, contenido,
            tarea_id)} triples.
        @return: For each task, in order, its reply or the exception it
            failed with.
        """
        t = self.timeout if timeout is None else timeout
        # Resolved here, in the caller's thread: reopening a connection the
        # server closed blocks on the reactor, so it cannot happen in it.
        client = self.client

        def run() -> Deferred[List[Union[Reply, Exception]]]:
            from twisted.internet.defer import DeferredList

            ds = [
                client.submit(task[0], task[1], task[2] if len(task) > 2 else None, t)
                for task in tasks
            ]
            dl: Deferred[Any] = DeferredList(ds, consumeErrors=True)
            return dl.addCallback(
                lambda results: [r if ok else r.value for ok, r in results]
            )

        return self._call(run)

    def ping(self) -> str:
        """
        @return: C{"pong"}.
        """
        return self._call(self.client.ping, self.timeout)

    def tipos(self) -> List[Dict[str, Any]]:
        """
        @return: The server's task types; see L{TaskClient.tipos}.
        """
        return self._call(self.client.tipos, self.timeout)

    def stats(self) -> Dict[str, Any]:
        """
        @return: The server's summary; see L{TaskClient.stats}.
        """
        return self._call(self.client.stats, self.timeout)

    def close(self) -> None:
        """
        Close the connection (the reactor thread keeps running).
        """
        self._call(self._client.disconnect)

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def explain(failure: BaseException) -> str:
    """
    @return: A one-line reason for an expected failure, for C{[ERROR]}.
    """
    if isinstance(failure, Pfo3Error):
        return f"{failure.mensaje} (codigo: {failure.codigo})"
    if isinstance(failure, ClientError):
        return failure.mensaje
    if isinstance(failure, error.ConnectionRefusedError):
        return "conexión rechazada (¿está el servidor en marcha?)"
    if isinstance(failure, error.DNSLookupError):
        return "no se pudo resolver el nombre del servidor"
    if isinstance(failure, (TimeoutError, error.TimeoutError)):
        return str(failure) or "tiempo de espera agotado"
    if isinstance(failure, error.ConnectingCancelledError):
        return "tiempo de espera agotado al conectar"
    text = str(failure).strip()
    return text or type(failure).__name__


__all__ = [
    "explain",
    "BlockingClient",
    "ClientError",
    "ConnectionClosed",
    "MAX_REPLY",
    "Reply",
    "ReplyTimeout",
    "TaskClient",
    "connect",
    "host_to_verify",
]

