"""
Batch mode of C{pfo3-client}: tasks read from a stream, one per line,
pipelined over one connection with a bounded window, one JSON reply per line
printed as each finishes.
"""

from __future__ import annotations

import json
import threading
from typing import IO, TYPE_CHECKING, Any, Iterator, List, Optional, Tuple, Union

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from pfo3.client import ConnectionClosed, Reply, TaskClient, explain
from pfo3.errors import Pfo3Error, error_reply
from pfo3.tasks import MISSING

if TYPE_CHECKING:
    from pfo3.cli import Console

DEFAULT_WINDOW = 1000

#: Batch runs with at least this many tasks show progress on a terminal.
PROGRESS_AFTER = 1000


def parse_task_line(text: str) -> Optional[Tuple[Any, Any, Optional[str]]]:
    """
    Read one batch line: a JSON object with C{tipo}, C{contenido} and
    optionally C{tarea_id}, or C{TIPO CONTENIDO} (the rest of the line is the
    content, as text).

    @return: C{(tipo, contenido, tarea_id)}, or L{None} for a blank or
        C{#} comment line.
    @raise ValueError: if the line cannot be read.
    """
    text = text.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"JSON inválido: {e.msg} (columna {e.colno})")
        if not isinstance(obj, dict):
            raise ValueError("no es un objeto JSON")
        if "tipo" not in obj:
            raise ValueError("falta 'tipo'")
        tarea_id = obj.get("tarea_id")
        if tarea_id is not None and not (isinstance(tarea_id, str) and tarea_id):
            raise ValueError("'tarea_id' debe ser un texto no vacío")
        return obj["tipo"], obj.get("contenido", MISSING), tarea_id
    parts = text.split(None, 1)
    return parts[0], parts[1] if len(parts) > 1 else "", None


class Batch:
    """
    Runs tasks over one connection as their lines arrive, keeping at most
    C{window} in flight, and prints each reply as it comes.

    L{line} and L{eof} are called in the reactor thread (by
    L{read_in_thread}, or directly by tests).  The reading side takes one of
    C{slots} before handing over each line; every finished line gives it back.

    @ivar done: Fires with the exit status once input ended (or the
        connection was lost) and no task is in flight.
    """

    def __init__(
        self,
        client: TaskClient,
        clock: IReactorTime,
        console: Console,
        window: int = DEFAULT_WINDOW,
        timeout: Optional[float] = None,
    ) -> None:
        self.client = client
        self.clock = clock
        self.console = console
        self.out = console.stdout
        self.timeout = timeout
        self.slots = threading.Semaphore(window)
        self.done: Deferred[int] = Deferred()
        self.read = 0
        self.bad = 0
        self.sent = 0
        self.answered = 0
        self.failed = 0
        self.inflight = 0
        self.stopped = False
        self.output_closed = False
        self.progress_shown = False
        self._ended = False
        self._flush_call: Any = None

    def line(self, number: int, text: Union[str, bytes]) -> None:
        """
        Handle input line C{number}.
        """
        self.read += 1
        if self.stopped:
            self.slots.release()
            return
        try:
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            parsed = parse_task_line(text)
        except ValueError as e:
            self.complain(f"línea {number}: {e}")
            self.bad += 1
            self.failed += 1
            self.slots.release()
            return
        if parsed is None:
            self.slots.release()
            return
        tipo, contenido, tarea_id = parsed
        self.inflight += 1
        self.sent += 1
        d = self.client.submit(tipo, contenido, tarea_id, self.timeout)
        d.addCallbacks(self._replied, self._failed, errbackArgs=(number,))
        d.addBoth(self._finished)

    def lines(self, first: int, texts: List[Union[str, bytes]]) -> None:
        """
        Handle consecutive input lines, numbered from C{first}.
        """
        for number, text in enumerate(texts, first):
            self.line(number, text)

    def eof(self) -> None:
        """
        Input ended.
        """
        self._ended = True
        self._check_done()

    def _replied(self, reply: Reply) -> None:
        self.answered += 1
        self._print(reply)

    def _failed(self, failure: Any, number: int) -> None:
        self.failed += 1
        e = failure.value
        if isinstance(e, Pfo3Error):
            self.answered += 1
            self._print(error_reply(e))
        elif isinstance(e, ConnectionClosed):
            if not self.stopped and not self.output_closed:
                self.complain(
                    f"Conexión perdida: {e.reason or e.mensaje}; "
                    f"{self.inflight} tareas quedaron sin respuesta."
                )
            self.stopped = True
        else:
            self.complain(f"línea {number}: {explain(e)}")

    def _finished(self, result: Any) -> None:
        self.inflight -= 1
        self.slots.release()
        self._check_done()

    def _check_done(self) -> None:
        if (self._ended or self.stopped) and self.inflight == 0 and not self.done.called:
            self._flush()
            self.done.callback(1 if self.failed or self.stopped else 0)

    def _print(self, reply: Reply) -> None:
        if self.output_closed:
            return
        try:
            self.out.write(json.dumps(reply, ensure_ascii=False) + "\n")
        except OSError:
            self._output_gone()
            return
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self.output_closed:
            return
        try:
            self.out.flush()
        except OSError:
            self._output_gone()

    def _output_gone(self) -> None:
        """
        Whoever read our output went away (C{| head}): stop quietly.
        """
        self.output_closed = True
        self.stopped = True
        self.client.disconnect()

    def complain(self, text: str) -> None:
        if self.progress_shown and not self.console.interrupted:
            self.console.stderr.write("\r\x1b[K")
        self.console.error(text)

    def progress(self) -> str:
        """
        @return: One line saying how far the batch has come.
        """
        return (
            f"{self.sent} enviadas, {self.answered} respondidas, "
            f"{self.failed} fallidas, {self.inflight} en curso"
        )


def _chunks(stream: IO[Any]) -> Iterator[List[Any]]:
    """
    The lines of C{stream} in groups: whatever complete lines one read
    returned, so a fast input moves in bulk and a slow one line by line.
    """
    read1 = getattr(stream, "read1", None)
    if read1 is None:
        for line in stream:
            yield [line]
        return
    rest = b""
    while True:
        data = read1(65536)
        if not data:
            break
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        if lines:
            yield lines
    if rest:
        yield [rest]


def read_in_thread(reactor: Any, stream: IO[Any], batch: Batch) -> threading.Thread:
    """
    Feed C{batch} from C{stream} on a daemon thread, without blocking the
    reactor.  The thread takes a free slot of the window for each line
    before handing it over, so it stops reading while the window is full.
    """
    slots = batch.slots

    def run() -> None:
        number = 1
        try:
            for lines in _chunks(stream):
                i = 0
                while i < len(lines):
                    slots.acquire()
                    if batch.stopped:
                        return
                    j = i + 1
                    while j < len(lines) and slots.acquire(blocking=False):
                        j += 1
                    reactor.callFromThread(batch.lines, number, lines[i:j])
                    number += j - i
                    i = j
        except Exception as e:  # a read error ends the input
            reactor.callFromThread(batch.complain, f"no se pudo leer la entrada: {e}")
        finally:
            reactor.callFromThread(batch.eof)

    thread = threading.Thread(target=run, name="pfo3-client-stdin", daemon=True)
    thread.start()
    return thread


