"""
pfo3: a networked task server on Twisted.

Clients send one JSON object per line; the server validates it, runs the task
(inline, on a thread pool, or as a timer) and answers with one JSON line.
"""

from pfo3.client import BlockingClient, ConnectionClosed, ReplyTimeout, TaskClient, connect
from pfo3.errors import ERROR_CODES, Pfo3Error, TaskFailed
from pfo3.executor import LocalExecutor
from pfo3.orchestrator import Orchestrator, Session
from pfo3.protocol import TaskFactory, TaskProtocol
from pfo3.tasks import ASYNC, INLINE, THREAD, TaskRegistry, TaskType, default_registry

__version__ = "0.1.0"

__all__ = [
    "ASYNC",
    "BlockingClient",
    "ConnectionClosed",
    "ERROR_CODES",
    "INLINE",
    "LocalExecutor",
    "Orchestrator",
    "Pfo3Error",
    "ReplyTimeout",
    "Session",
    "THREAD",
    "TaskClient",
    "TaskFactory",
    "TaskFailed",
    "TaskProtocol",
    "TaskRegistry",
    "TaskType",
    "__version__",
    "connect",
    "default_registry",
]
