"""
The object storage options shared by C{twistd pfo3} and C{twistd
pfo3-worker}.
"""

from __future__ import annotations

import time
from typing import Any, List, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from pfo3.blobs import IBlobStore, from_url
from pfo3.blobs.requests import (
    DEFAULT_MAX_BYTES,
    DEFAULT_THRESHOLD,
    DEFAULT_URL_TTL,
    BlobPolicy,
)

log = Logger(namespace="pfo3.blobs")

#: Default line limit, as the protocol's (C{pfo3.protocol.DEFAULT_MAX_LINE}).
_MAX_LINE = 1 << 20

BLOB_PARAMETERS: List[List[Any]] = [
    ["blobs", None, None,
     "Object storage for large contents and results: s3://BUCKET?endpoint=http://HOST:PORT"
     " (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws, never here), "
     "file:DIR (one machine) or memory: (tests). Off when not given. See docs/blobs.md."],
    ["blob-threshold", None, DEFAULT_THRESHOLD,
     "Results longer than this many bytes are stored as objects for clients that send "
     "\"refs\": true.", int],
    ["blob-max-bytes", None, DEFAULT_MAX_BYTES,
     "Largest upload 'op: subir' accepts and largest object a task may read, in bytes.",
     int],
    ["blob-url-ttl", None, DEFAULT_URL_TTL,
     "Seconds a presigned upload or download URL works.", float],
]


def check_blobs(options: usage.Options) -> None:
    """
    Validate the object storage options (in C{postOptions}), without
    touching any storage.
    """
    from twisted.internet import reactor

    if options["blobs"] is not None:
        from_url(options["blobs"], reactor)
    if options["blob-threshold"] < 1:
        raise usage.UsageError("--blob-threshold must be at least 1")
    if options["blob-max-bytes"] < 1:
        raise usage.UsageError("--blob-max-bytes must be at least 1")
    if not 1 <= options["blob-url-ttl"] <= 7 * 86400:
        raise usage.UsageError("--blob-url-ttl must be from 1 second to 7 days")


def blob_policy(options: usage.Options, reactor: Any,
                max_line: int = _MAX_LINE) -> Optional[BlobPolicy]:
    """
    @return: The object storage the options ask for, started once the
        reactor runs and stopped when it stops; L{None} without C{--blobs}.
    """
    if options["blobs"] is None:
        return None
    store = from_url(options["blobs"], reactor)
    reactor.callWhenRunning(store.start)
    reactor.addSystemEventTrigger("after", "shutdown", store.stop)
    max_age = options.get("store-max-age")
    if max_age is not None:
        # The server (not the workers) keeps objects as long as records.
        retention = Retention(store, reactor, float(max_age))
        reactor.callWhenRunning(retention.start)
        reactor.addSystemEventTrigger("before", "shutdown", retention.stop)
    return BlobPolicy(store, threshold=options["blob-threshold"],
                      max_bytes=options["blob-max-bytes"], url_ttl=options["blob-url-ttl"],
                      max_line=max_line)


class Retention:
    """
    Deletes orphans: objects no record will take with it.

    A record's result object (its C{resultado_ref}) is deleted when the
    results store forgets the record (L{pfo3.blobs.requests.BlobPolicy.forget},
    by age or by the memory store's bound).  What is left is uploads (any
    number of tasks may use one, so none goes with a record), a result whose
    record was never written (C{--store none}, a store that dropped it) or
    an object whose deletion failed.  This sweep deletes objects written
    more than twice the store's retention (C{--store-max-age}) ago.

    @ivar interval: Seconds between sweeps: a tenth of the retention,
        within a minute and an hour.
    """

    def __init__(self, store: IBlobStore, clock: Any, max_age: float) -> None:
        self.store = store
        self.clock = clock
        self.max_age = max_age
        self.horizon = 2 * max_age
        self.interval = min(3600.0, max(60.0, max_age / 10))
        self.deleted = 0
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def sweep(self) -> Deferred[None]:
        """
        Delete the objects written before the horizon; a storage that
        fails is logged and tried again at the next sweep.
        """
        d = self.store.purge(time.time() - self.horizon)

        def done(n: int) -> None:
            self.deleted += n
            if n:
                log.info("Object storage retention: deleted {n} orphaned objects", n=n)

        def failed(f: Failure) -> None:
            log.warn("Object storage retention failed ({why}); trying again later",
                     why=f.getErrorMessage())

        return d.addCallbacks(done, failed)
