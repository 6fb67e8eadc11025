"""
The in-memory store: the default, and the test double of every other.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from pfo3.store import DEFAULT_MAX_AGE, DEFAULT_MAX_RECORDS, IStore, Record


def purge_interval(max_age: float) -> float:
    """
    @return: How often a store with this retention purges: a tenth of it,
        between 1 s and 5 min.
    """
    return min(max(max_age / 10, 1.0), 300.0)


@implementer(IStore)
class MemoryStore:
    """
    Records in a dict, in the order their ids were first recorded, bounded
    by count (the oldest id goes first) and by age (L{purge}, every
    L{purge_interval} on the clock).  Nothing is written to disk: a restart
    forgets everything.
    """

    dropped = 0
    pending = 0

    def __init__(
        self, clock: IReactorTime, max_age: float = DEFAULT_MAX_AGE,
        max_records: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        self.clock = clock
        self.max_age = max_age
        self.max_records = max_records
        self.evicted = 0
        # An OrderedDict, not a dict: evicting the oldest of a plain dict
        # (del d[next(iter(d))]) scans the holes left by earlier evictions,
        # about 120 µs per task once 100,000 records are held.
        self._records: OrderedDict[Tuple[str, str], Record] = OrderedDict()
        self._purger: Optional[LoopingCall] = None

    def __len__(self) -> int:
        return len(self._records)

    def start(self) -> Deferred[None]:
        self._purger = LoopingCall(self._purge_old)
        self._purger.clock = self.clock
        self._purger.start(purge_interval(self.max_age), now=False)
        return succeed(None)

    def _purge_old(self) -> None:
        self.purge(self.clock.seconds() - self.max_age)

    def record(self, record: Record) -> None:
        # A task under an id already recorded keeps that id's place in the
        # order of eviction (cheaper than moving it to the end).
        records = self._records
        records[(record.owner, record.tarea_id)] = record
        if len(records) > self.max_records:
            records.popitem(False)  # the oldest; positional: no keyword parsing
            self.evicted += 1

    def get(self, owner: str, tarea_id: str) -> Deferred[Optional[Record]]:
        return succeed(self._records.get((owner, tarea_id)))

    def purge(self, before: float) -> Deferred[int]:
        old = [
            key for key, r in self._records.items()
            if (r.terminada if r.terminada is not None else r.aceptada) < before
        ]
        for key in old:
            del self._records[key]
        return succeed(len(old))

    def flush(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        if self._purger is not None and self._purger.running:
            self._purger.stop()
        return succeed(None)
