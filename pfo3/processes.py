"""
C{twistd pfo3 --processes N}: one server on N processes that share its
listening sockets (see C{docs/processes.md}).

The process C{twistd} starts (the I{parent}) serves nothing itself: it opens
every listening socket of C{--port}, C{--web} and C{--metrics} once, then
runs N copies of the same command line (the I{children}) that inherit those
sockets and accept from them, each with its own reactor, thread pool and
orchestrator.

  - The sockets are opened by building the very endpoints a single process
    builds (C{haproxy:}, C{ssl:} with C{--tls-client-ca}, the PROXY header
    before TLS...) on a L{Binder} in the parent, which records what each
    endpoint asks the reactor to listen on; in a child the same endpoints
    are built on L{SharedPorts}, which answers those same requests by
    adopting the inherited socket (C{adoptStreamPort}).  Every wrapper then
    works unchanged, since it only ever sees C{listenTCP}, C{listenSSL} or
    C{listenUNIX}.
  - L{Supervisor} is the parent's service.  It stops the children with
    SIGTERM when it is stopped, passes a second SIGTERM/SIGINT on (so they
    cancel their tasks in flight), and stops the server when a child dies
    unexpectedly; C{twistd} then exits with status 1.
  - Each child holds one end of a socket pair whose other end only the
    parent holds (L{watch_parent}): if the parent dies, the child sees it
    close and stops as on SIGTERM.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet import abstract, defer, protocol, tcp, unix
from twisted.internet.error import CannotListenError, ProcessDone, ReactorNotRunning
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.lockfile import FilesystemLock
from zope.interface import implementer

log = Logger(namespace="pfo3")

#: The environment variable that tells a child which sockets it inherited.
ENVIRONMENT = "PFO3_PROCESS"

#: The child's end of its socket pair with the parent.
CONTROL_FD = 3

#: The first inherited listening socket; the others follow it.
FIRST_PORT_FD = 4

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


# -- the parent: opening the sockets -------------------------------------------


@implementer(IListeningPort)
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

    def startListening(self) -> None:
        pass

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

    def getHost(self) -> Any:
        return self.key


def _listening(family: int, address: Any, backlog: int, reuse_port: bool) -> socket.socket:
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


# -- a child: adopting them ------------------------------------------------------


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


@dataclass
class ChildRole:
    """
    What a child learns from its parent: its number, the sockets it
    inherited and the folder where the processes leave their counts.
    """

    index: int
    count: int
    ports: List[Tuple[Key, int]]
    stats: Path

    def as_environment(self) -> str:
        return json.dumps({"index": self.index, "count": self.count, "stats": str(self.stats),
                           "ports": [[list(key), fd] for key, fd in self.ports]})

    @classmethod
    def from_environment(cls, environ: Optional[Dict[str, str]] = None) -> Optional[ChildRole]:
        """
        @return: This process's role when its parent started it as a child,
            else L{None}.
        """
        text = (os.environ if environ is None else environ).get(ENVIRONMENT)
        if not text:
            return None
        data = json.loads(text)
        return cls(index=data["index"], count=data["count"], stats=Path(data["stats"]),
                   ports=[(tuple(key), fd) for key, fd in data["ports"]])


class _ParentWatch(protocol.Protocol):
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.reactor.running and not getattr(self.reactor, "_stopped", False):
            log.warn("pfo3: the parent process is gone; stopping as on SIGTERM")
            try:
                self.reactor.stop()
            except ReactorNotRunning:
                pass


def watch_parent(reactor: Any, fd: int = CONTROL_FD) -> None:
    """
    Stop the reactor (gracefully, as SIGTERM does) when the parent dies,
    which closes the other end of the socket pair on C{fd}.
    """
    factory = protocol.Factory.forProtocol(lambda: _ParentWatch(reactor))
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, factory)
    os.close(fd)


def ignore_interrupts() -> None:
    """
    Leave SIGINT to the parent: Ctrl-C reaches every process of the
    terminal's group, and the parent passes it on as SIGTERM; a child that
    took it too would see two signals and cancel its tasks in flight.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# -- the parent: running the children --------------------------------------------


def child_arguments(argv: Sequence[str]) -> List[str]:
    """
    @param argv: The options C{twistd pfo3} was given.
    @return: The same without C{--processes}: a child's options.
    """
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def child_command(arguments: Sequence[str]) -> List[str]:
    """
    @return: The command line of a child: C{twistd -n pfo3 ARGUMENTS} with
        this interpreter, in the foreground, without a pid file.
    """
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "pfo3", *arguments]


class _Child(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: Optional[int] = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class Supervisor(Service):
    """
    The parent of a server run on several processes: it opens the listening
    sockets, runs the children, and stops them.

    @ivar failed: Whether a child failed: it died while it should have been
        serving, or exited with an error when stopped.
    """

    def __init__(self, reactor: Any, count: int, arguments: Sequence[str],
                 listen: Callable[[Any], List[defer.Deferred[Any]]]) -> None:
        """
        @param count: How many children to run.
        @param arguments: Their C{twistd pfo3} options.
        @param listen: Listen on every endpoint of the server with the
            given reactor (a L{Binder} here).
        """
        self.reactor = reactor
        self.count = count
        self.arguments = list(arguments)
        self.listen = listen
        self.binder = Binder(count)
        self.children: List[_Child] = []
        self.failed = False
        self.stopping = False
        self._controls: List[socket.socket] = []
        self._saved_handlers: Dict[int, Any] = {}
        self.stats = Path()

    def privilegedStartService(self) -> None:
        """
        Open every listening socket, before C{twistd} gives up privileges
        (ports under 1024).
        """
        for d in self.listen(self.binder):
            failures: List[Failure] = []
            d.addErrback(failures.append)
            if failures:
                self.binder.stop()
                failures[0].raiseException()
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self.stats = Path(tempfile.mkdtemp(prefix="pfo3-stats-"))
        for index in range(self.count):
            self._spawn(index)
        # The children hold the sockets now: a child that dies takes its
        # own with it, and the kernel stops giving it connections.
        self.binder.close()
        log.info("pfo3 started {count} processes: {pids} (parent {parent})",
                 count=self.count, pids=", ".join(str(c.pid) for c in self.children),
                 parent=os.getpid())

    def _spawn(self, index: int) -> None:
        mine, theirs = socket.socketpair()
        self._controls.append(mine)
        ports = [(b.key, FIRST_PORT_FD + i) for i, b in enumerate(self.binder.bound)]
        fds: Dict[int, Any] = {0: 0, 1: 1, 2: 2, CONTROL_FD: theirs.fileno()}
        fds.update((FIRST_PORT_FD + i, b.for_child(index).fileno())
                   for i, b in enumerate(self.binder.bound))
        env = dict(os.environ)
        env[ENVIRONMENT] = ChildRole(index, self.count, ports, self.stats).as_environment()
        child = _Child(self, index)
        command = child_command(self.arguments)
        transport = self.reactor.spawnProcess(
            child, command[0], command, env=env, childFDs=fds)
        theirs.close()
        child.pid = transport.pid
        self.children.append(child)

    def _ended(self, child: _Child, reason: Failure) -> None:
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        asked = sig in (signal.SIGTERM, signal.SIGINT) or isinstance(value, ProcessDone)
        if self.stopping and asked:
            log.info("pfo3 process {pid} stopped", pid=child.pid)
            return
        self.failed = True
        how = f"signal {sig}" if sig is not None else f"status {code}"
        if self.stopping:
            log.error("pfo3 process {pid} ended with {how} while stopping", pid=child.pid,
                      how=how)
            return
        log.error("pfo3 process {pid} ended unexpectedly ({how}); stopping the server",
                  pid=child.pid, how=how)
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop listening, have every child drain (SIGTERM) and wait for them
        all to exit.
        """
        super().stopService()
        self.stopping = True
        self.binder.stop()
        self._take_signals()
        self._signal_all("TERM")
        d = defer.DeferredList([c.ended for c in self.children])
        return d.addCallback(self._all_ended)

    def _all_ended(self, ignored: Any) -> None:
        self._give_back_signals()
        for control in self._controls:
            control.close()
        shutil.rmtree(self.stats, ignore_errors=True)
        if self.failed:
            log.error("pfo3 stopped: a process failed")
            atexit.register(_exit_failed)
        else:
            log.info("pfo3 stopped: all {count} processes exited", count=self.count)

    def _signal_all(self, name: str) -> None:
        for child in self.children:
            transport = child.transport
            if transport is not None and transport.pid is not None:
                try:
                    transport.signalProcess(name)
                except OSError:
                    pass

    # -- a second SIGTERM/SIGINT while stopping --------------------------------

    def _take_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._saved_handlers[signum] = signal.signal(signum, self._on_signal)

    def _give_back_signals(self) -> None:
        saved, self._saved_handlers = self._saved_handlers, {}
        for signum, handler in saved.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.hurry)

    def hurry(self) -> None:
        """
        Have the children cancel their tasks in flight now: what a second
        SIGTERM or SIGINT to the parent does while it stops.
        """
        log.info("pfo3 stopping: second signal, passed on to every process")
        self._signal_all("TERM")


def _exit_failed() -> None:
    """
    End the process with status 1 (C{twistd} has no other way to say that
    the server failed after its reactor stopped cleanly).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def become_child(reactor: Any, role: ChildRole, stats: Any) -> None:
    """
    Make this process one of its parent's children: stop when the parent
    dies, leave SIGINT to it, and share this process's counts (C{stats}, a
    L{pfo3.sharedstats.SharedStats}) with the others while it runs and once
    it stopped.
    """
    watch_parent(reactor)
    reactor.callWhenRunning(ignore_interrupts)
    reactor.callWhenRunning(stats.start)
    reactor.addSystemEventTrigger("after", "shutdown", stats.stop)
    log.info("pfo3 process {index} of {count} (pid {pid}), on the sockets of parent {parent}",
             index=role.index + 1, count=role.count, pid=os.getpid(), parent=os.getppid())
