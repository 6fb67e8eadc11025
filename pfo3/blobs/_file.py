"""
Object storage in a folder (C{--blobs file:DIR}), for one machine: an
orchestrator and the workers that share its disk.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from typing import IO, Any, Callable, Optional, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from pfo3 import blobs
from pfo3.blobs._memory import _missing, _no_urls
from pfo3.blobs._pool import OwnPool
from pfo3.errors import BlobStoreUnavailable, Pfo3Error
from pfo3.executor import DaemonThreadPool

T = TypeVar("T")


@implementer(blobs.IBlobStore)
class FileBlobs(OwnPool):
    """
    One file per object, C{DIR/REF}, with its SHA-256 in C{DIR/REF.sha256};
    written to a temporary name and renamed, so a reader never sees half an
    object.  Blocking file I/O runs on a thread pool of its own.  It cannot
    presign URLs (no HTTP server serves the folder).
    """

    def __init__(self, path: str, reactor: Any, io_threads: int = 4,
                 threadpool: Optional[Any] = None) -> None:
        """
        @param threadpool: A pool to use instead of a new one (tests pass a
            synchronous one); L{start} and L{stop} start and stop it.
        """
        self.path = os.path.abspath(path)
        self.reactor = reactor
        self.threadpool = threadpool or DaemonThreadPool(0, io_threads, "pfo3-blobs-file")
        self.errors: Counter[str] = Counter()

    def _file(self, ref: str) -> str:
        return os.path.join(self.path, blobs.check_ref(ref))

    def _defer(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        def guarded() -> T:
            try:
                return f(*args)
            except Pfo3Error:
                raise
            except OSError as e:
                raise BlobStoreUnavailable(
                    f"El almacén de objetos ({self.path}) falló: {e.strerror or e}.") from e

        return blobs.counted(deferToThreadPool(self.reactor, self.threadpool, guarded),
                             self.errors)

    def put(self, ref: str, source: blobs.Source) -> Deferred[blobs.BlobInfo]:
        return self._defer(self._put, ref, source)

    def _put(self, ref: str, source: blobs.Source) -> blobs.BlobInfo:
        target = self._file(ref)
        os.makedirs(self.path, exist_ok=True)
        h = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(source, bytes):
                    out.write(source)
                    h.update(source)
                    size = len(source)
                else:
                    while True:
                        chunk = source.read(blobs.CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                        h.update(chunk)
                        size += len(chunk)
            digest = h.hexdigest()
            with open(target + ".sha256", "w") as side:
                side.write(digest)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return blobs.BlobInfo(ref, size, digest)

    def get(self, ref: str) -> Deferred[bytes]:
        def read() -> bytes:
            try:
                with open(self._file(ref), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                raise _missing(ref)

        return self._defer(read)

    def get_into(self, ref: str, sink: IO[bytes]) -> Deferred[blobs.BlobInfo]:
        def copy() -> blobs.BlobInfo:
            h = hashlib.sha256()
            size = 0
            try:
                f = open(self._file(ref), "rb")
            except FileNotFoundError:
                raise _missing(ref)
            with f:
                while True:
                    chunk = f.read(blobs.CHUNK)
                    if not chunk:
                        break
                    sink.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
            return blobs.BlobInfo(ref, size, h.hexdigest())

        return self._defer(copy)

    def stat(self, ref: str) -> Deferred[Optional[blobs.BlobInfo]]:
        def look() -> Optional[blobs.BlobInfo]:
            target = self._file(ref)
            try:
                size = os.stat(target).st_size
            except FileNotFoundError:
                return None
            try:
                with open(target + ".sha256") as side:
                    digest: Optional[str] = side.read().strip() or None
            except FileNotFoundError:
                digest = None
            return blobs.BlobInfo(ref, size, digest)

        return self._defer(look)

    def exists(self, ref: str) -> Deferred[bool]:
        return self._defer(lambda: os.path.exists(self._file(ref)))

    def delete(self, ref: str) -> Deferred[None]:
        def remove() -> None:
            target = self._file(ref)
            for name in (target, target + ".sha256"):
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass

        return self._defer(remove)

    def purge(self, before: float) -> Deferred[int]:
        def sweep() -> int:
            count = 0
            try:
                names = os.listdir(self.path)
            except FileNotFoundError:
                return 0
            for name in names:
                if not blobs.REF_PATTERN.match(name):
                    continue
                target = os.path.join(self.path, name)
                try:
                    if os.stat(target).st_mtime >= before:
                        continue
                    os.unlink(target)
                except FileNotFoundError:
                    continue
                try:
                    os.unlink(target + ".sha256")
                except FileNotFoundError:
                    pass
                count += 1
            return count

        return self._defer(sweep)

    def presign_get(self, ref: str, expires: float) -> Deferred[blobs.Presigned]:
        return fail(_no_urls("file:"))

    def presign_put(self, ref: str, expires: float) -> Deferred[blobs.Presigned]:
        return fail(_no_urls("file:"))
