"""
Tests for the C{pfo3-client} command (L{pfo3.cli}): options, the menu and
batch mode in memory against the real server protocol, then the command run
as a subprocess against a real C{twistd -n pfo3}.
"""

from __future__ import annotations

import io
import json
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import (
    Deferred,
    TimeoutError,
    ensureDeferred,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump

from pfo3 import batch as batch_mode
from pfo3 import cli
from pfo3.client import ConnectionClosed, TaskClient, explain
from pfo3.errors import UnknownType
from pfo3.testing import FakeReactor, connect_in_memory, make_server

from .conftest import TLSFiles, free_port, server_env, start_server

ROOT = Path(__file__).resolve().parent.parent

TIPOS: List[Dict[str, Any]] = [
    {"codigo": 1, "tipo": "uppercase", "alias": ["mayus", "upper"], "descripcion": "A"},
    {"codigo": 2, "tipo": "reverse", "alias": ["reversa"], "descripcion": "B"},
    {"codigo": 3, "tipo": "word_count", "alias": ["contar"], "descripcion": "C"},
    {"codigo": 4, "tipo": "sleep", "alias": ["espera"], "descripcion": "D"},
]


# -- options ------------------------------------------------------------------------


def parse(*args: str) -> cli.Options:
    options = cli.Options()
    options.parseOptions(list(args))
    return options


def test_options_defaults_match_the_seed_client() -> None:
    """
    Without flags the command targets 127.0.0.1:9000, asks for the task, and
    batch mode keeps a window of 1000.
    """
    o = parse()
    assert (o["host"], o["port"]) == ("127.0.0.1", 9000)
    assert o["tipo"] is None and o["contenido"] is None and o["tarea-id"] is None
    assert o["window"] == 1000
    assert not o["batch"]


def test_spanish_synonyms_set_host_and_port() -> None:
    """
    --servidor and --puerto are the same as --host and --port.
    """
    o = parse("--servidor", "example.org", "--puerto", "9100", "--tipo", "1", "--contenido", "x")
    assert (o["host"], o["port"], o["tipo"], o["contenido"]) == ("example.org", 9100, "1", "x")


@pytest.mark.parametrize("args", [
    ["--port", "abc"],
    ["--puerto", "abc"],
    ["--port", "0"],
    ["--timeout", "0"],
    ["--timeout", "-1"],
    ["--window", "0"],
    ["--batch", "--tipo", "1"],
    ["--tarea-id", ""],
    ["--endpoint", "nosuchkind:1"],
    ["--nosuchflag"],
])
def test_bad_options_are_usage_errors(args: List[str]) -> None:
    """
    Invalid or conflicting flags raise UsageError.
    """
    with pytest.raises(usage.UsageError):
        parse(*args)


def test_usage_error_exits_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    """
    main() reports a usage error on stderr, without a traceback, and exits
    with status 2.
    """
    with pytest.raises(SystemExit) as info:
        cli.main(["--port", "abc"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pfo3-client: ")
    assert "Traceback" not in err


@pytest.mark.parametrize("exc,expected", [
    (ConnectionRefusedError(), "conexión rechazada (¿está el servidor en marcha?)"),
    (DNSLookupError(), "no se pudo resolver el nombre del servidor"),
    (ConnectingCancelledError(None), "tiempo de espera agotado al conectar"),
    (TimeoutError("No se pudo conectar con el servidor en 3 s."),
     "No se pudo conectar con el servidor en 3 s."),
    (UnknownType("Tipo de tarea desconocido: 'x'.", "t"),
     "Tipo de tarea desconocido: 'x'. (codigo: tipo_desconocido)"),
    (ConnectionClosed("Sin respuesta a la tarea t: el servidor cerró la conexión.", "t"),
     "Sin respuesta a la tarea t: el servidor cerró la conexión."),
    (OSError("disco lleno"), "disco lleno"),
    (RuntimeError(), "RuntimeError"),
])
def test_explain_gives_one_clear_line(exc: BaseException, expected: str) -> None:
    """
    Expected failures become a short human reason for the [ERROR] line.
    """
    assert explain(exc) == expected


def test_endpoint_output_names_the_unix_socket() -> None:
    """
    With --endpoint the document's servidor/puerto come from the peer: a
    host and port for TCP, the socket path (and no port) for UNIX sockets.
    """
    options = parse("--endpoint", "unix:path=/tmp/pfo3.sock")
    client = TaskClient(FakeReactor())
    client.makeConnection(StringTransport(peerAddress=UNIXAddress("/tmp/pfo3.sock")))
    assert cli._where(options, client) == ("/tmp/pfo3.sock", None)
    assert cli._where(parse("--servidor", "h", "--puerto", "1"), client) == ("h", 1)


# -- the menu -----------------------------------------------------------------------


def menu(answers: str, tipo: Optional[str] = None,
         contenido: Optional[str] = None) -> Tuple[Any, Any, str]:
    """
    Run ask_task on canned input; return its answer and what it showed.
    """
    shown: List[str] = []
    tipo_, contenido_ = cli.ask_task(
        TIPOS, cli.line_reader(io.StringIO(answers)), shown.append, tipo, contenido
    )
    return tipo_, contenido_, "".join(shown)


def test_menu_lists_types_by_code_and_reprompts_on_invalid_choices() -> None:
    """
    The menu numbers the server's types 1-4 like the seed; an invalid choice
    is refused and asked again; the chosen type is sent by its name.
    """
    tipo, contenido, shown = menu("9\nfoo\n\n2\nhola\n")
    assert (tipo, contenido) == ("reverse", "hola")
    assert "1) uppercase" in shown and "4) sleep" in shown
    assert shown.index("1) uppercase") < shown.index("4) sleep")
    assert shown.count("Opción inválida") == 3


def test_menu_accepts_names_and_aliases() -> None:
    """
    A type may be chosen by name or alias as well as by number.
    """
    assert menu("MAYUS\nx\n")[:2] == ("uppercase", "x")
    assert menu("word_count\nuno dos\n")[:2] == ("word_count", "uno dos")


def test_sleep_insists_on_a_number_of_seconds() -> None:
    """
    For sleep the menu asks for seconds and repeats until it gets a
    non-negative finite number, sent as a number.
    """
    tipo, contenido, shown = menu("4\nabc\n-1\nnan\n\n2\n")
    assert (tipo, contenido) == ("sleep", 2)
    assert isinstance(contenido, int)
    assert shown.count("Escriba un número de segundos") == 4
    assert menu("espera\n0.5\n")[:2] == ("sleep", 0.5)


def test_empty_text_is_refused() -> None:
    """
    Text tasks refuse empty or blank text and ask again; other text is sent
    as typed.
    """
    tipo, contenido, shown = menu("1\n\n   \n hola \n")
    assert (tipo, contenido) == ("uppercase", " hola ")
    assert shown.count("El texto no puede estar vacío") == 2


def test_menu_only_asks_what_the_flags_left_out() -> None:
    """
    With --tipo given the menu is skipped and only the content is asked
    (seconds for sleep, whatever name it was given by).
    """
    tipo, contenido, shown = menu("x\n3\n", tipo="4")
    assert (tipo, contenido) == ("4", 3)
    assert "Tipos de tarea" not in shown
    assert menu("", tipo="1", contenido="ya")[:2] == ("1", "ya")


def test_end_of_input_stops_the_menu() -> None:
    """
    If input ends before the answers, ask_task raises EndOfInput.
    """
    with pytest.raises(cli.EndOfInput):
        menu("1\n")
    with pytest.raises(cli.EndOfInput):
        menu("")


# -- running in memory ---------------------------------------------------------------


class FakeTerminal(io.StringIO):
    """
    A stderr that says it is a terminal.
    """

    def isatty(self) -> bool:
        return True


def feed_at_once(reactor: Any, stream: Any, batch: batch_mode.Batch) -> None:
    """
    Hand every line of C{stream} to C{batch} at once, in this thread.
    """
    for number, text in enumerate(stream, 1):
        batch.line(number, text)
    batch.eof()


class Setup:
    """
    A client connected in memory to a real server protocol, and the console
    the command talks to.
    """

    def __init__(self, stdin: str = "", tty: bool = False, **server_options: Any) -> None:
        self.reactor = FakeReactor()
        self.factory = make_server(reactor=self.reactor, **server_options)
        self.client = TaskClient(self.reactor)
        self.server, self.pump = connect_in_memory(self.factory, self.client)
        self.stdout = io.StringIO()
        self.stderr = FakeTerminal() if tty else io.StringIO()
        self.console = cli.Console(
            io.StringIO(stdin), self.stdout, self.stderr,
            lambda f, *args: maybeDeferred(f, *args), feed_at_once,
        )

    def connector(self) -> Deferred[TaskClient]:
        return succeed(self.client)

    def drive(self, d: Deferred[Any], pump: Optional[IOPump] = None) -> Any:
        """
        Move bytes and time until C{d} fires; return its result.
        """
        box: List[Any] = []
        d.addBoth(box.append)
        for _ in range(1000):
            if box:
                break
            self.pump.flush()
            self.reactor.advance(0.1)
        assert box, "the command did not finish"
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    def run(self, *args: str) -> int:
        options = parse(*args)
        status: int = self.drive(ensureDeferred(
            cli.run(self.reactor, options, self.console, self.connector)
        ))
        return status


def test_one_task_prints_the_seed_document() -> None:
    """
    With --tipo and --contenido the command prints, indented and with
    non-ASCII text as is, the seed's {servidor, puerto, solicitud, respuesta}
    document, and exits with 0.
    """
    s = Setup()
    status = s.run("--tipo", "uppercase", "--contenido", "canción", "--tarea-id", "c1")
    assert status == 0
    out = s.stdout.getvalue()
    assert "canción" in out and "CANCIÓN" in out
    assert out.startswith('{\n  "servidor": "127.0.0.1",\n  "puerto": 9000,')
    doc = json.loads(out)
    assert doc["solicitud"] == {"tarea_id": "c1", "tipo": "uppercase", "contenido": "canción"}
    assert doc["respuesta"]["resultado"] == "CANCIÓN"
    assert doc["respuesta"]["tarea_id"] == "c1"
    assert s.stderr.getvalue() == ""


def test_default_tarea_id_is_a_new_uuid() -> None:
    """
    Without --tarea-id the request carries a fresh UUID, echoed in the reply.
    """
    s = Setup()
    assert s.run("--tipo", "3", "--contenido", "a b") == 0
    doc = json.loads(s.stdout.getvalue())
    assert len(doc["solicitud"]["tarea_id"]) == 36
    assert doc["respuesta"]["tarea_id"] == doc["solicitud"]["tarea_id"]


def test_interactive_menu_through_stdin() -> None:
    """
    Without --tipo the command fetches the server's types, asks on stderr,
    reads the answers from stdin and prints only the JSON document on stdout.
    """
    s = Setup(stdin="7\n4\nun rato\n1.5\n")
    assert s.run() == 0
    doc = json.loads(s.stdout.getvalue())
    assert doc["solicitud"]["tipo"] == "sleep"
    assert doc["solicitud"]["contenido"] == 1.5
    assert doc["respuesta"]["resultado"] == "Esperé 1.5 segundos"
    prompts = s.stderr.getvalue()
    assert "4) sleep" in prompts and "Opción inválida" in prompts


def test_interactive_reconnects_if_the_server_closed_the_idle_connection() -> None:
    """
    If the server closes the connection while the user is at the menu (it
    closes idle connections), the command connects again to send the task.
    """
    s = Setup(stdin="1\nhola\n")
    first = s.client
    opened: List[TaskClient] = []

    def connector() -> Deferred[TaskClient]:
        if not opened:
            opened.append(first)
            return succeed(first)
        again = TaskClient(s.reactor)
        _, s.pump = connect_in_memory(s.factory, again)
        opened.append(again)
        return succeed(again)

    def answer_then_server_closes(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        answer = f(*args)
        s.server.transport.loseConnection()  # as the server's idle sweep does
        s.pump.flush()
        return succeed(answer)

    s.console.in_thread = answer_then_server_closes
    status = s.drive(ensureDeferred(cli.run(s.reactor, parse(), s.console, connector)))
    assert status == 0, s.stderr.getvalue()
    assert first.closed
    assert len(opened) == 2
    assert json.loads(s.stdout.getvalue())["respuesta"]["resultado"] == "HOLA"


def test_interactive_end_of_input_is_an_error() -> None:
    """
    If stdin ends before the menu is answered the command prints [ERROR] and
    exits with 1, printing no document.
    """
    s = Setup(stdin="2\n")
    assert s.run() == 1
    assert s.stdout.getvalue() == ""
    assert "[ERROR] La entrada terminó" in s.stderr.getvalue()


def test_error_reply_prints_the_document_and_fails() -> None:
    """
    An error reply is printed in the document, explained with [ERROR] on
    stderr (mensaje and codigo) and makes the exit status 1.
    """
    s = Setup()
    assert s.run("--tipo", "sleep", "--contenido", "mucho", "--tarea-id", "z") == 1
    doc = json.loads(s.stdout.getvalue())
    assert doc["respuesta"]["estado"] == "error"
    assert doc["respuesta"]["codigo"] == "contenido_invalido"
    assert doc["respuesta"]["tarea_id"] == "z"
    err = s.stderr.getvalue()
    assert err.startswith("[ERROR] ") and "contenido_invalido" in err


def test_timeout_is_an_error() -> None:
    """
    A reply slower than --timeout gives [ERROR] and exit status 1.
    """
    s = Setup()
    assert s.run("--tipo", "sleep", "--contenido", "5", "--timeout", "1") == 1
    assert s.stdout.getvalue() == ""
    assert "[ERROR] Sin respuesta a la tarea" in s.stderr.getvalue()


def test_connection_failure_is_explained() -> None:
    """
    A refused connection prints a clear [ERROR] naming the target and exits
    with 1.
    """
    s = Setup()
    options = parse("--port", "9999")

    status = s.drive(ensureDeferred(cli.run(
        s.reactor, options, s.console, lambda: fail(ConnectionRefusedError())
    )))
    assert status == 1
    err = s.stderr.getvalue()
    assert "[ERROR] No se pudo conectar con 127.0.0.1:9999" in err
    assert "rechazada" in err


def batch_setup(**server_options: Any) -> Tuple[Setup, batch_mode.Batch]:
    s = Setup(**server_options)
    return s, batch_mode.Batch(s.client, s.reactor, s.console, window=10)


def test_batch_prints_one_reply_per_task() -> None:
    """
    Batch mode takes JSON lines and 'tipo contenido' lines, skips blank and
    comment lines, prints one JSON reply per task, and exits with 0 when all
    succeed.
    """
    s, batch = batch_setup()
    lines = [
        '{"tipo": "reverse", "contenido": "abc", "tarea_id": "j1"}\n',
        "uppercase hola mundo\n",
        "\n",
        "# a comment\n",
        b"3 uno dos tres\r\n",
        "4 1\n",
    ]
    for n, text in enumerate(lines, 1):
        batch.line(n, text)
    batch.eof()
    assert s.drive(batch.done) == 0
    replies = [json.loads(x) for x in s.stdout.getvalue().splitlines()]
    assert sorted(str(r["resultado"]) for r in replies) == sorted(
        ["cba", "HOLA MUNDO", "3", "Esperé 1 segundo"])
    assert "j1" in {r["tarea_id"] for r in replies}
    assert s.stderr.getvalue() == ""


def test_batch_reports_bad_lines_and_error_replies() -> None:
    """
    An unreadable line is reported on stderr with its number; an error
    reply is printed like any reply; either makes the exit status 1.
    """
    s, batch = batch_setup()
    batch.line(1, "{no json\n")
    batch.line(2, '{"contenido": "sin tipo"}\n')
    batch.line(3, b"\xff\xfe\n")
    batch.line(4, "nope x\n")
    batch.line(5, "1 ok\n")
    batch.eof()
    assert s.drive(batch.done) == 1
    replies = [json.loads(x) for x in s.stdout.getvalue().splitlines()]
    assert sorted(r["estado"] for r in replies) == ["error", "ok"]
    err = s.stderr.getvalue()
    assert "[ERROR] línea 1: JSON inválido" in err
    assert "[ERROR] línea 2: falta 'tipo'" in err
    assert "[ERROR] línea 3:" in err
    assert batch.failed == 4


def test_batch_json_line_without_contenido_sends_none() -> None:
    """
    A JSON batch line without "contenido" is sent without it, so the server
    answers contenido_faltante (not contenido_invalido for a null).
    """
    s, batch = batch_setup()
    batch.line(1, '{"tarea_id": "v", "tipo": "uppercase"}\n')
    batch.eof()
    assert s.drive(batch.done) == 1
    [reply] = [json.loads(x) for x in s.stdout.getvalue().splitlines()]
    assert (reply["tarea_id"], reply["codigo"]) == ("v", "contenido_faltante")


def test_batch_window_bounds_the_tasks_in_flight() -> None:
    """
    The reading side needs a slot per line; with a full window of tasks in
    flight it has to wait until a reply frees one.
    """
    s, batch = batch_setup()
    for n in range(1, 11):
        assert batch.slots.acquire(blocking=False)
        batch.line(n, "sleep 1\n")
    s.pump.flush()
    assert batch.inflight == 10
    assert not batch.slots.acquire(blocking=False)
    s.reactor.advance(1)
    s.pump.flush()
    assert batch.inflight == 0
    assert batch.slots.acquire(blocking=False)


def test_batch_stops_when_the_connection_is_lost() -> None:
    """
    If the connection is lost mid-batch, the batch says so once on stderr,
    finishes without waiting for more input, and fails.
    """
    s, batch = batch_setup()
    for n in range(1, 4):
        batch.line(n, "sleep 5\n")
    s.pump.flush()
    s.client.connectionLost(Failure(ConnectionLost("reset")))
    assert s.drive(batch.done) == 1
    assert batch.stopped
    err = s.stderr.getvalue()
    assert err.count("[ERROR]") == 1
    assert "reset" in err
    assert "3 tareas quedaron sin respuesta" in err


def test_batch_mode_through_run() -> None:
    """
    run() with --batch reads stdin, prints the replies, and stays quiet on
    a stderr that is not a terminal.
    """
    s = Setup(stdin="1 a\n2 ab\n")
    assert s.run("--batch") == 0
    assert sorted(json.loads(x)["resultado"] for x in s.stdout.getvalue().splitlines()) == [
        "A", "ba"]
    assert s.stderr.getvalue() == ""


def test_batch_shows_progress_on_a_terminal_for_large_input() -> None:
    """
    With many tasks and a terminal on stderr, batch mode rewrites one
    progress line there while it runs and clears it at the end; stdout still
    gets every reply.
    """
    s = Setup(stdin="sleep 1\n" * 1500, tty=True)
    assert s.run("--batch", "--window", "2000") == 0
    assert len(s.stdout.getvalue().splitlines()) == 1500
    err = s.stderr.getvalue()
    assert "\r\x1b[K1500 enviadas, 0 respondidas, 0 fallidas, 1500 en curso" in err
    assert "1500 enviadas, 1000 respondidas" in err
    assert err.endswith("\r\x1b[K")
    assert "[ERROR]" not in err


class ClosedPipe(io.StringIO):
    """
    A stdout whose reader has gone away.
    """

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_batch_stops_quietly_when_stdout_is_closed() -> None:
    """
    When the reader of stdout goes away (as with '| head'), batch mode stops
    reading, closes the connection and fails without error messages.
    """
    s = Setup()
    s.console.stdout = ClosedPipe()
    batch = batch_mode.Batch(s.client, s.reactor, s.console, window=10)
    for n in range(1, 6):
        batch.line(n, "sleep 1\n" if n > 1 else "1 a\n")
    assert s.drive(batch.done) == 1
    assert batch.output_closed and batch.stopped
    assert s.stderr.getvalue() == ""
    assert s.client.pending == 0
    batch.line(6, "1 b\n")
    assert batch.sent == 5


def test_batch_progress_line() -> None:
    """
    The progress line counts tasks sent, answered, failed and in flight.
    """
    s, batch = batch_setup()
    batch.line(1, "1 a\n")
    batch.line(2, "4 3\n")
    batch.line(3, "nope b\n")
    s.pump.flush()
    assert batch.progress() == "3 enviadas, 2 respondidas, 1 fallidas, 1 en curso"


class StubBatch:
    """
    Records what the reading thread hands over.
    """

    def __init__(self, window: int) -> None:
        self.slots = threading.Semaphore(window)
        self.stopped = False
        self.got: List[Tuple[int, Any]] = []
        self.ended = False

    def lines(self, first: int, texts: List[Any]) -> None:
        self.got.extend(enumerate(texts, first))

    def eof(self) -> None:
        self.ended = True

    def complain(self, text: str) -> None:
        raise AssertionError(text)


class QueueReactor:
    """
    callFromThread queues the call for the test thread to run.
    """

    def __init__(self) -> None:
        self.calls: queue.Queue[Tuple[Callable[..., Any], Tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put((f, args))

    def run_calls(self, wait: float) -> None:
        try:
            while True:
                f, args = self.calls.get(timeout=wait)
                f(*args)
        except queue.Empty:
            pass


def test_reading_thread_stops_at_a_full_window() -> None:
    """
    The stdin thread hands lines over, numbered, only while the window has
    free slots, resumes as slots are given back, and signals the end of
    input (a last line without newline included).
    """
    reactor = QueueReactor()
    batch = StubBatch(window=3)
    thread = batch_mode.read_in_thread(reactor, io.BytesIO(b"a\nb\nc\nd\ne"), batch)
    reactor.run_calls(wait=0.3)
    assert batch.got == [(1, b"a"), (2, b"b"), (3, b"c")]
    assert not batch.ended
    batch.slots.release()
    batch.slots.release()
    thread.join(5)
    assert not thread.is_alive()
    reactor.run_calls(wait=0.05)
    assert batch.got[3:] == [(4, b"d"), (5, b"e")]
    assert batch.ended


def test_reading_thread_accepts_text_streams() -> None:
    """
    A stream without read1 is read line by line.
    """
    reactor = QueueReactor()
    batch = StubBatch(window=10)
    thread = batch_mode.read_in_thread(reactor, io.StringIO("1 a\n2 b\n"), batch)
    thread.join(5)
    assert not thread.is_alive()
    reactor.run_calls(wait=0.05)
    assert batch.got == [(1, "1 a\n"), (2, "2 b\n")]
    assert batch.ended


# -- against a real twistd ------------------------------------------------------------


def _env() -> Dict[str, str]:
    env = server_env()
    env["PYTHONIOENCODING"] = "utf-8"
    return env


@pytest.fixture(scope="module")
def server_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """
    A real C{twistd -n pfo3} on a free loopback port, stopped afterwards.
    """
    running = start_server(tmp_path_factory.mktemp("twistd"))
    try:
        yield running.port
    finally:
        running.stop()


def client_cmd(*args: str, input: str = "", timeout: float = 20,
               command: Optional[List[str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        (command or [sys.executable, "-m", "pfo3.cli"]) + list(args),
        input=input, capture_output=True, text=True, encoding="utf-8",
        env=_env(), timeout=timeout,
    )


@pytest.mark.integration
@pytest.mark.parametrize("tipo,contenido,canonical,sent,resultado", [
    ("uppercase", "hola mundo", "uppercase", "hola mundo", "HOLA MUNDO"),
    ("2", "dábale", "reverse", "dábale", "elabád"),
    ("contar", "uno dos tres", "word_count", "uno dos tres", 3),
    ("Mayus", "x", "uppercase", "x", "X"),
    ("sleep", "0.1", "sleep", 0.1, "Esperé 0.1 segundos"),
    ("4", "1", "sleep", 1, "Esperé 1 segundo"),
])
def test_cli_prints_the_seed_shape_for_each_type(
    server_port: int, tipo: str, contenido: str, canonical: str, sent: Any, resultado: Any
) -> None:
    """
    Run as a subprocess against twistd, the command prints the seed's
    document for each task type and exits with 0: the request shows the
    type's canonical name whatever alias or code was typed, and a sleep's
    seconds as a number, as the seed's client sends them.
    """
    p = client_cmd("--puerto", str(server_port), "--tipo", tipo, "--contenido", contenido)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert list(doc) == ["servidor", "puerto", "solicitud", "respuesta"]
    assert (doc["servidor"], doc["puerto"]) == ("127.0.0.1", server_port)
    assert doc["solicitud"]["tipo"] == canonical
    assert doc["solicitud"]["contenido"] == sent and type(doc["solicitud"]["contenido"]) is type(
        sent)
    assert doc["respuesta"]["estado"] == "ok"
    assert doc["respuesta"]["resultado"] == resultado
    assert doc["respuesta"]["tarea_id"] == doc["solicitud"]["tarea_id"]
    assert isinstance(doc["respuesta"]["worker"], int)
    assert '\n  "solicitud": {\n    "tarea_id"' in p.stdout


@pytest.mark.integration
@pytest.mark.parametrize("contenido", ["", "   "])
def test_empty_contenido_is_refused(server_port: int, contenido: str) -> None:
    """
    An empty --contenido is refused before anything is sent, as the seed's
    client refuses it: a usage error, exit status 2.
    """
    p = client_cmd("--puerto", str(server_port), "--tipo", "uppercase", "--contenido", contenido)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "--contenido cannot be empty" in p.stderr and p.stdout == ""


@pytest.mark.integration
def test_console_script_and_interactive_menu(server_port: int) -> None:
    """
    The pfo3-client console script, given no --tipo, runs the menu from
    piped stdin (re-prompting on a bad choice and a non-number) and prints
    the document on stdout.
    """
    script = Path(sys.executable).parent / "pfo3-client"
    if not script.exists():
        pytest.skip("pfo3-client is not installed in this environment")
    p = client_cmd("--port", str(server_port), input="0\n4\nya\n0\n", command=[str(script)])
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["solicitud"]["tipo"] == "sleep"
    assert doc["solicitud"]["contenido"] == 0
    assert doc["respuesta"]["resultado"] == "Esperé 0 segundos"
    assert "Opción inválida" in p.stderr


@pytest.mark.integration
def test_cli_failures_exit_1_without_traceback(server_port: int) -> None:
    """
    An error reply, a timeout and a server that is not there each print
    [ERROR] with a reason on stderr and exit with 1, never a traceback.
    """
    bad = client_cmd("--port", str(server_port), "--tipo", "nope", "--contenido", "x")
    slow = client_cmd("--port", str(server_port), "--tipo", "sleep", "--contenido", "5",
                      "--timeout", "0.3")
    down = client_cmd("--port", str(free_port()), "--tipo", "1", "--contenido", "x")
    for p, reason in [(bad, "tipo_desconocido"), (slow, "Sin respuesta"), (down, "rechazada")]:
        assert p.returncode == 1
        assert p.stderr.startswith("[ERROR] ") or "\n[ERROR] " in p.stderr
        assert reason in p.stderr
        assert "Traceback" not in p.stderr
    assert json.loads(bad.stdout)["respuesta"]["codigo"] == "tipo_desconocido"


@pytest.mark.integration
def test_cli_interrupted_exits_130_quietly(server_port: int) -> None:
    """
    SIGTERM (or Ctrl-C) while tasks are in flight ends the command at once
    with status 130 and a single [ERROR] line, no traceback.
    """
    p = subprocess.Popen(
        [sys.executable, "-m", "pfo3.cli", "--port", str(server_port), "--batch"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )
    try:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(b"uppercase a\nsleep 20\n")
        p.stdin.flush()
        assert json.loads(p.stdout.readline())["resultado"] == "A"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130
    assert err.decode() == "[ERROR] Interrumpido.\n"


@pytest.mark.integration
def test_batch_into_head_ends_without_traceback(server_port: int) -> None:
    """
    Piped into a reader that stops early (like head), batch mode exits
    without tracebacks or error noise.
    """
    p = subprocess.Popen(
        [sys.executable, "-m", "pfo3.cli", "--port", str(server_port), "--batch"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )
    try:
        assert p.stdin is not None and p.stdout is not None and p.stderr is not None
        stdin = p.stdin

        def write_input() -> None:
            try:
                stdin.write(b"reverse abc\n" * 20_000)
                stdin.close()
            except OSError:
                pass  # the client stopped reading: that is the point

        writer = threading.Thread(target=write_input, daemon=True)
        writer.start()
        assert json.loads(p.stdout.readline())["resultado"] == "cba"
        p.stdout.close()
        p.wait(20)
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1
    assert err == b""


@pytest.mark.integration
def test_cli_usage_error_exits_2() -> None:
    """
    A usage error exits with 2 and no traceback.
    """
    p = client_cmd("--batch", "--tipo", "1")
    assert p.returncode == 2
    assert "cannot be used with --batch" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.integration
def test_cli_endpoint_reports_the_peer(server_port: int) -> None:
    """
    --endpoint takes a client endpoint string; the document then names the
    address actually connected to.
    """
    p = client_cmd("--endpoint", f"tcp:host=127.0.0.1:port={server_port}",
                   "--tipo", "reverse", "--contenido", "ab")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert (doc["servidor"], doc["puerto"]) == ("127.0.0.1", server_port)
    assert doc["respuesta"]["resultado"] == "ba"


@pytest.mark.integration
def test_batch_pipelines_10000_tasks(server_port: int) -> None:
    """
    Batch mode sends 10,000 tasks from stdin over one connection and prints
    every reply exactly once, one JSON object per line.
    """
    lines = []
    for i in range(10_000):
        if i % 2:
            task = {"tipo": 1 + i % 3, "contenido": f"t {i}", "tarea_id": f"json-{i}"}
            lines.append(json.dumps(task))
        else:
            lines.append(f"reverse {i}")
    p = client_cmd("--port", str(server_port), "--batch", input="\n".join(lines) + "\n",
                   timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    replies = [json.loads(x) for x in p.stdout.splitlines()]
    assert len(replies) == 10_000
    assert all(r["estado"] == "ok" for r in replies)
    ids = [r["tarea_id"] for r in replies]
    assert len(set(ids)) == 10_000
    assert {f"json-{i}" for i in range(1, 10_000, 2)} <= set(ids)
    reversed_numbers = sorted(
        int(r["resultado"][::-1]) for r in replies if not r["tarea_id"].startswith("json-")
    )
    assert reversed_numbers == list(range(0, 10_000, 2))


@pytest.mark.integration
def test_blocking_client_for_scripts(server_port: int, tmp_path: Path) -> None:
    """
    A plain script without a reactor uses BlockingClient: one task, several
    at once, ping, tipos, a typed exception for an error reply, and a new
    connection when the previous one was closed.
    """
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        from pfo3.client import BlockingClient
        from pfo3.errors import UnknownType

        with BlockingClient("tcp:host=127.0.0.1:port={server_port}", timeout=10) as c:
            print(c.submit("uppercase", "hola")["resultado"])
            print([r["resultado"] for r in c.submit_many([("2", "ab"), ("3", "a b c")])])
            print(c.ping(), len(c.tipos()))
            try:
                c.submit("nope", "x")
            except UnknownType as e:
                print(e.codigo)
            c.close()
            print(c.submit("reverse", "xy")["resultado"])
    """))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       env=_env(), timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["HOLA", "['ba', 3]", "pong 4", "tipo_desconocido", "yx"]


@pytest.mark.integration
def test_module_entry_point_has_help() -> None:
    """
    python -m pfo3.cli --help describes the flags and exits with 0.
    """
    p = client_cmd("--help")
    assert p.returncode == 0
    for flag in ("--host", "--servidor", "--puerto", "--endpoint", "--batch", "--timeout"):
        assert flag in p.stdout



@pytest.mark.integration
def test_cli_over_tls_with_a_ca_directory(tmp_path: Path) -> None:
    """
    --endpoint tls:... with trustRoots pointing at the CA runs a task over
    TLS against twistd's ssl endpoint; without that CA the certificate is
    refused with a clear [ERROR] and exit status 1.
    """
    tls = TLSFiles(tmp_path)
    port = free_port()
    running = start_server(tmp_path, port=port, endpoint=tls.endpoint(port))
    try:
        endpoint = f"tls:localhost:{port}:trustRoots={tls.ca_dir}"
        ok = client_cmd("--endpoint", endpoint, "--tipo", "1", "--contenido", "seguro",
                        "--timeout", "10")
        assert ok.returncode == 0, ok.stderr
        doc = json.loads(ok.stdout)
        assert doc["respuesta"]["resultado"] == "SEGURO"
        assert doc["puerto"] == port
        other = tmp_path / "empty-ca"
        other.mkdir()
        refused = client_cmd("--endpoint", f"tls:localhost:{port}:trustRoots={other}",
                             "--tipo", "1", "--contenido", "x", "--timeout", "10")
        assert refused.returncode == 1
        assert refused.stderr.startswith("[ERROR] ")
        assert "falló la conexión TLS" in refused.stderr
        assert "certificate verify failed" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        running.stop()
