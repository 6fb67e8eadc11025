"""
pfo3: a networked task server on Twisted.

Clients send one JSON object per line; the server validates it, runs the task
(inline, on a thread pool, or as a timer) and answers with one JSON line.
"""

from typing import Any

from pfo3.auth import IAuthenticator, Identity, JWTAuthenticator, OpenAuthenticator
from pfo3.errors import ERROR_CODES, Pfo3Error, TaskFailed
from pfo3.executor import IExecutor, LocalExecutor
from pfo3.orchestrator import Orchestrator, Session
from pfo3.protocol import TaskFactory, TaskProtocol
from pfo3.tasks import ASYNC, INLINE, THREAD, TaskRegistry, TaskType, default_registry

__version__ = "0.1.0"

_CLIENT_NAMES = ("BlockingClient", "ConnectionClosed", "ReplyTimeout", "TaskClient", "connect")


def __getattr__(name: str) -> Any:
    # The client is imported on first use: a server never loads it.
    if name in _CLIENT_NAMES:
        from pfo3 import client

        return getattr(client, name)
    raise AttributeError(f"module 'pfo3' has no attribute {name!r}")


__all__ = [
    "ASYNC",
    "BlockingClient",
    "ConnectionClosed",
    "ERROR_CODES",
    "IAuthenticator",
    "IExecutor",
    "INLINE",
    "Identity",
    "JWTAuthenticator",
    "LocalExecutor",
    "OpenAuthenticator",
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
