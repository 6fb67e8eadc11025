"""
L{pfo3.signals.SecondSignal}: what a second SIGTERM or SIGINT does while a
server stops.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable, List

from pfo3.signals import SecondSignal


def test_signals_hurry_between_take_and_give_back() -> None:
    scheduled: List[Callable[[], None]] = []
    hurried: List[bool] = []
    second = SecondSignal(lambda: hurried.append(True), scheduled.append)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    second.take()
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            os.kill(os.getpid(), signum)
        # The handler only schedules: hurry runs where the reactor calls it.
        assert hurried == []
        assert len(scheduled) == 2
        for f in scheduled:
            f()
        assert hurried == [True, True]
    finally:
        second.give_back()
    assert {s: signal.getsignal(s) for s in before} == before


def test_take_outside_the_main_thread_changes_nothing() -> None:
    second = SecondSignal(lambda: None, lambda f: None)
    before = signal.getsignal(signal.SIGTERM)
    errors: List[Any] = []

    def take() -> None:
        try:
            second.take()
        except Exception as e:  # signal.signal raises ValueError off the main thread
            errors.append(e)

    t = threading.Thread(target=take)
    t.start()
    t.join()
    assert errors == []
    assert signal.getsignal(signal.SIGTERM) is before
    second.give_back()
    assert signal.getsignal(signal.SIGTERM) is before
