"""
The object storage options of C{twistd pfo3} and C{twistd pfo3-worker}:
C{--blobs}, C{--blob-threshold}, C{--blob-max-bytes}, C{--blob-url-ttl}.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from pfo3.amqp import tap as worker_tap
from pfo3.blobs import FileBlobs, MemoryBlobs
from pfo3.blobs.executor import BlobExecutor
from pfo3.blobs.requests import DEFAULT_THRESHOLD
from pfo3.executor import LocalExecutor
from pfo3.tap import Options, makeService

BROKER = ["--broker", "amqp://guest:guest@127.0.0.1:5672/%2F"]


def test_off_by_default() -> None:
    """
    Without C{--blobs} the server has no object storage and its executor is
    not wrapped; the threshold defaults to 256 KiB.
    """
    o = Options()
    o.parseOptions([])
    assert o["blobs"] is None and o["blob-threshold"] == DEFAULT_THRESHOLD == 262144
    service = makeService(o, MemoryReactorClock())
    assert service.factory.orchestrator.blobs is None
    assert isinstance(service.factory.orchestrator.executor, LocalExecutor)


def test_server_with_blobs(tmp_path: Path) -> None:
    """
    C{--blobs file:DIR} gives the orchestrator the storage and its limits,
    and wraps the local executor so that it resolves references.
    """
    o = Options()
    o.parseOptions(["--blobs", f"file:{tmp_path}", "--blob-threshold", "1000",
                    "--blob-max-bytes", "5000", "--blob-url-ttl", "60", "--max-line", "4096"])
    orch = makeService(o, MemoryReactorClock()).factory.orchestrator
    assert orch.blobs is not None
    assert isinstance(orch.blobs.store, FileBlobs)
    assert (orch.blobs.threshold, orch.blobs.max_bytes, orch.blobs.url_ttl,
            orch.blobs.max_line) == (1000, 5000, 60.0, 4096)
    assert isinstance(orch.executor, BlobExecutor)


def test_distributed_orchestrator_does_not_read_objects() -> None:
    """
    With C{--broker}, the orchestrator keeps the storage (for C{op: subir})
    but its executor is not wrapped: workers read the objects.
    """
    o = Options()
    o.parseOptions(["--blobs", "memory:", *BROKER])
    orch = makeService(o, MemoryReactorClock()).factory.orchestrator
    assert isinstance(orch.blobs.store, MemoryBlobs)  # type: ignore[union-attr]
    assert not isinstance(orch.executor, BlobExecutor)


def test_worker_options() -> None:
    """
    C{twistd pfo3-worker} takes the same options; its executor always
    resolves references (refusing content references without C{--blobs}).
    """
    o = worker_tap.Options()
    o.parseOptions([*BROKER, "--blobs", "memory:"])
    w = worker_tap.makeService(o, MemoryReactorClock())
    assert isinstance(w.executor, BlobExecutor)
    assert isinstance(w.executor.policy.store, MemoryBlobs)
    o = worker_tap.Options()
    o.parseOptions(BROKER)
    assert worker_tap.makeService(o, MemoryReactorClock()).executor.policy is None


@pytest.mark.parametrize("argv", [
    ["--blobs", "ftp://x"], ["--blobs", "s3://AB"], ["--blob-threshold", "0"],
    ["--blob-max-bytes", "0"], ["--blob-url-ttl", "0"], ["--blob-url-ttl", "1e9"],
    ["--blobs", "s3://k:s@bucket?endpoint=http://h:1"],
])
def test_bad_options(argv: List[str]) -> None:
    """
    Bad object storage options are usage errors, for both commands.
    """
    with pytest.raises(usage.UsageError):
        Options().parseOptions(argv)
    with pytest.raises(usage.UsageError):
        worker_tap.Options().parseOptions([*BROKER, *argv])
