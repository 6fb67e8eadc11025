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
    List,
    Optional,
    Tuple,
    TypeVar,
    Union,
)

from twisted.internet import endpoints, task
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred
from twisted.python import usage
from twisted.python.failure import Failure

from pfo3.batch import DEFAULT_WINDOW, PROGRESS_AFTER, Batch, read_in_thread
from pfo3.client import ClientError, TaskClient, connect, explain, host_to_verify
from pfo3.errors import Pfo3Error, error_reply
from pfo3.tasks import plain_decimal
from pfo3.upload import UPLOAD_PARAMETERS, check_upload_options, run_upload

PROGRAM = "pfo3-client"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9000
#: Task types whose C{contenido} is a number of seconds rather than text.
SECONDS_TYPES = ("sleep",)

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
        ["token", None, None,
         "A JWT to authenticate with, for servers that require one (default: "
         "the PFO3_TOKEN environment variable). Prefer the variable: a token "
         "on the command line shows in the process list."],
    ]

    optParameters += UPLOAD_PARAMETERS

    optFlags: List[List[Optional[str]]] = [
        ["batch", "b",
         "Read tasks from stdin, one per line, and print one JSON reply per line."],
        ["stats", None,
         "Print the server's summary (op: stats: tasks by type and state, in flight, "
         "connections, errors by code, latency, broker) as JSON and exit."],
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
        if self["stats"]:
            for name in ("tipo", "contenido", "tarea-id", "batch"):
                if self[name]:
                    raise usage.UsageError(f"--{name} cannot be used with --stats")
        if self["batch"]:
            for name in ("tipo", "contenido", "tarea-id"):
                if self[name] is not None:
                    raise usage.UsageError(f"--{name} cannot be used with --batch")
        if self["tarea-id"] == "":
            raise usage.UsageError("--tarea-id cannot be empty")
        check_upload_options(self)
        if self["contenido"] is not None and not self["contenido"].strip():
            # The seed's client refuses an empty input too.
            raise usage.UsageError("--contenido cannot be empty")
        if self["endpoint"] is not None:
            from twisted.internet import reactor

            try:
                endpoints.clientFromString(reactor, self["endpoint"])
            except Exception as e:
                reason = str(e) or type(e).__name__
                raise usage.UsageError(f"invalid --endpoint {self['endpoint']!r}: {reason}")


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
    """
    @return: A number of seconds as the server reads them from a text
        (L{pfo3.tasks.plain_decimal}), an integer when whole; L{None} if the
        text is not one, or is negative.
    """
    value = plain_decimal(answer)
    if value is None or value < 0:
        return None
    return int(value) if value.is_integer() else value


def as_the_seed_sends(
    tipos: List[Dict[str, Any]], tipo: Union[str, int], contenido: Any,
) -> Tuple[Union[str, int], Any]:
    """
    The request as the seed's client sends it: the task type by its
    canonical name (the server's C{tipos} give it, plugins included), and a
    sleep's seconds as a number.  What matches no type goes as typed, for
    the server to answer with its error.
    """
    chosen = _match(tipos, str(tipo))
    if chosen is None:
        return tipo, contenido
    name = str(chosen["tipo"])
    if name in SECONDS_TYPES and isinstance(contenido, str):
        seconds = _seconds(contenido)
        if seconds is not None:
            contenido = seconds
    return name, contenido


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
    host = host_to_verify(options["endpoint"]) if options["endpoint"] else None
    token = options["token"] or os.environ.get("PFO3_TOKEN") or None
    return lambda: connect(reactor, endpoint, timeout=timeout, tls_host=host, token=token)


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
        if options["stats"]:
            return await _run_stats(options, console, client)
        if options["batch"]:
            return await _run_batch(reactor, options, console, client)
        if options["contenido-archivo"] is not None:
            return await run_upload(options, console, client, _where(options, client))
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
        tipos = await client.tipos(timeout)
        if tipo is None or contenido is None:
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
        tipo, contenido = as_the_seed_sends(tipos, tipo, contenido)
        respuesta = await client.submit(tipo, contenido, tarea_id, timeout)
        problem = None
    except EndOfInput as e:
        console.error(str(e))
        return 1
    except Pfo3Error as e:
        if e.tarea_id != tarea_id:
            console.error(explain(e))
            return 1
        respuesta = error_reply(e)
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


async def _run_stats(options: Options, console: Console, client: TaskClient) -> int:
    try:
        summary = await client.stats(options["timeout"])
    except (Pfo3Error, ClientError, TimeoutError) as e:
        console.error(explain(e))
        return 1
    try:
        console.stdout.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        console.stdout.flush()
    except OSError:
        _silence(console.stdout)
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

    _quiet_twisted_logs()
    task.react(start)


def _quiet_twisted_logs() -> None:
    """
    Send Twisted's log to stderr, errors only, and without the event of its
    TLS host-name check: the client reports that failure itself, in one
    line (see L{pfo3.client.TaskClient.handshakeCompleted}).
    """
    from twisted.logger import (
        FilteringLogObserver,
        ILogFilterPredicate,
        LogLevel,
        LogLevelFilterPredicate,
        PredicateResult,
        globalLogBeginner,
        textFileLogObserver,
    )
    from zope.interface import provider

    @provider(ILogFilterPredicate)
    def not_the_tls_check(event: Any) -> PredicateResult:
        if event.get("log_namespace", "").startswith("twisted.internet._sslverify"):
            return PredicateResult.no
        return PredicateResult.maybe

    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(LogLevel.critical), not_the_tls_check],
    )], redirectStandardIO=False)


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


if __name__ == "__main__":  # pragma: no cover
    main()
