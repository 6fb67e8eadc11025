"""
The listening sockets of C{--processes N}: opened once by the parent
(L{Binder}), adopted by each child (L{SharedPorts}).

The parent builds the very endpoints a single process builds (C{haproxy:},
C{ssl:} with C{--tls-client-ca}, the PROXY header before TLS...) on a
L{Binder}, which opens a socket wherever an endpoint asks the reactor to
listen.  A child builds them on L{SharedPorts}, which answers the same
requests by adopting the socket the parent opened for them
(C{adoptStreamPort}).  Every wrapper therefore works unchanged: it only
ever sees C{listenTCP}, C{listenSSL} or C{listenUNIX}.

A TCP endpoint is opened as one socket per child, all in one
C{SO_REUSEPORT} group, so that the kernel spreads new connections over the
children; a UNIX endpoint (which has no C{SO_REUSEPORT}) is one socket that
they share.  C{docs/processes.md} says why.

Like L{pfo3.tlsid}, this reaches into Twisted where it has no public way:
C{tcp._resolveIPv6} to bind IPv6 addresses as Twisted's ports do, and
C{unix.Port._fromListeningDescriptor} to adopt a UNIX socket without
removing its file when one child stops.  Should a Twisted release move
them, the server fails to start, and C{tests/test_processes.py} says so.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any, List, Optional, Sequence, Tuple

from twisted.internet import abstract, tcp, unix
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.lockfile import FilesystemLock

#: What a listening socket is known by: C{("tcp", port, interface)} or
#: C{("unix", path)}, as the endpoint asked for it.
Key = Tuple[Any, ...]


def _tcp_key(port: int, interface: str) -> Key:
    return ("tcp", port, interface)


def _unix_key(address: Any) -> Key:
    return ("unix", os.fsdecode(address))


#: Endpoint kinds whose sockets can be shared: those that listen through
#: the reactor's listenTCP, listenSSL or listenUNIX, also inside C{haproxy:}.
SHAREABLE = ("tcp", "tcp6", "ssl", "unix")


def shareable(description: str) -> bool:
    """
    @return: Whether the server endpoint C{description} can be opened by
        the parent and shared by the children (C{tcp:}, C{tcp6:},
        C{ssl:}, C{unix:}, and those behind C{haproxy:}); C{systemd:} and
        third-party endpoint kinds cannot.
    """
    kind, _, rest = description.partition(":")
    kind = kind.strip().lower()
    if kind == "haproxy":
        return shareable(rest)
    return kind in SHAREABLE


class BoundSocket:
    """
    What L{Binder} opened for one endpoint: one listening socket per child
    (TCP, in one C{SO_REUSEPORT} group), or one that they all share (UNIX).
    Bound and listening, never read here.
    """

    def __init__(self, key: Key, sockets: List[socket.socket],
                 lock: Optional[FilesystemLock] = None, path: Optional[str] = None) -> None:
        """
        @param lock: The lock file of a UNIX socket (C{lockfile=1}).
        @param path: The file of a UNIX socket, removed when it is closed.
        """
        self.key = key
        self.sockets = sockets
        self.lock = lock
        self.path = path

    def for_child(self, index: int) -> socket.socket:
        """
        @return: The socket that child C{index} listens on.
        """
        return self.sockets[index % len(self.sockets)]

    def close(self) -> None:
        """
        Close the sockets: the children hold their own copies.
        """
        for sock in self.sockets:
            sock.close()

    def stopListening(self) -> None:
        """
        Close the sockets; remove a UNIX socket's file and release its lock.
        """
        self.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = None
        if self.lock is not None:
            self.lock.unlock()
            self.lock = None


def _listening(family: int, address: Any, backlog: int, reuse_port: bool) -> socket.socket:
    """
    @return: A non-blocking socket listening on C{address}, with
        C{SO_REUSEADDR} as Twisted's TCP ports set it, and C{SO_REUSEPORT}
        when asked.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Binder:
    """
    A stand-in reactor for the endpoints a server listens on: where they
    would listen, it opens the listening sockets for the children to
    inherit.  Only C{listenTCP}, C{listenSSL} and C{listenUNIX} are
    offered: nothing else may run.

    A TCP endpoint gets one socket per child, all bound to the same address
    with C{SO_REUSEPORT}, so that the kernel spreads new connections evenly
    over the children; a UNIX endpoint (which has no C{SO_REUSEPORT}) gets
    one socket that they share.
    """

    def __init__(self, copies: int) -> None:
        """
        @param copies: How many children will listen.
        """
        self.copies = copies
        self.bound: List[BoundSocket] = []

    def listenTCP(self, port: int, factory: IProtocolFactory, backlog: int = 50,
                  interface: str = "") -> BoundSocket:
        family = socket.AF_INET6 if abstract.isIPv6Address(interface) else socket.AF_INET
        sockets: List[socket.socket] = []
        actual = port
        try:
            if port:
                # Fail on a port in use as a single process does, instead of
                # joining the SO_REUSEPORT group of another program.
                address = tcp._resolveIPv6(interface, port) \
                    if family == socket.AF_INET6 else (interface, port)
                _listening(family, address, 1, reuse_port=False).close()
            for _ in range(self.copies):
                address = tcp._resolveIPv6(interface, actual) \
                    if family == socket.AF_INET6 else (interface, actual)
                sockets.append(_listening(family, address, backlog, reuse_port=True))
                actual = sockets[0].getsockname()[1]  # port 0: the one given to the first
        except OSError as e:
            for sock in sockets:
                sock.close()
            raise CannotListenError(interface, port, e)
        bound = BoundSocket(_tcp_key(port, interface), sockets)
        self.bound.append(bound)
        return bound

    def listenSSL(self, port: int, factory: IProtocolFactory, contextFactory: Any,
                  backlog: int = 50, interface: str = "") -> BoundSocket:
        return self.listenTCP(port, factory, backlog, interface)

    def listenUNIX(self, address: Any, factory: IProtocolFactory, backlog: int = 50,
                   mode: int = 0o666, wantPID: int = 0) -> BoundSocket:
        path = os.fsdecode(address)
        in_filesystem = not path.startswith("\0")
        lock = None
        if wantPID:
            lock = FilesystemLock(path + ".lock")
            if not lock.lock():
                raise CannotListenError(None, path, "Cannot acquire lock")
            if not lock.clean and os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
                os.remove(path)
        try:
            sock = _listening(socket.AF_UNIX, path, backlog, reuse_port=False)
            if in_filesystem:
                os.chmod(path, mode)
        except OSError as e:
            if lock is not None:
                lock.unlock()
            raise CannotListenError(None, path, e)
        bound = BoundSocket(_unix_key(address), [sock], lock, path if in_filesystem else None)
        self.bound.append(bound)
        return bound

    def close(self) -> None:
        """
        Close every socket, keeping the UNIX sockets' files and locks.
        """
        for bound in self.bound:
            bound.close()

    def stop(self) -> None:
        """
        Close every socket and remove the UNIX sockets' files and locks.
        """
        for bound in self.bound:
            bound.stopListening()


class _SharedUNIXPort(unix.Port):
    """
    A UNIX port on a socket shared with other processes: it leaves the
    socket's file (and its lock) to the parent, which created them.
    """

    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)


class SharedPorts:
    """
    The reactor, as the endpoints of a child see it: C{listenTCP},
    C{listenSSL} and C{listenUNIX} adopt the listening socket the parent
    opened for the same request instead of opening one.  Everything else is
    the reactor's.
    """

    def __init__(self, reactor: Any, inherited: Sequence[Tuple[Key, int]]) -> None:
        """
        @param inherited: The inherited sockets: what each was opened for
            and its file descriptor.
        """
        self._reactor = reactor
        self._inherited = list(inherited)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def _take(self, key: Key) -> int:
        for i, (k, fd) in enumerate(self._inherited):
            if k == key:
                del self._inherited[i]
                return fd
        raise CannotListenError(None, key[1:], "no socket inherited from the parent for it")

    def listenTCP(self, port: int, factory: IProtocolFactory, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        fd = self._take(_tcp_key(port, interface))
        family = socket.AF_INET6 if abstract.isIPv6Address(interface) else socket.AF_INET
        try:
            listening: IListeningPort = self._reactor.adoptStreamPort(fd, family, factory)
        finally:
            os.close(fd)  # the port holds a duplicate
        return listening

    def listenSSL(self, port: int, factory: IProtocolFactory, contextFactory: Any,
                  backlog: int = 50, interface: str = "") -> IListeningPort:
        # What the reactor's own listenSSL does.
        tls = TLSMemoryBIOFactory(contextFactory, False, factory)
        listening = self.listenTCP(port, tls, backlog, interface)
        listening._type = "TLS"  # type: ignore[attr-defined]
        return listening

    def listenUNIX(self, address: Any, factory: IProtocolFactory, backlog: int = 50,
                   mode: int = 0o666, wantPID: int = 0) -> IListeningPort:
        fd = self._take(_unix_key(address))
        try:
            listening = _SharedUNIXPort._fromListeningDescriptor(self._reactor, fd, factory)
        finally:
            os.close(fd)
        listening.mode = mode
        listening.startListening()
        return listening
