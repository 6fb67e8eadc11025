"""
The in-memory object storage (C{--blobs memory:}): the test double, and
enough for one process.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from typing import IO, Callable, Dict, Optional, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from pfo3 import blobs
from pfo3.errors import PresignUnsupported, UnknownRef


def _missing(ref: str) -> UnknownRef:
    return UnknownRef(f"No hay ningún objeto con la referencia {ref!r}.")


@implementer(blobs.IBlobStore)
class MemoryBlobs:
    """
    Objects in a dict.  It cannot presign URLs: there is no server a URL
    could point at, so L{presign_get} and L{presign_put} fail with
    L{PresignUnsupported}.
    """

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        """
        @param now: The clock that dates objects, for L{purge}.
        """
        self.errors: Counter[str] = Counter()  # it never fails
        self.objects: Dict[str, Tuple[bytes, str]] = {}
        self.times: Dict[str, float] = {}
        self._now = now

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def put(self, ref: str, source: blobs.Source) -> Deferred[blobs.BlobInfo]:
        data = source if isinstance(source, bytes) else source.read()
        digest = hashlib.sha256(data).hexdigest()
        self.objects[ref] = (data, digest)
        self.times[ref] = self._now()
        return succeed(blobs.BlobInfo(ref, len(data), digest))

    def get(self, ref: str) -> Deferred[bytes]:
        found = self.objects.get(ref)
        if found is None:
            return fail(_missing(ref))
        return succeed(found[0])

    def get_into(self, ref: str, sink: IO[bytes]) -> Deferred[blobs.BlobInfo]:
        found = self.objects.get(ref)
        if found is None:
            return fail(_missing(ref))
        sink.write(found[0])
        return succeed(blobs.BlobInfo(ref, len(found[0]), found[1]))

    def stat(self, ref: str) -> Deferred[Optional[blobs.BlobInfo]]:
        found = self.objects.get(ref)
        if found is None:
            return succeed(None)
        return succeed(blobs.BlobInfo(ref, len(found[0]), found[1]))

    def exists(self, ref: str) -> Deferred[bool]:
        return succeed(ref in self.objects)

    def delete(self, ref: str) -> Deferred[None]:
        self.objects.pop(ref, None)
        self.times.pop(ref, None)
        return succeed(None)

    def purge(self, before: float) -> Deferred[int]:
        old = [ref for ref in self.objects if self.times.get(ref, 0.0) < before]
        for ref in old:
            self.objects.pop(ref, None)
            self.times.pop(ref, None)
        return succeed(len(old))

    def presign_get(self, ref: str, expires: float) -> Deferred[blobs.Presigned]:
        return fail(_no_urls("memory:"))

    def presign_put(self, ref: str, expires: float) -> Deferred[blobs.Presigned]:
        return fail(_no_urls("memory:"))


def _no_urls(kind: str) -> PresignUnsupported:
    return PresignUnsupported(
        f"El almacén de objetos {kind} no puede firmar URLs; use uno compatible con S3 "
        "(--blobs s3://...).")
