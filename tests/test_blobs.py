"""
The same tests of the L{IBlobStore} contract against every object storage:
memory, a folder and a real S3-compatible server (SeaweedFS's C{weed mini},
checking signatures; see L{tests.s3server}).  Then what only S3 does:
presigned URLs over real HTTP, and its typed errors.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python import usage
from zope.interface.verify import verifyObject

from pfo3 import blobs
from pfo3.blobs import BlobInfo, FileBlobs, IBlobStore, MemoryBlobs, check_ref, from_url, new_ref
from pfo3.errors import (
    BlobAccessDenied,
    BlobBucketMissing,
    BlobStoreUnavailable,
    PresignUnsupported,
    UnknownRef,
)

from .conftest import free_port
from .s3server import S3Server, s3_server  # noqa: F401

Make = Callable[[], IBlobStore]

_FILE = pytest.param("file", marks=pytest.mark.integration)
_S3 = pytest.param("s3", marks=pytest.mark.integration)


def _s3(server: S3Server, monkeypatch: pytest.MonkeyPatch, url: str = "",
        **env: str) -> IBlobStore:
    """
    An S3 storage built from its C{--blobs} URL, with the credentials in
    the environment (as an operator gives them).
    """
    for k, v in server.env(**env).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    store = from_url(url or server.url, reactor, io_threads=4)
    store.start()
    return store


@pytest.fixture(params=["memory", _FILE, _S3])
def store(request: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[IBlobStore]:
    """
    A started storage of each kind.
    """
    kind = request.param
    if kind == "memory":
        s: IBlobStore = MemoryBlobs()
    elif kind == "file":
        s = from_url(f"file:{tmp_path / 'objetos'}", reactor, io_threads=2)
    else:
        s = _s3(request.getfixturevalue("s3_server"), monkeypatch)
    s.start()
    yield s
    s.stop()


@pytest_twisted.inlineCallbacks
def test_provides_the_interface(store: IBlobStore) -> Any:
    """
    Every storage provides L{IBlobStore}.
    """
    assert verifyObject(IBlobStore, store)
    yield None


@pytest_twisted.inlineCallbacks
def test_round_trip_bytes(store: IBlobStore) -> Any:
    """
    Bytes put under a reference come back the same, with their size and
    SHA-256 kept; C{exists} and C{stat} see the object, and after
    C{delete} neither does, and C{get} fails with C{ref_desconocida}.
    """
    ref = new_ref()
    data = bytes(range(256)) * 40 + "¿qué?".encode()
    digest = hashlib.sha256(data).hexdigest()
    info = yield store.put(ref, data)
    assert info == BlobInfo(ref, len(data), digest)
    assert (yield store.get(ref)) == data
    assert (yield store.exists(ref)) is True
    assert (yield store.stat(ref)) == BlobInfo(ref, len(data), digest)
    sink = io.BytesIO()
    assert (yield store.get_into(ref, sink)) == BlobInfo(ref, len(data), digest)
    assert sink.getvalue() == data
    yield store.delete(ref)
    assert (yield store.exists(ref)) is False
    assert (yield store.stat(ref)) is None
    with pytest.raises(UnknownRef):
        yield store.get(ref)
    yield store.delete(ref)  # twice: nothing happens


@pytest_twisted.inlineCallbacks
def test_missing_object(store: IBlobStore) -> Any:
    """
    Reading a reference never stored fails with L{UnknownRef}, both ways.
    """
    with pytest.raises(UnknownRef):
        yield store.get(new_ref())
    with pytest.raises(UnknownRef):
        yield store.get_into(new_ref(), io.BytesIO())


@pytest_twisted.inlineCallbacks
def test_50_mb_streamed_from_a_file(store: IBlobStore, tmp_path: Path) -> Any:
    """
    A 50 MB file is stored from its open file object and read back into
    another file, both in chunks, with the SHA-256 of its bytes intact.
    """
    src = tmp_path / "grande.bin"
    h = hashlib.sha256()
    with src.open("wb") as f:
        for i in range(50):
            chunk = hashlib.sha256(str(i).encode()).digest() * (1 << 15)  # 1 MiB
            f.write(chunk)
            h.update(chunk)
    size = src.stat().st_size
    ref = new_ref(blobs.RESULT)
    with src.open("rb") as f:
        info = yield store.put(ref, f)
    assert (info.size, info.sha256) == (size, h.hexdigest())
    dst = tmp_path / "vuelta.bin"
    with dst.open("wb") as f:
        back = yield store.get_into(ref, f)
    assert (back.size, back.sha256) == (size, h.hexdigest())
    assert dst.stat().st_size == size
    stat = yield store.stat(ref)
    assert stat.sha256 == h.hexdigest()
    yield store.delete(ref)


@pytest_twisted.inlineCallbacks
def test_refuses_references_it_did_not_hand_out(store: IBlobStore) -> Any:
    """
    A reference that is not one pfo3 generates (a path, another key) is
    refused before it reaches the storage.
    """
    for bad in ("../../etc/passwd", "u" + "0" * 31, "x" + "0" * 32, "", 5):
        with pytest.raises(UnknownRef):
            yield store.get(bad)  # type: ignore[arg-type]


@pytest_twisted.inlineCallbacks
def test_memory_and_file_refuse_presigning(tmp_path: Path) -> Any:
    """
    C{memory:} and C{file:} cannot make presigned URLs: they fail clearly
    with L{PresignUnsupported} (C{urls_no_soportadas}).
    """
    for s in (MemoryBlobs(), FileBlobs(str(tmp_path), reactor)):
        s.start()
        for presign in (s.presign_get, s.presign_put):
            with pytest.raises(PresignUnsupported) as info:
                yield presign(new_ref(), 60)
            assert info.value.codigo == "urls_no_soportadas"
        yield s.stop()


def test_references() -> None:
    """
    L{new_ref} makes distinct references that L{check_ref} accepts.
    """
    a, b = new_ref(), new_ref(blobs.RESULT)
    assert a != b and a[0] == "u" and b[0] == "r" and len(a) == 33
    assert check_ref(a) == a


@pytest.mark.parametrize("url", [
    "", "memory:x", "file:", "ftp://x", "s3://", "s3://UPPER?endpoint=http://h:1",
    "s3://ab", "s3://bucket/path", "s3://bucket?endpoint=ftp://h", "s3://bucket?foo=1",
    "s3://key:secret@bucket",
])
def test_from_url_refuses_bad_urls(url: str) -> None:
    """
    A C{--blobs} URL that is not understood (or carries credentials) is a
    usage error, raised without touching any storage.
    """
    with pytest.raises(usage.UsageError):
        from_url(url, reactor)


def test_from_url_kinds(tmp_path: Path) -> None:
    """
    C{memory:}, C{file:DIR} and C{s3://BUCKET?endpoint=...&region=...} give
    their storages.
    """
    assert isinstance(from_url("memory:", reactor), MemoryBlobs)
    f = from_url(f"file:{tmp_path}", reactor)
    assert isinstance(f, FileBlobs) and f.path == str(tmp_path)
    from pfo3.blobs._s3 import S3Blobs

    s = from_url("s3://pfo3-x?endpoint=http://127.0.0.1:9&region=eu-west-1", reactor)
    assert isinstance(s, S3Blobs)
    assert (s.bucket, s.endpoint, s.client.meta.region_name) == (
        "pfo3-x", "http://127.0.0.1:9", "eu-west-1")


# -- S3 only: presigned URLs over HTTP, and errors ---------------------------------


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_presigned_put_and_get_over_http(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> Any:
    """
    A presigned PUT URL uploads bytes with plain HTTP and no credentials; a
    presigned GET URL downloads them; both say when they expire.
    """
    s = _s3(s3_server, monkeypatch)
    ref = new_ref()
    put = yield s.presign_put(ref, 60)
    assert put.method == "PUT" and time.time() + 50 < put.expira <= time.time() + 61
    data = os.urandom(100_000)
    with urllib.request.urlopen(urllib.request.Request(put.url, data=data, method="PUT")) as r:
        assert r.status == 200
    get = yield s.presign_get(ref, 60)
    with urllib.request.urlopen(get.url) as r:
        assert r.read() == data
    info = yield s.stat(ref)
    assert info.size == len(data) and info.sha256 is None  # uploaded by a client
    yield s.stop()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_expired_presigned_url_is_refused(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> Any:
    """
    Once its expiry passed, a presigned GET URL is refused by the storage
    (HTTP 403), and so is one whose signature was tampered with.
    """
    s = _s3(s3_server, monkeypatch)
    ref = new_ref()
    yield s.put(ref, b"secreto")
    get = yield s.presign_get(ref, 1)
    with urllib.request.urlopen(get.url) as r:
        assert r.read() == b"secreto"
    tampered = get.url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(tampered)
    assert info.value.code == 403
    time.sleep(2.2)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(get.url)
    assert info.value.code == 403
    yield s.stop()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_wrong_credentials(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> Any:
    """
    A wrong secret key gives L{BlobAccessDenied}
    (C{almacen_objetos_denegado}), naming the bucket, for writes and reads.
    """
    s = _s3(s3_server, monkeypatch, secret="not-the-secret")
    with pytest.raises(BlobAccessDenied) as info:
        yield s.put(new_ref(), b"x")
    assert info.value.codigo == "almacen_objetos_denegado"
    assert s3_server.bucket in info.value.mensaje
    with pytest.raises(BlobAccessDenied):
        yield s.get(new_ref())
    yield s.stop()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_missing_bucket(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> Any:
    """
    A bucket that does not exist gives L{BlobBucketMissing}
    (C{almacen_objetos_sin_cubo}), for writes, reads and C{stat}.
    """
    s = _s3(s3_server, monkeypatch, f"s3://no-such-bucket?endpoint={s3_server.endpoint}")
    with pytest.raises(BlobBucketMissing) as info:
        yield s.put(new_ref(), b"x")
    assert "no-such-bucket" in info.value.mensaje
    with pytest.raises(BlobBucketMissing):
        yield s.get(new_ref())
    with pytest.raises(BlobBucketMissing):
        yield s.stat(new_ref())
    yield s.stop()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_storage_down(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> Any:
    """
    An endpoint where nothing listens gives L{BlobStoreUnavailable}
    (C{almacen_objetos_no_disponible}) within its retries, not a hang.
    """
    port = free_port()
    s = _s3(s3_server, monkeypatch, f"s3://pfo3-test?endpoint=http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(BlobStoreUnavailable) as info:
        yield s.put(new_ref(), b"x")
    assert type(info.value) is BlobStoreUnavailable
    assert info.value.codigo == "almacen_objetos_no_disponible"
    assert time.monotonic() - started < 30
    yield s.stop()


@pytest_twisted.inlineCallbacks
def test_purge(store: IBlobStore) -> Any:
    """
    C{purge(before)} deletes the objects written before C{before} and
    keeps the newer ones, saying how many it deleted.
    """
    a, b = new_ref(), new_ref(blobs.RESULT)
    yield store.put(a, b"a")
    yield store.put(b, b"b")
    assert (yield store.purge(time.time() - 3600)) == 0
    assert (yield store.exists(a)) and (yield store.exists(b))
    deleted = yield store.purge(time.time() + 5)
    assert deleted >= 2
    assert not (yield store.exists(a)) and not (yield store.exists(b))


def test_retention_sweeps_old_objects() -> None:
    """
    L{Retention} deletes orphans: the objects older than twice the store's
    retention (a record's objects go with the record, sooner); it keeps
    the others, even those older than one retention.  A storage that fails
    is logged, not fatal.
    """
    from twisted.internet.defer import fail
    from twisted.internet.task import Clock

    from pfo3.blobs.options import Retention

    ages = iter([time.time() - 7300, time.time() - 5000, time.time()])
    store = MemoryBlobs(now=lambda: next(ages))
    orphan, old, new = new_ref(), new_ref(), new_ref()
    store.put(orphan, b"huerfano")
    store.put(old, b"viejo")
    store.put(new, b"nuevo")
    clock = Clock()
    r = Retention(store, clock, 3600)
    assert r.interval == 360
    r.start()
    clock.advance(360)
    assert set(store.objects) == {old, new} and r.deleted == 1
    store.purge = lambda before: fail(BlobStoreUnavailable("caído"))  # type: ignore[method-assign]
    clock.advance(360)
    assert r._loop.running
    r.stop()
