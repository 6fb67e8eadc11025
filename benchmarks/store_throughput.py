"""
How fast a results store writes records with unique ids (the worst case:
nothing coalesces), in this process, through its public interface.

    python benchmarks/store_throughput.py sqlite:/tmp/x.db postgresql://postgres@127.0.0.1/db

For each store URL: record N finished tasks with distinct ids as fast as the
reactor allows, in chunks (one chunk per reactor turn, as tasks would), then
wait until everything is written; print updates/s and the process's CPU
time per written update (reactor thread + adbapi threads).  Recording far
faster than the database writes fills the bounded queue: the updates it
drops are counted and said.
"""

from __future__ import annotations

import sys
import time
from typing import Any, List

from twisted.internet import defer, reactor, task

sys.path.insert(0, ".")

from pfo3.store import Record, from_url  # noqa: E402

N = 200_000
CHUNK = 500


@defer.inlineCallbacks
def measure(url: str) -> Any:
    store = from_url(url, reactor)  # type: ignore[arg-type]
    assert store is not None
    yield store.start()
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, N, CHUNK):
        for j in range(i, i + CHUNK):
            store.record(Record("", f"id-{j}", "uppercase", "hola mundo", "ok",
                                "127.0.0.1:1", 1.0, 1.0, 1.0, "HOLA MUNDO", 0))
        yield task.deferLater(reactor, 0, lambda: None)
    yield store.flush()
    while store.pending:
        yield task.deferLater(reactor, 0.01, lambda: None)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    written = getattr(store, "written", N)
    print(f"{url.split(':')[0]:12} {written / wall:10,.0f} updates written/s  "
          f"{cpu / max(written, 1) * 1e6:6.1f} us CPU per written update  "
          f"({N} recorded, {store.dropped} dropped: queue full)")
    yield store.stop()


@defer.inlineCallbacks
def main(urls: List[str]) -> Any:
    for url in urls:
        yield measure(url)
    reactor.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    reactor.callWhenRunning(main, sys.argv[1:])  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
