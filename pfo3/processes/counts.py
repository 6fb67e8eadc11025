"""
C{op: stats} and C{/metrics} of a server run as several processes
(C{--processes N}): every process's counts, added up.

Each process writes what it counted (L{pfo3.tally.Tally} and the levels
beside it: L{pfo3.stats.Counts}) as one small JSON file in a folder the
processes share, every L{INTERVAL} seconds and once more when it has
stopped; the file is replaced whole (C{os.replace}), so a reader never sees
half of one.  The process that is asked reads the others' files and adds
its own counts as they are at that moment (writing them first, so that
totals never go down from one answer to the next, whichever process gives
it).  A task pays nothing for this:
the counters are the ones a single process keeps anyway, and they are
copied off the task path, on a timer.  Totals are exact once every process
wrote after the last task ended: at most L{INTERVAL} seconds after the load
settles.
"""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path
from typing import Any, Dict, List, Optional

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pfo3.protocol import TaskFactory
from pfo3.stats import BrokerProbe, Counts, ServerStats, summary_of
from pfo3.tally import Tally

log = Logger(namespace="pfo3")

#: Seconds between two snapshots of a process's counts.
INTERVAL = 0.5


def counts_as_json(counts: Counts, pid: int, now: float) -> Dict[str, Any]:
    """
    @return: C{counts} as the JSON-able data of a snapshot file.
    """
    return {
        "pid": pid,
        "tally": counts.tally.as_json(now),
        "en_curso": counts.in_flight,
        "conexiones": counts.connections or 0,
        "hilos": counts.threads,
        "ocupados": counts.running,
        "abandonadas": counts.abandoned,
        "store": counts.store_pending,
        "store_descartadas": counts.store_dropped,
        "apagando": counts.draining,
        "started": counts.started,
    }


def add_up(snapshots: List[Dict[str, Any]]) -> Counts:
    """
    @param snapshots: One L{counts_as_json} per process.
    @return: Their counts added up (the earliest start; draining when any
        process is).
    """
    tally = Tally()
    tally.recent = deque()  # every process's recent durations, for percentiles
    stores = [s["store"] for s in snapshots if s["store"] is not None]
    dropped = [s["store_descartadas"] for s in snapshots
               if s.get("store_descartadas") is not None]
    for s in snapshots:
        tally.add_json(s["tally"])
    return Counts(
        tally=tally,
        in_flight=sum(s["en_curso"] for s in snapshots),
        connections=sum(s["conexiones"] for s in snapshots),
        threads=sum(s["hilos"] for s in snapshots),
        running=sum(s["ocupados"] for s in snapshots),
        abandoned=sum(s["abandonadas"] for s in snapshots),
        store_pending=sum(stores) if stores else None,
        store_dropped=sum(dropped) if dropped else None,
        draining=any(s["apagando"] for s in snapshots),
        started=min(s["started"] for s in snapshots),
    )


class SnapshotFolder:
    """
    The folder where the processes of one server leave their counts, one
    file per process (C{<index>.json}).
    """

    def __init__(self, path: Path, index: int) -> None:
        """
        @param index: This process's number among the server's (0…N-1).
        """
        self.path = Path(path)
        self.index = index
        self.mine = self.path / f"{index}.json"

    def write(self, data: Dict[str, Any]) -> None:
        """
        Replace this process's file with C{data}, whole.
        """
        partial = self.path / f".{self.index}.json.new"
        partial.write_text(json.dumps(data), encoding="utf-8")
        os.replace(partial, self.mine)

    def remove(self) -> None:
        """
        Remove this process's file, and the folder once it is empty: what
        the last process standing does when the parent is gone and cannot.
        """
        for name in (self.mine, self.path / f".{self.index}.json.new"):
            try:
                name.unlink()
            except FileNotFoundError:
                pass
        try:
            self.path.rmdir()
        except OSError:
            pass  # another process's file is still there, or the folder is gone

    def others(self) -> List[Dict[str, Any]]:
        """
        @return: The last snapshot of every other process that wrote one.
        """
        found = []
        for name in sorted(self.path.glob("*.json")):
            if name == self.mine:
                continue
            try:
                found.append(json.loads(name.read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                log.warn("Could not read the counts in {file}: {error}", file=str(name),
                         error=e)
        return found


class SharedStats(ServerStats):
    """
    The summary of C{op: stats} and the counts of C{/metrics} over every
    process of a server, whichever process is asked.

    C{op: stats} also says which process answered (C{proceso}: its pid) and
    what each one counted (C{procesos}).
    """

    def __init__(self, factory: TaskFactory, folder: SnapshotFolder, clock: Any,
                 probe: Optional[BrokerProbe] = None) -> None:
        super().__init__(factory, probe)
        self.folder = folder
        self.clock = clock
        self.pid = os.getpid()
        self._writer = LoopingCall(self.write)
        self._writer.clock = clock

    def start(self) -> None:
        """
        Write this process's counts now and every L{INTERVAL} seconds.
        """
        self._writer.start(INTERVAL, now=True)

    def stop(self) -> None:
        """
        Write this process's counts a last time and stop writing them.
        """
        if self._writer.running:
            self._writer.stop()
        self.write()

    def write(self) -> None:
        """
        Write this process's counts now.
        """
        try:
            self.folder.write(self._mine())
        except OSError as e:
            log.warn("Could not write this process's counts: {error}", error=e)

    def _mine(self) -> Dict[str, Any]:
        return counts_as_json(super().counts(), self.pid, self.clock.seconds())

    def _all(self) -> List[Dict[str, Any]]:
        """
        @return: This process's counts now, which it writes first, and the
            other processes' last ones.  Writing first keeps totals from
            going down between two answers of two processes: each file only
            ever grows, and each answer reads every process's newest.
        """
        mine = self._mine()
        try:
            self.folder.write(mine)
        except OSError as e:
            log.warn("Could not write this process's counts: {error}", error=e)
        return [mine] + self.folder.others()

    def counts(self) -> Counts:
        """
        @return: The counts of every process, added up.
        """
        return add_up(self._all())

    def snapshot(self) -> Dict[str, Any]:
        """
        @return: The summary of every process, which process answered and
            each one's share.
        """
        everyone = self._all()
        summary = summary_of(add_up(everyone), self.clock.seconds())
        if self.probe is not None:
            summary["broker"] = self.probe.describe()
        summary["proceso"] = self.pid
        summary["procesos"] = [
            {"pid": s["pid"], "total": _total(s["tally"]), "en_curso": s["en_curso"],
             "conexiones": s["conexiones"]}
            for s in sorted(everyone, key=lambda s: s["pid"])
        ]
        return summary


def _total(tally: Dict[str, Any]) -> int:
    return sum(tally["ok"].values()) + sum(n for _, _, n in tally["other"])
