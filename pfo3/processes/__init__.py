"""
C{twistd pfo3 --processes N}: one server on N processes that share its
listening sockets (see C{docs/processes.md}).

The process C{twistd} starts (the I{parent}) serves nothing itself: it opens
every listening socket of C{--port}, C{--web} and C{--metrics} once, then
runs N copies of the same command line (the I{children}) that inherit those
sockets and accept from them, each with its own reactor, thread pool and
orchestrator.

  - The sockets are opened and adopted as L{pfo3.processes.ports} says: every
    endpoint kind and wrapper of a single process works unchanged.
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
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ReactorNotRunning
from twisted.logger import Logger
from twisted.python.failure import Failure

from pfo3.logs import JSONLogsOnParent
from pfo3.processes.ports import Binder, Key
from pfo3.signals import SecondSignal

log = Logger(namespace="pfo3")

#: The environment variable that tells a child which sockets it inherited.
ENVIRONMENT = "PFO3_PROCESS"

#: The child's end of its socket pair with the parent.
CONTROL_FD = 3

#: The first inherited listening socket; the others follow it.
FIRST_PORT_FD = 4


# -- a child ---------------------------------------------------------------------


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
        """
        @return: This role as the value of L{ENVIRONMENT} in the child's
            environment.
        """
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
    """
    A child's end of its socket pair with the parent, which only closes
    when the parent is gone (or this process exits).
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.stopping = False
        self.orphaned = False
        reactor.addSystemEventTrigger("before", "shutdown", self._stopping)

    def _stopping(self) -> None:
        self.stopping = True

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.stopping:
            return  # this process is stopping anyway, and closes its end
        self.orphaned = True
        log.warn("pfo3: the parent process is gone; stopping as on SIGTERM")
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass


def watch_parent(reactor: Any, fd: int = CONTROL_FD) -> _ParentWatch:
    """
    Stop the reactor (gracefully, as SIGTERM does) when the parent dies,
    which closes the other end of the socket pair on C{fd}.

    @return: The watch; its C{orphaned} says whether the parent died.
    """
    watch = _ParentWatch(reactor)
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, protocol.Factory.forProtocol(
        lambda: watch))
    os.close(fd)
    return watch


def ignore_interrupts() -> None:
    """
    Leave SIGINT to the parent: Ctrl-C reaches every process of the
    terminal's group, and the parent passes it on as SIGTERM; a child that
    took it too would see two signals and cancel its tasks in flight.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def become_child(reactor: Any, role: ChildRole, stats: Any) -> None:
    """
    Make this process one of its parent's children: stop when the parent
    dies, leave SIGINT to it, and share this process's counts (C{stats}, a
    L{pfo3.processes.counts.SharedStats}) with the others while it runs and once
    it stopped (then, if the parent is gone, remove them).
    """
    watch = watch_parent(reactor)

    def stopped() -> None:
        stats.stop()
        if watch.orphaned:  # nobody else will clean up
            stats.folder.remove()

    reactor.callWhenRunning(ignore_interrupts)
    reactor.callWhenRunning(stats.start)
    reactor.addSystemEventTrigger("after", "shutdown", stopped)
    log.info("pfo3 process {index} of {count} (pid {pid}), on the sockets of parent {parent}",
             index=role.index + 1, count=role.count, pid=os.getpid(), parent=os.getppid())


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
    """
    One child, as the parent sees it.

    @ivar ended: Fires when the child has exited, however it ended.
    """

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: Optional[int] = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class Supervisor(JSONLogsOnParent, Service):
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
        self._second_signal = SecondSignal(self.hurry, reactor.callFromThread)
        self.stats: Optional[Path] = None

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
        """
        Start the children, on the sockets opened, and log their pids.
        """
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
        assert self.stats is not None
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
        """
        A child exited: as asked while stopping, or else a failure, which
        stops the server.
        """
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
        self._second_signal.take()
        self._signal_all("TERM")
        d = defer.DeferredList([c.ended for c in self.children])
        return d.addCallback(self._all_ended)

    def _all_ended(self, ignored: Any) -> None:
        self._second_signal.give_back()
        for control in self._controls:
            control.close()
        if self.stats is not None:
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
                except (OSError, ProcessExitedAlready):
                    pass

    # -- a second SIGTERM/SIGINT while stopping --------------------------------

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

