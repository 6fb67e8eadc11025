"""
What the storages that block (files, S3) share: a thread pool of their own
for I/O, never the task pool, started and stopped with the storage.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.python.threadpool import ThreadPool


class OwnPool:
    """
    A storage's start and stop: those of its I/O thread pool.
    """

    threadpool: ThreadPool

    def start(self) -> None:
        if not self.threadpool.started:
            self.threadpool.start()

    def stop(self) -> Deferred[None]:
        if self.threadpool.started:
            self.threadpool.stop()
        return succeed(None)
