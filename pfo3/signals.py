"""
A second SIGTERM or SIGINT while a server stops: what the single server
(L{pfo3.service}) and the parent of C{--processes} (L{pfo3.processes}) both
do with it.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Dict


class SecondSignal:
    """
    Between L{take} and L{give_back}, SIGTERM and SIGINT call C{hurry} in the
    reactor's thread instead of whatever handled them before (twistd's
    handlers, which would only ask the stopping reactor to stop again).

    @ivar hurry: What a signal does while the server stops.
    @ivar call_from_thread: The reactor's C{callFromThread}: a signal handler
        runs between any two bytecodes, so C{hurry} is scheduled rather than
        run there.
    """

    def __init__(
        self, hurry: Callable[[], None], call_from_thread: Callable[..., Any]
    ) -> None:
        self.hurry = hurry
        self.call_from_thread = call_from_thread
        self._saved: Dict[int, Any] = {}

    def take(self) -> None:
        """
        Handle SIGTERM and SIGINT from now on (only the main thread may set
        signal handlers: elsewhere, as in tests driving a service from a
        thread, nothing changes).
        """
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._saved[signum] = signal.signal(signum, self._on_signal)

    def give_back(self) -> None:
        """
        Restore the handlers L{take} replaced.
        """
        saved, self._saved = self._saved, {}
        for signum, handler in saved.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.call_from_thread(self.hurry)
