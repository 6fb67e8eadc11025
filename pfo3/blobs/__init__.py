"""
Object storage for contents and results too large for one protocol line.

L{IBlobStore} is the seam; the orchestrator and the workers hold one (or
L{None}: object storage off) and never know which.  Implementations:

  - L{MemoryBlobs} (C{memory:}): a dict, for tests and one process; also
    the test double.  It cannot presign URLs.
  - L{FileBlobs} (C{file:DIR}): one file per object under a folder, for one
    machine (an orchestrator and its workers sharing a disk).  It cannot
    presign URLs either.
  - L{S3Blobs} (C{s3://BUCKET?endpoint=http://HOST:PORT}): any
    S3-compatible service through boto3, on a thread pool of its own;
    presigned GET and PUT URLs let clients move the bytes straight to and
    from the storage (C{docs/blobs.md}).

Objects are named by I{references} that pfo3 generates (L{new_ref}): a
letter for their origin and 32 hex digits, unguessable.  A reference a
client sends is checked with L{check_ref} before it reaches any storage, so
it can never name another key or a path outside C{file:}'s folder.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections import Counter
from typing import IO, Any, Optional, TypeVar, Union
from urllib.parse import parse_qs, urlsplit

from twisted.internet.defer import Deferred
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from pfo3.errors import BlobAccessDenied, BlobBucketMissing, BlobStoreUnavailable, UnknownRef

T = TypeVar("T")

#: What L{IBlobStore.put} stores: bytes, or a binary file open for reading
#: (read in chunks, never whole, where the storage allows).
Source = Union[bytes, IO[bytes]]

#: Chunk size for streaming copies and hashes.
CHUNK = 1 << 20

#: Upload references (C{op: subir}) start with this letter.
UPLOAD = "u"
#: Result references start with this letter.
RESULT = "r"

_REF = re.compile(r"[ur][0-9a-f]{32}\Z")
#: What every reference matches (storages purge only keys that do).
REF_PATTERN = _REF


def new_ref(kind: str = UPLOAD) -> str:
    """
    @param kind: L{UPLOAD} or L{RESULT}.
    @return: A fresh, unguessable reference.
    """
    return kind + uuid.uuid4().hex


def check_ref(ref: Any, tarea_id: Optional[str] = None) -> str:
    """
    @return: C{ref}, when it has the shape of a reference pfo3 hands out.
    @raise UnknownRef: otherwise.
    """
    if type(ref) is not str or not _REF.match(ref):
        raise UnknownRef("La referencia no es válida: debe ser una que el servidor entregó "
                         "(op 'subir' o 'resultado_ref').", tarea_id)
    return ref


class BlobInfo:
    """
    What the storage knows of one object.

    @ivar ref: Its reference.
    @ivar size: Its length in bytes.
    @ivar sha256: The hex SHA-256 of its bytes, when known (objects uploaded
        with a presigned URL have none until read).
    """

    __slots__ = ("ref", "size", "sha256")

    def __init__(self, ref: str, size: int, sha256: Optional[str]) -> None:
        self.ref = ref
        self.size = size
        self.sha256 = sha256

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlobInfo) and (
            (self.ref, self.size, self.sha256) == (other.ref, other.size, other.sha256))

    def __repr__(self) -> str:
        return f"BlobInfo({self.ref!r}, {self.size!r}, {self.sha256!r})"


class Presigned:
    """
    A presigned URL: whoever holds it may do one kind of request on one
    object until C{expira}.

    @ivar url: The URL.
    @ivar expira: When it stops working (seconds since the epoch).
    @ivar method: C{GET} or C{PUT}.
    """

    __slots__ = ("url", "expira", "method")

    def __init__(self, url: str, expira: float, method: str) -> None:
        self.url = url
        self.expira = expira
        self.method = method

    def __repr__(self) -> str:
        return f"Presigned({self.method} {self.url!r}, expira={self.expira!r})"


class IBlobStore(Interface):
    """
    Stores objects by reference.  Every method returns a Deferred; failures
    are typed: L{pfo3.errors.UnknownRef} for a missing object,
    L{pfo3.errors.BlobStoreUnavailable} (or its kinds
    L{pfo3.errors.BlobAccessDenied}, L{pfo3.errors.BlobBucketMissing}) when
    the storage cannot do it, L{pfo3.errors.PresignUnsupported} for URLs a
    storage cannot make.
    """

    errors: Counter[str] = Attribute(
        "Failures of the storage itself since start, by kind (L{ERROR_KINDS}), counted "
        "in the reactor's thread as they happen, whoever asked (a task, an upload, the "
        "retention); a missing object is not a failure.")

    def start() -> None:
        """
        Get ready (start the I/O threads).
        """

    def stop() -> Deferred[None]:
        """
        Release what L{start} took.
        """

    def put(ref: str, source: Source) -> Deferred[BlobInfo]:  # noqa: N805
        """
        Store C{source} under C{ref} (replacing any object there).

        @param source: Bytes, or a binary file read from its current
            position to its end (a seekable one is read twice, in chunks:
            once for its SHA-256, once to send it).
        @return: A Deferred of the stored object's L{BlobInfo}, SHA-256
            included.
        """

    def get(ref: str) -> Deferred[bytes]:  # noqa: N805
        """
        @return: A Deferred of the object's bytes.
        """

    def get_into(ref: str, sink: IO[bytes]) -> Deferred[BlobInfo]:  # noqa: N805
        """
        Write the object's bytes into the binary file C{sink}, in chunks.

        @return: A Deferred of its L{BlobInfo}, with the SHA-256 of the bytes
            written.
        """

    def stat(ref: str) -> Deferred[Optional[BlobInfo]]:  # noqa: N805
        """
        @return: A Deferred of the object's L{BlobInfo}, or of L{None} when
            there is none.
        """

    def exists(ref: str) -> Deferred[bool]:  # noqa: N805
        """
        @return: A Deferred of whether an object is stored under C{ref}.
        """

    def delete(ref: str) -> Deferred[None]:  # noqa: N805
        """
        Forget the object (nothing happens when there is none).
        """

    def purge(before: float) -> Deferred[int]:  # noqa: N805
        """
        Forget every object pfo3 stored (or a client uploaded) before
        C{before} (seconds since the epoch): retention, on the same
        schedule as the results store's records.

        @return: A Deferred of how many were deleted.
        """

    def presign_get(ref: str, expires: float) -> Deferred[Presigned]:  # noqa: N805
        """
        @param expires: Seconds the URL works.
        @return: A Deferred of a URL that downloads the object without
            credentials.
        """

    def presign_put(ref: str, expires: float) -> Deferred[Presigned]:  # noqa: N805
        """
        @return: A Deferred of a URL that uploads (C{PUT}) the object's bytes
            without credentials.
        """


def sha256_of(source: IO[bytes]) -> tuple[str, int]:
    """
    @return: The hex SHA-256 and the length of what is left in C{source},
        read in chunks (its position is restored).
    """
    start = source.tell()
    h = hashlib.sha256()
    size = 0
    while True:
        chunk = source.read(CHUNK)
        if not chunk:
            break
        h.update(chunk)
        size += len(chunk)
    source.seek(start)
    return h.hexdigest(), size


#: The kinds of storage failures L{IBlobStore.errors} counts (the C{kind}
#: label of C{pfo3_blob_errors_total}): the storage did not answer or failed
#: (C{almacen_objetos_no_disponible}), refused the server's credentials
#: (C{almacen_objetos_denegado}), has no such bucket
#: (C{almacen_objetos_sin_cubo}).
ERROR_KINDS = ("unavailable", "access_denied", "bucket_missing")


def error_kind(error: BaseException) -> Optional[str]:
    """
    @return: The kind (one of L{ERROR_KINDS}) of a storage failure, or
        L{None} for an error that is not one (a missing object, a URL the
        storage cannot make).
    """
    if isinstance(error, BlobBucketMissing):
        return "bucket_missing"
    if isinstance(error, BlobAccessDenied):
        return "access_denied"
    if isinstance(error, BlobStoreUnavailable):
        return "unavailable"
    return None


def counted(d: Deferred[T], errors: Counter[str]) -> Deferred[T]:
    """
    @return: C{d}, counting its failure in C{errors} by kind when it is one
        of the storage's own (L{error_kind}).
    """
    def count(failure: Failure) -> Failure:
        kind = error_kind(failure.value)
        if kind is not None:
            errors[kind] += 1
        return failure

    return d.addErrback(count)


#: How many threads an S3 storage uses by default: I/O waits, so more than
#: the cores.
DEFAULT_IO_THREADS = 16


def from_url(url: str, reactor: Any, io_threads: int = DEFAULT_IO_THREADS) -> IBlobStore:
    """
    The object storage a C{--blobs} URL names.

    @param url: C{memory:}, C{file:DIR} or
        C{s3://BUCKET?endpoint=http://HOST:PORT[&region=REGION]} (the
        endpoint may be left out for AWS itself).  Credentials come from
        the standard AWS environment variables and files, never the URL.
    @param reactor: Runs the storage's thread pool's results.
    @param io_threads: Threads of the storage's own pool (C{file:}, C{s3:}).
    @raise usage.UsageError: for a URL it does not understand (without
        touching any storage).
    """
    scheme, sep, rest = url.partition(":")
    scheme = scheme.strip().lower()
    if scheme == "memory" and sep and not rest:
        return MemoryBlobs()
    if scheme == "file" and rest:
        path = rest[2:] if rest.startswith("//") else rest
        if not path:
            raise usage.UsageError(f"invalid --blobs {url!r}: file: needs a folder")
        return FileBlobs(path, reactor, io_threads=io_threads)
    if scheme == "s3":
        parts = urlsplit(url)
        bucket = parts.netloc
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket) or parts.path not in (
            "", "/"
        ):
            raise usage.UsageError(
                f"invalid --blobs {url!r}: the bucket must be 3 to 63 lower-case letters, "
                "digits, dots or hyphens: s3://BUCKET?endpoint=http://HOST:PORT")
        if parts.username or parts.password:
            raise usage.UsageError(
                "--blobs: never put credentials in the URL; use AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or ~/.aws/credentials")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - {"endpoint", "region"}
        if unknown:
            raise usage.UsageError(
                f"invalid --blobs {url!r}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                "use endpoint= and region=")
        endpoint = query.get("endpoint", [None])[-1]
        region = query.get("region", [None])[-1]
        if endpoint is not None:
            ep = urlsplit(endpoint)
            if ep.scheme not in ("http", "https") or not ep.hostname:
                raise usage.UsageError(
                    f"invalid --blobs {url!r}: endpoint= must be http://HOST:PORT or "
                    "https://HOST:PORT")
        try:
            import boto3  # noqa: F401
        except ImportError:
            raise usage.UsageError("--blobs s3:// needs boto3: pip install 'pfo3[s3]'")
        from pfo3.blobs._s3 import S3Blobs

        return S3Blobs(bucket, reactor, endpoint=endpoint, region=region,
                       io_threads=io_threads)
    raise usage.UsageError(
        f"invalid --blobs {url!r}: use memory:, file:DIR or "
        "s3://BUCKET?endpoint=http://HOST:PORT")


from pfo3.blobs._file import FileBlobs  # noqa: E402
from pfo3.blobs._memory import MemoryBlobs  # noqa: E402

__all__ = [
    "CHUNK", "ERROR_KINDS", "REF_PATTERN", "RESULT", "UPLOAD", "BlobInfo", "FileBlobs",
    "IBlobStore", "MemoryBlobs", "Presigned", "Source", "check_ref", "counted", "error_kind",
    "from_url", "new_ref", "sha256_of",
]
