"""
Fakes for testing pfo3 and code that uses it, without threads or sockets.

  - L{SynchronousThreadPool}: runs "threaded" work at once, in the caller.
  - L{FakeReactor}: a L{Clock} that also runs C{callFromThread} at once, so
    L{deferToThreadPool} works with the pool above.
  - L{make_server}: a server factory wired to those fakes.
  - L{connect_in_memory}: a client protocol connected to a server factory
    through in-memory transports, driven by an L{IOPump}.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim

from pfo3.executor import LocalExecutor
from pfo3.orchestrator import Orchestrator
from pfo3.protocol import DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_LINE, TaskFactory
from pfo3.store import IStore
from pfo3.tasks import TaskRegistry, default_registry


class SynchronousThreadPool:
    """
    A stand-in for L{twisted.python.threadpool.ThreadPool} that runs each
    call immediately in the calling thread.
    """

    max = 1

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], None], f: Callable[..., Any],
        *args: Any, **kwargs: Any,
    ) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class FakeReactor(Clock):
    """
    A fake clock whose C{callFromThread} runs the call at once.
    """

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def make_server(
    registry: Optional[TaskRegistry] = None,
    reactor: Optional[FakeReactor] = None,
    timeout: float = 30.0,
    max_tasks: int = 50_000,
    max_line: int = DEFAULT_MAX_LINE,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    inline: bool = True,
    idle_timeout: float = 0.0,
    store: Optional[IStore] = None,
) -> TaskFactory:
    """
    A real pfo3 server factory running on fakes: time moves only when the
    test calls C{factory.orchestrator.clock.advance}, and blocking tasks run
    synchronously.

    @param store: Records the tasks (a L{pfo3.store.MemoryStore} on the same
        fake clock, typically); none by default.
    """
    if reactor is None:
        reactor = FakeReactor()
    if registry is None:
        registry = default_registry(entry_points=False)
    executor = LocalExecutor(reactor, SynchronousThreadPool(), inline=inline)
    orchestrator = Orchestrator(
        registry, executor, reactor, timeout=timeout, max_tasks=max_tasks, store=store)
    return TaskFactory(orchestrator, max_line, max_inflight, idle_timeout)


def connect_in_memory(
    server_factory: TaskFactory, client: Protocol
) -> Tuple[Protocol, iosim.IOPump]:
    """
    Connect C{client} to a new server protocol over in-memory transports.

    @return: The server protocol and the pump; call C{pump.flush()} to move
        bytes both ways.
    """
    server = server_factory.buildProtocol(None)
    server_transport = iosim.FakeTransport(server, isServer=True)
    client_transport = iosim.FakeTransport(client, isServer=False)
    pump = iosim.connect(server, server_transport, client, client_transport, greet=True)
    return server, pump
