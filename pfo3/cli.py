"""
The C{pfo3-client} command (also C{python -m pfo3.client}).

Three ways to run it, all over one L{pfo3.client.TaskClient} connection:

  - one task from the flags (C{--tipo}, C{--contenido}): prints the seed
    client's document C{{"servidor", "puerto", "solicitud", "respuesta"}};
  - the same, asking for what the flags left out through a menu built from
    the server's C{{"op": "tipos"}} answer (prompts go to stderr, so stdout
    holds only the JSON, whether stdin is a terminal or a pipe);
  - C{--batch}: tasks read from stdin, one per line, pipelined with a bounded
    window; one JSON reply per line on stdout, in the order they finish.

Expected failures print C{[ERROR] <reason>} on stderr and exit with status 1;
usage errors exit with status 2.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import uuid
from typing import (
    IO,
    Any,
    Awaitable,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Tuple,
    TypeVar,
    Union,
)

from twisted.internet import endpoints, error, task
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python import usage
from twisted.python.failure import Failure

from pfo3.client import ClientError, ConnectionClosed, Reply, TaskClient, connect
from pfo3.errors import Pfo3Error
from pfo3.tasks import MISSING

PROGRAM = "pfo3-client"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9000
DEFAULT_WINDOW = 1000

#: Task types whose C{contenido} is a number of seconds rather than text.
SECONDS_TYPES = ("sleep",)

#: Batch runs with at least this many tasks show progress on a terminal.
PROGRESS_AFTER = 1000

_T = TypeVar("_T")


class Options(usage.Options):
    """
    Command-line options of C{pfo3-client}.
    """

    synopsis = (
        f"Usage: {PROGRAM} [--host HOST] [--port PORT | --endpoint ENDPOINT]\n"
        f"       {' ' * len(PROGRAM)} [--tipo TIPO --contenido CONTENIDO] [--batch]"
    )
    longdesc = (
        "Send tasks to a pfo3 server. With --tipo and --contenido it sends one task and "
        "prints the request and the reply as JSON; without them it asks through a menu "
        "(from stdin, which may be a pipe). With --batch it reads one task per line from "
        "stdin (a JSON object such as {\"tipo\": \"reverse\", \"contenido\": \"hola\"}, or "
        "'TIPO CONTENIDO'), sends them over one connection and prints one JSON reply per "
        "line as they arrive. Failures print [ERROR] on stderr and exit with status 1."
    )

    optParameters: List[List[Any]] = [
        ["host", None, DEFAULT_HOST, "Server host name or address (also --servidor)."],
        ["port", None, DEFAULT_PORT, "Server TCP port (also --puerto).", int],
        ["endpoint", "e", None,
         "Any Twisted client endpoint instead of --host/--port, e.g. "
         "tcp:host=example.org:port=9000, "
         "tls:example.org:9443:trustRoots=/etc/pfo3/ca, unix:path=/tmp/pfo3.sock."],
        ["tipo", "t", None,
         "Task type: name, alias or code (uppercase, reverse, word_count, sleep or 1-4)."],
        ["contenido", "c", None, "The task's input: text, or seconds for sleep."],
        ["tarea-id", None, None, "The task's identifier (default: a new UUID)."],
        ["timeout", None, None,
         "Seconds to wait for the connection and for each reply (default: no limit).",
         float],
        ["window", None, DEFAULT_WINDOW,
         "With --batch, most tasks in flight at once.", int],
    ]

    optFlags: List[List[Optional[str]]] = [
        ["batch", "b",
         "Read tasks from stdin, one per line, and print one JSON reply per line."],
    ]

    def opt_version(self) -> None:
        """
        Print the version of pfo3 and exit.
        """
        from pfo3 import __version__

        print(f"{PROGRAM} (pfo3) {__version__}")
        raise SystemExit(0)

    def opt_servidor(self, host: str) -> None:
        """
        Same as --host.
        """
        self["host"] = host

    def opt_puerto(self, port: str) -> None:
        """
        Same as --port.
        """
        try:
            self["port"] = int(port)
        except ValueError:
            raise usage.UsageError(f"--puerto must be a number, not {port!r}")

    def postOptions(self) -> None:
        if not 0 < self["port"] < 65536:
            raise usage.UsageError(f"--port must be between 1 and 65535, not {self['port']}")
        timeout = self["timeout"]
        if timeout is not None and (not timeout > 0 or math.isinf(timeout)):
            raise usage.UsageError("--timeout must be a positive number of seconds")
        if self["window"] < 1:
            raise usage.UsageError("--window must be at least 1")
        if self["batch"]:
            for name in ("tipo", "contenido", "tarea-id"):
                if self[name] is not None:
                    raise usage.UsageError(f"--{name} cannot be used with --batch")
        if self["tarea-id"] == "":
            raise usage.UsageError("--tarea-id cannot be empty")
        if self["endpoint"] is not None:
            from twisted.internet import reactor

            try:
                endpoints.clientFromString(reactor, self["endpoint"])
            except Exception as e:
                reason = str(e) or type(e).__name__
                raise usage.UsageError(f"invalid --endpoint {self['endpoint']!r}: {reason}")


# -- explaining failures ----------------------------------------------------------


def explain(failure: BaseException) -> str:
    """
    @return: A one-line reason for an expected failure, for C{[ERROR]}.
    """
    if isinstance(failure, Pfo3Error):
        return f"{failure.mensaje} (codigo: {failure.codigo})"
    if isinstance(failure, ClientError):
        return failure.mensaje
    if isinstance(failure, error.ConnectionRefusedError):
        return "conexión rechazada (¿está el servidor en marcha?)"
    if isinstance(failure, error.DNSLookupError):
        return "no se pudo resolver el nombre del servidor"
    if isinstance(failure, (TimeoutError, error.TimeoutError)):
        return str(failure) or "tiempo de espera agotado"
    if isinstance(failure, error.ConnectingCancelledError):
        return "tiempo de espera agotado al conectar"
    text = str(failure).strip()
    return text or type(failure).__name__


def _error_reply(e: Pfo3Error) -> Reply:
    return {"estado": "error", "mensaje": e.mensaje, "codigo": e.codigo, "tarea_id": e.tarea_id}


# -- the interactive menu ---------------------------------------------------------


class EndOfInput(Exception):
    """
    Standard input ended before the menu had its answers.
    """


def _match(tipos: List[Dict[str, Any]], answer: str) -> Optional[Dict[str, Any]]:
    key = answer.strip().lower()
    for t in tipos:
        names = [str(t.get("codigo")), str(t.get("tipo", "")).lower()]
        names.extend(str(a).lower() for a in t.get("alias", ()))
        if key in names:
            return t
    return None


def _seconds(answer: str) -> Optional[Union[int, float]]:
    try:
        value = float(answer)
    except ValueError:
        return None
    if math.isnan(value) or math.isinf(value) or value < 0:
        return None
    return int(value) if value.is_integer() else value


def ask_task(
    tipos: List[Dict[str, Any]],
    read_line: Callable[[], Optional[str]],
    write: Callable[[str], None],
    tipo: Optional[str] = None,
    contenido: Optional[str] = None,
) -> Tuple[Union[str, int], Any]:
    """
    Ask for the task type and input the flags left out.

    @param tipos: The server's task types (C{{"op": "tipos"}}).
    @param read_line: Returns the next input line without its newline, or
        L{None} at the end of input.
    @param write: Shows text to the user.
    @param tipo: The type given on the command line, if any.
    @param contenido: The input given on the command line, if any.
    @raise EndOfInput: if input ends first.
    @return: C{(tipo, contenido)} to send.
    """

    def ask(prompt: str) -> str:
        write(prompt)
        line = read_line()
        if line is None:
            write("\n")
            raise EndOfInput("La entrada terminó antes de completar la tarea.")
        return line

    chosen: Optional[Dict[str, Any]]
    if tipo is None:
        ordered = sorted(tipos, key=lambda t: t.get("codigo", 0))
        lines = ["Tipos de tarea:"]
        for t in ordered:
            lines.append(f"  {t.get('codigo')}) {t.get('tipo')}: {t.get('descripcion', '')}")
        write("\n".join(lines) + "\n")
        codes = ", ".join(str(t.get("codigo")) for t in ordered)
        while True:
            chosen = _match(ordered, ask(f"Elija una opción ({codes}): "))
            if chosen is not None:
                break
            write(f"Opción inválida. Escriba uno de: {codes}.\n")
        tipo = str(chosen["tipo"])
    else:
        chosen = _match(tipos, tipo)

    if contenido is not None:
        return tipo, contenido
    if chosen is not None and chosen.get("tipo") in SECONDS_TYPES:
        while True:
            seconds = _seconds(ask("Segundos a esperar: "))
            if seconds is not None:
                return tipo, seconds
            write("Escriba un número de segundos (0 o más), por ejemplo 2 o 0.5.\n")
    while True:
        text = ask("Texto: ")
        if text.strip():
            return tipo, text
        write("El texto no puede estar vacío.\n")


def line_reader(stream: IO[str]) -> Callable[[], Optional[str]]:
    """
    @return: A C{read_line} for L{ask_task} reading C{stream}.
    """

    def read_line() -> Optional[str]:
        line = stream.readline()
        if not line:
            return None
        return line.rstrip("\r\n")

    return read_line


# -- batch mode -------------------------------------------------------------------


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
            self._print(_error_reply(e))
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


# -- running ----------------------------------------------------------------------


class Console:
    """
    Where the command reads and writes, and how it reads without blocking
    the reactor.

    @ivar in_thread: C{in_thread(f, *args)} runs a blocking call (the menu)
        and returns a Deferred of its result.
    @ivar feed: C{feed(reactor, stream, batch)} hands the lines of C{stream}
        to C{batch} (L{read_in_thread} by default).
    """

    def __init__(
        self,
        stdin: IO[Any],
        stdout: IO[str],
        stderr: IO[str],
        in_thread: Callable[..., Deferred[Any]],
        feed: Callable[[Any, IO[Any], Batch], Any] = read_in_thread,
    ) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.in_thread = in_thread
        self.feed = feed
        self.interrupted = False

    def error(self, text: str) -> None:
        if self.interrupted:
            return
        self.stderr.write(f"[ERROR] {text}\n")
        self.stderr.flush()

    def prompt(self, text: str) -> None:
        self.stderr.write(text)
        self.stderr.flush()


def _connector(reactor: Any, options: Options) -> Callable[[], Deferred[TaskClient]]:
    timeout = options["timeout"]
    if options["endpoint"] is not None:
        endpoint: Any = endpoints.clientFromString(reactor, options["endpoint"])
    else:
        endpoint = endpoints.HostnameEndpoint(
            reactor, options["host"], options["port"],
            timeout=int(math.ceil(timeout)) if timeout is not None else 30,
        )
    return lambda: connect(reactor, endpoint, timeout=timeout)


def _where(options: Options, client: Optional[TaskClient]) -> Tuple[Any, Any]:
    if options["endpoint"] is None:
        return options["host"], options["port"]
    if client is not None and client.transport is not None:
        peer = client.transport.getPeer()
        host = getattr(peer, "host", None)
        if host is not None:
            return host, getattr(peer, "port", None)
        name = getattr(peer, "name", None)
        if name is not None:
            return name.decode() if isinstance(name, bytes) else name, None
    return options["endpoint"], None


async def run(
    reactor: Any,
    options: Options,
    console: Console,
    connector: Optional[Callable[[], Deferred[TaskClient]]] = None,
) -> int:
    """
    Run the command with parsed options.

    @param connector: Returns a Deferred connected client; by default one
        built from the options.
    @return: The exit status.
    """
    if connector is None:
        connector = _connector(reactor, options)
    where = options["endpoint"] or f"{options['host']}:{options['port']}"
    clients: List[TaskClient] = []

    async def open_connection() -> Optional[TaskClient]:
        try:
            client = await connector()
        except Exception as e:
            console.error(f"No se pudo conectar con {where}: {explain(e)}")
            return None
        clients.append(client)
        return client

    client = await open_connection()
    if client is None:
        return 1
    try:
        if options["batch"]:
            return await _run_batch(reactor, options, console, client)
        return await _run_one(options, console, client, open_connection)
    finally:
        for c in clients:
            await c.disconnect()


async def _run_one(
    options: Options,
    console: Console,
    client: TaskClient,
    reconnect: Callable[[], Awaitable[Optional[TaskClient]]],
) -> int:
    timeout = options["timeout"]
    tipo: Union[str, int, None] = options["tipo"]
    contenido: Any = options["contenido"]
    tarea_id = options["tarea-id"] or str(uuid.uuid4())
    try:
        if tipo is None or contenido is None:
            tipos = await client.tipos(timeout)
            tipo, contenido = await console.in_thread(
                ask_task, tipos, line_reader(console.stdin), console.prompt,
                tipo, contenido,
            )
            if client.closed:
                # The server closes connections left idle while the user thinks.
                reopened = await reconnect()
                if reopened is None:
                    return 1
                client = reopened
        assert tipo is not None
        respuesta = await client.submit(tipo, contenido, tarea_id, timeout)
        problem = None
    except EndOfInput as e:
        console.error(str(e))
        return 1
    except Pfo3Error as e:
        if e.tarea_id != tarea_id:
            console.error(explain(e))
            return 1
        respuesta = _error_reply(e)
        problem = explain(e)
    except (ClientError, TimeoutError) as e:
        console.error(explain(e))
        return 1
    servidor, puerto = _where(options, client)
    document = {
        "servidor": servidor,
        "puerto": puerto,
        "solicitud": {"tarea_id": tarea_id, "tipo": tipo, "contenido": contenido},
        "respuesta": respuesta,
    }
    try:
        console.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        console.stdout.flush()
    except OSError:
        _silence(console.stdout)
        return 1
    if problem is not None:
        console.error(problem)
        return 1
    return 0


async def _run_batch(reactor: Any, options: Options, console: Console, client: TaskClient) -> int:
    batch = Batch(client, reactor, console, options["window"], options["timeout"])
    progress = None
    if _isatty(console.stderr):
        def show() -> None:
            if batch.sent >= PROGRESS_AFTER:
                batch.progress_shown = True
                console.stderr.write("\r\x1b[K" + batch.progress())
                console.stderr.flush()

        progress = task.LoopingCall(show)
        progress.clock = reactor
        progress.start(0.5, now=False)
    console.feed(reactor, getattr(console.stdin, "buffer", console.stdin), batch)
    try:
        status = await batch.done
    finally:
        if progress is not None:
            progress.stop()
            if batch.progress_shown:
                console.stderr.write("\r\x1b[K")
                console.stderr.flush()
    if batch.output_closed:
        _silence(console.stdout)
    elif batch.failed and not batch.stopped:
        console.error(f"{batch.failed} de {batch.sent + batch.bad} tareas fallaron.")
    return status


def _silence(stream: IO[str]) -> None:
    """
    Point a stream whose reader went away at /dev/null, so the flush at
    exit does not complain.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False


def main(argv: Optional[List[str]] = None) -> None:
    """
    Run C{pfo3-client}; exits with 0 (success), 1 (failure) or 2 (usage).
    """
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"{PROGRAM}: {e}\n{PROGRAM}: see --help\n")
        raise SystemExit(2)
    except BrokenPipeError:  # --help | head
        _silence(sys.stdout)
        raise SystemExit(1)

    async def react_main(reactor: Any, console: Console) -> None:
        status = await run(reactor, options, console)
        if status:
            raise SystemExit(status)

    def start(reactor: Any) -> Deferred[None]:
        console = Console(sys.stdin, sys.stdout, sys.stderr, in_daemon_thread(reactor))
        outcome: Deferred[None] = Deferred()

        def finished(result: Any) -> None:
            if not outcome.called:
                outcome.callback(result)

        def interrupted() -> None:
            # Ctrl-C or SIGTERM: the command did not finish.
            if not outcome.called:
                console.error("Interrumpido.")
                console.interrupted = True
                outcome.errback(SystemExit(130))

        reactor.addSystemEventTrigger("before", "shutdown", interrupted)
        ensureDeferred(react_main(reactor, console)).addBoth(finished)
        return outcome

    task.react(start)


def in_daemon_thread(reactor: Any) -> Callable[..., Deferred[Any]]:
    """
    @return: A C{Console.in_thread} that runs each call on a new daemon
        thread, so a prompt waiting for input never holds up the exit.
    """

    def call(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()

        def run() -> None:
            try:
                result = f(*args)
            except BaseException:
                reactor.callFromThread(d.errback, Failure())
            else:
                reactor.callFromThread(d.callback, result)

        threading.Thread(target=run, name="pfo3-client-prompt", daemon=True).start()
        return d

    return call
