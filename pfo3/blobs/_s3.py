"""
Object storage in any S3-compatible service (C{--blobs s3://BUCKET?...}),
through boto3 on a thread pool of its own (C{docs/blobs.md}).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from typing import IO, Any, Callable, Dict, List, Optional, TypeVar

import boto3
import botocore.exceptions as bex
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from pfo3 import blobs
from pfo3.blobs._memory import _missing
from pfo3.blobs._pool import OwnPool
from pfo3.errors import (
    BlobAccessDenied,
    BlobBucketMissing,
    BlobStoreUnavailable,
    Pfo3Error,
    UnknownRef,
)
from pfo3.executor import DaemonThreadPool

T = TypeVar("T")

#: Error codes of S3 that mean "these credentials are not accepted".
_DENIED = frozenset((
    "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken",
    "ExpiredToken", "AuthorizationHeaderMalformed", "403", "Forbidden",
))
#: Error codes that mean "no such object".
_MISSING = frozenset(("NoSuchKey", "404", "NotFound"))

#: Parts of a streamed upload (bytes).
PART = 8 << 20


@implementer(blobs.IBlobStore)
class S3Blobs(OwnPool):
    """
    One bucket of an S3-compatible service.

    Every call to boto3 (blocking HTTP) runs on this storage's own
    L{ThreadPool}, never the task pool: a slow storage then holds I/O
    threads, not the threads that run tasks.  Credentials come from boto3's
    standard chain (the C{AWS_*} environment variables, C{~/.aws/credentials}
    and C{~/.aws/config}, an instance role), never the command line.  The
    SHA-256 of each object stored with L{put} is kept in its metadata
    (C{x-amz-meta-sha256}).
    """

    def __init__(
        self, bucket: str, reactor: Any, endpoint: Optional[str] = None,
        region: Optional[str] = None, io_threads: int = blobs.DEFAULT_IO_THREADS,
        session: Optional[Any] = None, connect_timeout: float = 5.0,
        read_timeout: float = 60.0, attempts: int = 3,
    ) -> None:
        """
        @param session: A C{boto3.session.Session} to take credentials from
            (the default: a new one, reading the standard places).
        @param attempts: Tries of each request (boto3's own retries) before
            the storage is declared unavailable.
        """
        self.bucket = bucket
        self.reactor = reactor
        self.endpoint = endpoint
        self.threadpool = DaemonThreadPool(0, io_threads, "pfo3-blobs-s3")
        self.errors: Counter[str] = Counter()
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if endpoint else "auto"},
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            retries={"max_attempts": attempts, "mode": "standard"},
            max_pool_connections=io_threads,
        )
        session = session or boto3.session.Session()
        self.client = session.client(
            "s3", endpoint_url=endpoint, region_name=region or "us-east-1", config=config)
        self.transfer = TransferConfig(
            multipart_threshold=PART, multipart_chunksize=PART, use_threads=False)

    def __repr__(self) -> str:
        return f"<S3Blobs s3://{self.bucket} at {self.endpoint or 'AWS'}>"

    def _defer(self, f: Callable[..., T], ref: str, *args: Any) -> Deferred[T]:
        key = blobs.check_ref(ref)

        def guarded() -> T:
            try:
                return f(key, *args)
            except Pfo3Error:
                raise
            except Exception as e:
                error = self._error(e, key)
                if isinstance(error, UnknownRef):
                    self._check_bucket()
                raise error from e

        return blobs.counted(deferToThreadPool(self.reactor, self.threadpool, guarded),
                             self.errors)

    def _check_bucket(self) -> None:
        """
        Some services answer a read from a bucket that does not exist as if
        the object were missing: ask about the bucket itself.

        @raise BlobBucketMissing: when there is no such bucket.
        """
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except bex.ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket"):
                raise BlobBucketMissing(
                    f"El almacén de objetos no tiene el cubo s3://{self.bucket} en "
                    f"{self.endpoint or 'AWS'}.") from e
            raise

    def _error(self, e: Exception, ref: str) -> Pfo3Error:
        """
        @return: The typed error of a failed call to boto3.
        """
        where = f"s3://{self.bucket} en {self.endpoint or 'AWS'}"
        if isinstance(e, bex.ClientError):
            err: Dict[str, Any] = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code == "NoSuchBucket":
                return BlobBucketMissing(f"El almacén de objetos no tiene el cubo {where}.")
            if code in _DENIED:
                return BlobAccessDenied(
                    f"El almacén de objetos {where} rechazó las credenciales del servidor "
                    f"({code}).")
            if code in _MISSING:
                return _missing(ref)
            return BlobStoreUnavailable(
                f"El almacén de objetos {where} falló: {code or e}.")
        if isinstance(e, (bex.NoCredentialsError, bex.PartialCredentialsError)):
            return BlobAccessDenied(
                f"Sin credenciales para el almacén de objetos {where}: defina "
                "AWS_ACCESS_KEY_ID y AWS_SECRET_ACCESS_KEY (o ~/.aws/credentials).")
        return BlobStoreUnavailable(
            f"El almacén de objetos {where} no responde ({type(e).__name__}).")

    # -- objects ---------------------------------------------------------------

    def put(self, ref: str, source: blobs.Source) -> Deferred[blobs.BlobInfo]:
        return self._defer(self._put, ref, source)

    def _put(self, key: str, source: blobs.Source) -> blobs.BlobInfo:
        if isinstance(source, bytes):
            digest = hashlib.sha256(source).hexdigest()
            self.client.put_object(Bucket=self.bucket, Key=key, Body=source,
                                   Metadata={"sha256": digest})
            return blobs.BlobInfo(key, len(source), digest)
        if source.seekable():
            digest, size = blobs.sha256_of(source)
        else:
            data = source.read()
            return self._put(key, data)
        self.client.upload_fileobj(source, self.bucket, key,
                                   ExtraArgs={"Metadata": {"sha256": digest}},
                                   Config=self.transfer)
        return blobs.BlobInfo(key, size, digest)

    def get(self, ref: str) -> Deferred[bytes]:
        def read(key: str) -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return self._defer(read, ref)

    def get_into(self, ref: str, sink: IO[bytes]) -> Deferred[blobs.BlobInfo]:
        def copy(key: str) -> blobs.BlobInfo:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            h = hashlib.sha256()
            size = 0
            try:
                for chunk in body.iter_chunks(blobs.CHUNK):
                    sink.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
            finally:
                body.close()
            return blobs.BlobInfo(key, size, h.hexdigest())

        return self._defer(copy, ref)

    def stat(self, ref: str) -> Deferred[Optional[blobs.BlobInfo]]:
        def head(key: str) -> Optional[blobs.BlobInfo]:
            try:
                meta = self.client.head_object(Bucket=self.bucket, Key=key)
            except bex.ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in _MISSING:
                    # A bare 404 may also mean "no bucket": ask once.
                    self._check_bucket()
                    return None
                raise
            return blobs.BlobInfo(key, int(meta["ContentLength"]),
                                  meta.get("Metadata", {}).get("sha256"))

        return self._defer(head, ref)

    def exists(self, ref: str) -> Deferred[bool]:
        return self.stat(ref).addCallback(lambda info: info is not None)

    def delete(self, ref: str) -> Deferred[None]:
        def remove(key: str) -> None:
            self.client.delete_object(Bucket=self.bucket, Key=key)

        return self._defer(remove, ref)

    def purge(self, before: float) -> Deferred[int]:
        def sweep(_: str) -> int:
            count = 0
            batch: List[Dict[str, str]] = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket):
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    if blobs.REF_PATTERN.match(key) and obj["LastModified"].timestamp() < before:
                        batch.append({"Key": key})
                        if len(batch) == 1000:
                            count += self._delete_many(batch)
                            batch = []
            if batch:
                count += self._delete_many(batch)
            return count

        # Any valid reference: _defer checks one, the sweep needs none.
        return self._defer(sweep, blobs.new_ref())

    def _delete_many(self, keys: List[Dict[str, str]]) -> int:
        self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
        return len(keys)

    # -- presigned URLs ------------------------------------------------------------

    def presign_get(self, ref: str, expires: float) -> Deferred[blobs.Presigned]:
        return self._defer(self._presign, ref, "get_object", "GET", expires)

    def presign_put(self, ref: str, expires: float) -> Deferred[blobs.Presigned]:
        return self._defer(self._presign, ref, "put_object", "PUT", expires)

    def _presign(self, key: str, operation: str, method: str,
                 expires: float) -> blobs.Presigned:
        seconds = max(1, int(expires))
        now = time.time()
        url = self.client.generate_presigned_url(
            operation, Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=seconds)
        return blobs.Presigned(url, now + seconds, method)
