"""
The gate: who may hold a connection, and for how long without proving who
they are.

A L{Gate} is shared by every connection of a server.  It applies the abuse
limits that come before any request:

  - connections in all (C{--max-connections}) and per client address
    (C{--max-connections-per-peer}), the address being the real client's
    behind HAProxy (from the PROXY header); a peer without an address (a
    UNIX-socket client) is not counted per peer, since all of them would
    count as one, and an IPv4-mapped IPv6 address counts as its IPv4
    address;
  - a C{haproxy:} endpoint believes the PROXY header only from the proxies
    it trusts (C{--proxy-from}); anyone else reaching it is disconnected,
    since it could claim any address;
  - where tokens are required, connections that have not authenticated yet
    are capped (C{--max-unauthenticated}) and get C{--auth-timeout}
    seconds to do so;
  - with mutual TLS, the client certificate's subject becomes the
    connection's identity;
  - a connection whose tokens are refused C{max_auth_failures} times
    (invalid or expired) is closed: the error line of the last refusal is
    its last line, and the lines it sent after that one are not answered.

Refusals are a C{demasiadas_conexiones} or C{token_faltante} error line,
then the connection closes.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Set, Union

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper

from pfo3.auth import Identity
from pfo3.errors import ExpiredToken, InvalidToken, MissingToken, Pfo3Error, TooManyConnections
from pfo3.orchestrator import MaybeDeferredReply, Session

log = Logger(namespace="pfo3")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_MAX_UNAUTHENTICATED = 1_000
DEFAULT_AUTH_TIMEOUT = 10.0
#: Refused tokens after which a connection is closed.
DEFAULT_MAX_AUTH_FAILURES = 5
#: Where PROXY headers are believed from by default: this machine only.
DEFAULT_PROXIES = ("127.0.0.0/8", "::1/128")


def parse_networks(texts: Iterable[str]) -> List[Network]:
    """
    @param texts: Addresses or networks (C{10.0.0.5}, C{10.0.0.0/24},
        C{::1}).
    @raise ValueError: for one that is neither.
    """
    return [ipaddress.ip_network(t.strip(), strict=False) for t in texts]


class Connection(Protocol):
    """
    What the gate needs of a connection (a L{pfo3.protocol.TaskProtocol}, a
    WebSocket).  Where tokens are required, the gate wraps its session's
    C{handle} to count the tokens refused.
    """

    transport: Any
    session: Session
    on_first_data: Optional[Callable[[Any], bool]]

    def refuse(self, error: Pfo3Error) -> None:
        """
        Answer C{error}, then close.
        """


class Gate:
    """
    Connection limits shared by the connections of one server.
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_per_peer: int = 0,
        auth_required: bool = False,
        max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED,
        auth_timeout: float = DEFAULT_AUTH_TIMEOUT,
        proxies: Iterable[Network] = (),
        certificate_identity: Optional[Callable[[Any], Optional[str]]] = None,
        max_auth_failures: int = DEFAULT_MAX_AUTH_FAILURES,
    ) -> None:
        """
        @param max_connections: Open connections in all (C{0}: no limit).
        @param max_per_peer: Open connections per client address (C{0}: no
            limit); clients without an address (UNIX sockets) are not
            counted.
        @param auth_required: Whether connections must authenticate; the
            two limits after it apply only then.
        @param proxies: Whose PROXY headers a C{haproxy:} endpoint believes.
        @param certificate_identity: With mutual TLS: the verified client
            certificate's subject, given the connection's transport.
        @param max_auth_failures: Tokens a connection may have refused
            (C{token_invalido}, C{token_expirado}) before it is closed
            (C{0}: never).
        """
        self.clock = clock
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.auth_required = auth_required
        self.max_unauthenticated = max_unauthenticated
        self.auth_timeout = auth_timeout
        self.proxies = list(proxies) or parse_networks(DEFAULT_PROXIES)
        self.certificate_identity = certificate_identity
        self.max_auth_failures = max_auth_failures
        self._per_peer: Dict[str, int] = {}
        self._hosts: Dict[Connection, str] = {}
        self._waiting: Dict[Connection, IDelayedCall] = {}
        self._counted: Set[Connection] = set()

    @property
    def open(self) -> int:
        """
        Connections let in and not yet gone.
        """
        return len(self._counted)

    @property
    def unauthenticated(self) -> int:
        """
        Connections that must authenticate and have not yet (each has its
        deadline).
        """
        return len(self._waiting)

    def trusts(self, address: Any) -> bool:
        """
        @return: Whether PROXY headers from C{address} are believed.
        """
        if not isinstance(address, (IPv4Address, IPv6Address)):
            return True  # a UNIX socket: whoever may open it is local
        host = _ip(address.host)
        return any(host in net for net in self.proxies)

    def connected(self, p: Connection) -> None:
        """
        A connection was made: let it in, or refuse it.
        """
        proxy = _proxy_wrapper(p.transport)
        if proxy is not None and proxy.transport is not None:
            real = proxy.transport.getPeer()
            if not self.trusts(real):
                log.warn("Dropped a connection from {address} to a PROXY endpoint: "
                         "not a trusted proxy (--proxy-from)",
                         address=getattr(real, "host", real))
                p.transport.abortConnection()
                return
        if self.max_connections and self.open >= self.max_connections:
            p.refuse(TooManyConnections(
                f"El servidor ya tiene el máximo de {self.max_connections} conexiones "
                "abiertas. Reintente más tarde."))
            return
        self._counted.add(p)
        if self.auth_required:
            if self.unauthenticated >= self.max_unauthenticated:
                p.refuse(TooManyConnections(
                    f"Hay {self.unauthenticated} conexiones sin autenticar, el máximo. "
                    "Reintente más tarde."))
                return
            p.session.on_authenticated = lambda: self._stop_waiting(p)
            self._waiting[p] = self.clock.callLater(self.auth_timeout, self._too_late, p)
        if proxy is None and not self._count_peer(p):
            return
        if self.auth_required and self.max_auth_failures:
            self._count_auth_failures(p)
        if proxy is not None or self.certificate_identity is not None:
            # The real address (from the PROXY header) and the client
            # certificate (from the TLS handshake) are known once the first
            # bytes arrive.
            p.on_first_data = (
                self._first_data_behind_proxy if proxy is not None else self._first_data)

    def _first_data(self, p: Connection) -> bool:
        """
        The connection's first bytes arrived: read its certificate.

        @return: Whether it may go on.
        """
        if self.certificate_identity is not None:
            subject = self.certificate_identity(p.transport)
            if subject:
                p.session.set_identity(Identity.from_certificate(subject))
        return True

    def _first_data_behind_proxy(self, p: Connection) -> bool:
        return self._count_peer(p) and self._first_data(p)

    def _count_peer(self, p: Connection) -> bool:
        """
        Count the connection against its address's limit.

        @return: Whether it may go on.
        """
        if not self.max_per_peer:
            return True
        host = _host(p.transport.getPeer())
        if host is None:
            return True  # no address to tell one client from another
        count = self._per_peer.get(host, 0)
        if count >= self.max_per_peer:
            p.refuse(TooManyConnections(
                f"Ya hay {count} conexiones abiertas desde {host}, el máximo."))
            return False
        self._per_peer[host] = count + 1
        self._hosts[p] = host
        return True

    def _count_auth_failures(self, p: Connection) -> None:
        """
        Count the tokens refused on C{p}; at L{max_auth_failures}, let the
        refusal's error line be the connection's last, and close it.

        The session's C{handle} is wrapped: a token is refused by raising
        from it (C{op: auth}, or a request's own token), before any task
        starts.
        """
        handle = p.session.handle
        limit = self.max_auth_failures
        failures = 0

        def counted(request: Any) -> MaybeDeferredReply:
            nonlocal failures
            if failures >= limit:
                # Closing: lines read with the last refused one go unanswered.
                return Deferred()
            try:
                return handle(request)
            except (InvalidToken, ExpiredToken) as e:
                failures += 1
                if failures < limit:
                    raise
                log.info("Closing connection from {peer}: {n} tokens refused",
                         peer=p.session.peer, n=failures)
                e.mensaje += (f" Demasiados intentos de autenticación fallidos ({failures}): "
                              "se cierra la conexión.")
                # Refused once this read's replies are written: its line
                # comes last.
                self.clock.callLater(0, self._refuse_if_open, p, e)
                return Deferred()

        p.session.handle = counted  # type: ignore[method-assign]

    def _refuse_if_open(self, p: Connection, error: Pfo3Error) -> None:
        if p in self._counted:
            p.refuse(error)

    def _stop_waiting(self, p: Connection) -> None:
        """
        C{p} authenticated, or is gone: it has no deadline any more.
        """
        timer = self._waiting.pop(p, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _too_late(self, p: Connection) -> None:
        if self._waiting.pop(p, None) is None:
            return
        p.session.on_authenticated = None
        log.info("Closing connection from {peer}: not authenticated in {timeout}s",
                 peer=p.session.peer, timeout=self.auth_timeout)
        p.refuse(MissingToken(
            f"La conexión no se autenticó en {self.auth_timeout:g} s; se cierra."))

    def disconnected(self, p: Connection) -> None:
        """
        A connection is gone: forget what it counted.
        """
        self._counted.discard(p)
        self._stop_waiting(p)
        host = self._hosts.pop(p, None)
        if host is not None:
            left = self._per_peer[host] - 1
            if left:
                self._per_peer[host] = left
            else:
                del self._per_peer[host]


def _proxy_wrapper(transport: Any) -> Optional[HAProxyProtocolWrapper]:
    """
    @return: The PROXY-protocol wrapper under a connection's transport, if
        any: the transport itself on C{haproxy:tcp:}, under the TLS layer on
        C{haproxy:ssl:}.
    """
    while transport is not None:
        if isinstance(transport, HAProxyProtocolWrapper):
            return transport
        transport = getattr(transport, "transport", None)
    return None


def _ip(host: str) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """
    @return: The address C{host} names, an IPv4-mapped IPv6 address
        (C{::ffff:10.0.0.1}, a dual-stack listener's IPv4 client) as IPv4.
    """
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _host(address: Any) -> Optional[str]:
    """
    @return: The client address that per-peer limits count, or L{None} for
        a peer without one (a UNIX socket).
    """
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    try:
        return str(_ip(address.host))
    except ValueError:
        return address.host
