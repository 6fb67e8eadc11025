"""
The in-memory store: the default, and the test double of every other.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from pfo3.store import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_RECORDS,
    ForgetObjects,
    IStore,
    Record,
    done_record,
    objects_of,
)

#: What the store holds for a task that ended C{ok} the moment it started
#: (L{MemoryStore.record_done}): C{(tipo, contenido, resultado, worker,
#: peer, when, huella)}.  A tuple is a tenth of the cost of a L{Record}; the
#: record is built only if someone asks for it.
_Done = Tuple[str, Any, Any, Any, str, float, Optional[str]]

_Key = Tuple[str, str]
_Held = Union[Record, _Done]


def purge_interval(max_age: float) -> float:
    """
    @return: How often a store with this retention purges: a tenth of it,
        between 1 s and 5 min.
    """
    return min(max(max_age / 10, 1.0), 300.0)


def _expanded(key: _Key, held: _Held) -> Record:
    """
    @return: The record C{held} stands for.
    """
    if type(held) is Record:
        return held
    return done_record(key[0], key[1], *held)  # type: ignore[misc]


def _objects(held: _Held) -> List[str]:
    """
    @return: The references of the objects that go with the record C{held}
        stands for (L{objects_of}).
    """
    if type(held) is Record:
        return objects_of(held.resultado)
    return objects_of(held[2])  # type: ignore[index]


def _ended(held: _Held) -> float:
    """
    @return: When the task C{held} stands for ended (or, still running, was
        accepted): what its age is measured from.
    """
    if type(held) is Record:
        return held.terminada if held.terminada is not None else held.aceptada
    return held[5]  # type: ignore[index]


@implementer(IStore)
class MemoryStore:
    """
    Records in two dicts, bounded by count and by age (L{purge}, every
    L{purge_interval} on the clock).  Nothing is written to disk: a restart
    forgets everything.

    The bound is kept by generations, not one eviction per record: records
    go into the I{young} dict; once it holds half of C{max_records} it
    becomes the I{old} one and the previous old dict is dropped whole.  So a
    record costs one dict insertion and nothing more, the store never holds
    more than C{max_records}, and it always keeps at least the newest half
    of them (every record newer than the last turn of generations).
    """

    dropped = 0
    pending = 0
    on_forget: Optional[ForgetObjects] = None

    def __init__(
        self, clock: IReactorTime, max_age: float = DEFAULT_MAX_AGE,
        max_records: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        self.clock = clock
        self.max_age = max_age
        self.max_records = max_records
        #: Records forgotten to keep the bound (a task recorded again in the
        #: young generation leaves an older version that also counts).
        self.evicted = 0
        self._generation = (max_records + 1) // 2
        self._young: Dict[_Key, _Held] = {}
        self._old: Dict[_Key, _Held] = {}
        self._purger: Optional[LoopingCall] = None

    def __len__(self) -> int:
        """
        @return: How many tasks the store holds records of.
        """
        young = self._young
        return len(young) + sum(1 for key in self._old if key not in young)

    def start(self) -> Deferred[None]:
        self._purger = LoopingCall(self._purge_old)
        self._purger.clock = self.clock
        self._purger.start(purge_interval(self.max_age), now=False)
        return succeed(None)

    def _purge_old(self) -> None:
        self.purge(self.clock.seconds() - self.max_age)

    def _turn(self) -> None:
        """
        The young generation is full: it becomes the old one, and the old
        one is forgotten.
        """
        gone, kept = self._old, self._young
        self.evicted += len(gone)
        self._old = kept
        self._young = {}
        if self.on_forget is not None:
            self._forget(held for key, held in gone.items() if key not in kept)

    def _forget(self, forgotten: Iterable[_Held]) -> None:
        """
        Hand the object references of the C{forgotten} records to
        C{on_forget}.
        """
        assert self.on_forget is not None
        refs = list(dict.fromkeys(ref for held in forgotten for ref in _objects(held)))
        if refs:
            self.on_forget(refs)

    def record(self, record: Record) -> None:
        young = self._young
        young[(record.owner, record.tarea_id)] = record
        if len(young) >= self._generation:
            self._turn()

    def record_done(
        self, owner: str, tarea_id: str, tipo: str, contenido: Any, resultado: Any,
        worker: Any, peer: str, when: float, huella: Optional[str],
    ) -> None:
        young = self._young
        young[(owner, tarea_id)] = (tipo, contenido, resultado, worker, peer, when, huella)
        if len(young) >= self._generation:
            self._turn()

    def get(self, owner: str, tarea_id: str) -> Deferred[Optional[Record]]:
        key = (owner, tarea_id)
        held = self._young.get(key)
        if held is None:
            held = self._old.get(key)
            if held is None:
                return succeed(None)
        return succeed(_expanded(key, held))

    def purge(self, before: float) -> Deferred[int]:
        forgotten: Dict[_Key, List[_Held]] = {}
        for records in (self._young, self._old):
            old = [key for key, held in records.items() if _ended(held) < before]
            for key in old:
                forgotten.setdefault(key, []).append(records.pop(key))
        # An old version goes while a newer one stays: that task is kept.
        gone = [key for key in forgotten if key not in self._young and key not in self._old]
        if self.on_forget is not None:
            self._forget(held for key in gone for held in forgotten[key])
        return succeed(len(gone))

    def flush(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        if self._purger is not None and self._purger.running:
            self._purger.stop()
        return succeed(None)
