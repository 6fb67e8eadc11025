"""
TLS to RabbitMQ: the broker URL's TLS settings (C{--broker-ca},
C{--broker-cert}, C{--broker-key}, or pika's C{ssl_options}) and, against a
private RabbitMQ node this module starts with a TLS listener that requires
client certificates, an orchestrator and a worker over C{amqps://}, a broker
certificate from another CA, a host name the certificate does not name, and
a worker without a client certificate.

The node is the module's own (its own name, ports, data and Erlang cookie);
its environment, C{rabbitmqctl} and the process helpers come from
C{deploy/cluster.py}.  The machine's shared RabbitMQ is not touched.
RabbitMQ missing fails these tests.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterator, List
from urllib.parse import parse_qs, urlsplit

import pytest
from twisted.python import usage

from pfo3.amqp import tap as worker_tap
from pfo3.amqp.connection import broker_url, client_tls, parameters
from pfo3.certs import KeyPairFiles, make_ca, make_client, make_server

from .conftest import ROOT, LineSocket, free_port, server_env, stop_processes, wait_for_port

SCRIPT = ROOT / "deploy" / "cluster.py"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """
    A throwaway CA with a broker certificate for C{localhost} and
    C{127.0.0.1} and client certificates, and a second, foreign CA.
    """
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder / "ours")
    other = make_ca(folder / "theirs", common_name="another CA")
    return {
        "ca": ca.cert,
        "other_ca": other.cert,
        "server": make_server(folder / "ours", ["localhost", "127.0.0.1"], name="rabbit"),
        "orchestrator": make_client(folder / "ours", "orchestrator"),
        "worker": make_client(folder / "ours", "worker"),
        "stranger": make_client(folder / "theirs", "stranger"),
    }


# -- the URL and the options --------------------------------------------------


URL = "amqps://guest:guest@localhost:5671/%2F"


def test_options_fold_into_the_url(pki: Dict[str, Any]) -> None:
    """
    C{--broker-ca}, C{--broker-cert} and C{--broker-key} become pika's
    C{ssl_options} in the worker's broker URL, which pika still parses (host,
    port, credentials) and from which the client TLS options are built.
    """
    client: KeyPairFiles = pki["worker"]
    options = worker_tap.Options()
    options.parseOptions(["--broker", URL, "--broker-ca", str(pki["ca"]),
                          "--broker-cert", str(client.cert), "--broker-key", str(client.key)])
    url = options["broker"]
    settings = ast.literal_eval(parse_qs(urlsplit(url).query)["ssl_options"][0])
    assert settings == {"ca_certs": str(pki["ca"]), "certfile": str(client.cert),
                        "keyfile": str(client.key)}
    params = parameters(url)
    assert (params.host, params.port, params.credentials.username) == ("localhost", 5671, "guest")
    assert client_tls(url)._hostnameASCII == "localhost"
    # Folding again changes nothing.
    assert broker_url(url, str(pki["ca"])) == url


def test_plain_url_stays_as_it_is() -> None:
    """
    Without the TLS options the URL is untouched: C{amqp://} has no TLS,
    C{amqps://} trusts the system's authorities.
    """
    plain = "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert broker_url(plain) == plain and client_tls(plain) is None
    assert broker_url(URL) == URL and client_tls(URL)._hostnameASCII == "localhost"


@pytest.mark.parametrize("args, message", [
    (["--broker", "amqp://127.0.0.1/", "--broker-ca", "x.pem"], "need an amqps://"),
    (["--broker", URL, "--broker-key", "k.pem"], "needs its certificate"),
    (["--broker", URL, "--broker-ca", "/nonexistent/ca.pem"], "cannot read CA"),
    (["--broker", URL + "?ssl_options=%7B%27ciphers%27%3A+%27ALL%27%7D"], "ciphers not supported"),
    (["--broker", URL + "?ssl_options=oops"], "not a dictionary"),
])
def test_bad_tls_options(args: List[str], message: str) -> None:
    """
    Wrong TLS settings are usage errors naming the problem.
    """
    with pytest.raises(usage.UsageError, match=message):
        worker_tap.Options().parseOptions(args)


def test_mismatched_client_key(pki: Dict[str, Any]) -> None:
    """
    A client certificate with another certificate's key is refused at
    start-up, not at the first handshake.
    """
    with pytest.raises(usage.UsageError, match="does not match"):
        worker_tap.Options().parseOptions([
            "--broker", URL, "--broker-cert", str(pki["worker"].cert),
            "--broker-key", str(pki["orchestrator"].key)])


def test_end_entity_certificate_is_not_an_authority(pki: Dict[str, Any]) -> None:
    """
    C{--broker-ca} must be a CA: the broker's own certificate is refused.
    """
    with pytest.raises(usage.UsageError, match="not a certificate authority"):
        worker_tap.Options().parseOptions(
            ["--broker", URL, "--broker-ca", str(pki["server"].cert)])


def test_orchestrator_has_the_same_options(pki: Dict[str, Any]) -> None:
    """
    C{twistd pfo3 --broker} takes the same TLS options.
    """
    from pfo3.tap import Options

    options = Options()
    options.parseOptions(["--broker", URL, "--broker-ca", str(pki["ca"])])
    assert "ssl_options" in options["broker"]


def test_worker_max_line() -> None:
    """
    C{twistd pfo3-worker --max-line} bounds the results the worker inlines
    (its object-storage policy), and must be positive.
    """
    options = worker_tap.Options()
    options.parseOptions(["--broker", "amqp://127.0.0.1/", "--max-line", "4096",
                          "--blobs", "memory:"])
    assert options["max-line"] == 4096
    from twisted.internet.testing import MemoryReactorClock

    service = worker_tap.makeService(options, MemoryReactorClock())
    assert service.executor.policy.max_line == 4096
    with pytest.raises(usage.UsageError, match="--max-line"):
        worker_tap.Options().parseOptions(["--broker", "amqp://127.0.0.1/", "--max-line", "0"])


def test_tls_failures_are_named() -> None:
    """
    The log line of a failed handshake says why: OpenSSL's reasons, a
    certificate for another name; a connection lost otherwise is not a
    TLS failure.
    """
    from OpenSSL.SSL import Error as OpenSSLError
    from service_identity import VerificationError
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    from pfo3.amqp.connection import _tls_failure

    verify = OpenSSLError([("SSL routines", "", "certificate verify failed")])
    assert _tls_failure(Failure(verify)) == "certificate verify failed"
    assert "does not name this host" in str(_tls_failure(Failure(VerificationError(errors=[]))))
    assert _tls_failure(Failure(OpenSSLError("odd"))) == "odd"
    assert _tls_failure(Failure(ConnectionDone())) is None


# -- against a private RabbitMQ node -------------------------------------------


def _cluster_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pfo3_deploy_cluster", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Node:
    """
    A RabbitMQ node of this module's own, with a TLS listener.
    """

    def __init__(self, directory: Path, pki: Dict[str, Any]) -> None:
        self.script = _cluster_script()
        self.dir = directory
        ports: List[int] = []
        while len(set(ports)) < 3:
            ports = [free_port() for _ in range(3)]
        amqp, dist, self.tls_port = ports
        self.state: Dict[str, Any] = {
            "dir": str(directory),
            "ports": {"amqp": amqp, "amqp_dist": dist},
            "pids": {},
            "rabbitmq": {"node": f"pfo3tls{amqp}@localhost"},
        }
        rabbit = directory / "rabbitmq"
        for sub in (directory / "logs", rabbit):
            sub.mkdir(parents=True, exist_ok=True)
        (rabbit / "enabled_plugins").write_text("")
        server: KeyPairFiles = pki["server"]
        # rabbit_env() names DIR/rabbitmq/rabbitmq as the configuration file.
        (rabbit / "rabbitmq.conf").write_text("\n".join([
            f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}",
            f"ssl_options.cacertfile = {pki['ca']}",
            f"ssl_options.certfile = {server.cert}",
            f"ssl_options.keyfile = {server.key}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            "",
        ]))

    def start(self) -> None:
        s = self.script
        with (self.dir / "logs" / "rabbitmq.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [s.rabbit_tool("rabbitmq-server")], env=s.rabbit_env(self.state),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        s.record(self.state, "rabbitmq", self.proc.pid)
        s.wait_until(
            "the RabbitMQ node",
            lambda: s.rabbitmqctl(self.state, "await_startup", "--timeout", "30",
                                  timeout=35) == 0,
            90, ["rabbitmq"], self.state)
        wait_for_port(self.tls_port, deadline=30)

    def stop(self) -> None:
        s = self.script
        if s.alive(self.state["pids"].get("rabbitmq")):
            s.rabbitmqctl(self.state, "stop", timeout=60)
            s.stop_pid(self.state, "rabbitmq", 30)

    def url(self, host: str = "localhost") -> str:
        return f"amqps://guest:guest@{host}:{self.tls_port}/%2F"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pki: Dict[str, Any]) -> Iterator[Node]:
    """
    The private node, started once for the module and always stopped.
    """
    running = Node(tmp_path_factory.mktemp("rabbit"), pki)
    try:
        running.start()
        yield running
    finally:
        running.stop()


class Processes:
    """
    C{twistd} processes of one test, and their logs.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.procs: List[subprocess.Popen] = []

    def start(self, name: str, args: List[str]) -> subprocess.Popen:
        twistd = Path(sys.executable).parent / "twistd"
        proc = subprocess.Popen([str(twistd), "-n", "--pidfile=", *args], cwd=self.dir,
                                env=server_env(), stdout=(self.dir / f"{name}.log").open("wb"),
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def orchestrator(self, node: Node, *tls: str, host: str = "localhost") -> int:
        port = free_port()
        proc = self.start("orchestrator", [
            "pfo3", "--port", f"tcp:{port}:interface=127.0.0.1", "--broker", node.url(host),
            "--broker-prefix", "tls", "--name", "o1", *tls])
        wait_for_port(port, proc=proc)
        return port

    def worker(self, node: Node, *tls: str, name: str = "worker") -> subprocess.Popen:
        return self.start(name, ["pfo3-worker", "--broker", node.url("127.0.0.1"),
                                 "--broker-prefix", "tls", "--name", "w1", *tls])

    def wait_log(self, name: str, text: str, deadline: float = 30.0) -> str:
        log = self.dir / f"{name}.log"
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            content = log.read_text() if log.exists() else ""
            if text in content:
                return content
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in {name}.log after {deadline}s:\n"
                             + (log.read_text() if log.exists() else "(no log)"))

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text()

    def stop(self) -> None:
        stop_processes(self.procs, 20)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    running = Processes(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def certificate(pki: Dict[str, Any], who: str, ca: str = "ca") -> List[str]:
    files: KeyPairFiles = pki[who]
    return ["--broker-ca", str(pki[ca]), "--broker-cert", str(files.cert),
            "--broker-key", str(files.key)]


def refused_quickly(port: int) -> Dict[str, Any]:
    """
    @return: The reply to a task sent to the orchestrator on C{port}, which
        must come within a few seconds, on a connection that still answers.
    """
    conn = LineSocket(port, timeout=10)
    try:
        started = time.monotonic()
        conn.send_json({"tarea_id": "t", "tipo": "1", "contenido": "hola"})
        reply = conn.read_json()
        assert time.monotonic() - started < 5, "the task waited for a broker that never came"
        conn.send_json({"op": "ping"})
        assert conn.read_json()["resultado"] == "pong"
        return reply
    finally:
        conn.close()


@pytest.mark.integration
def test_task_over_amqps(node: Node, pki: Dict[str, Any], procs: Processes) -> None:
    """
    An orchestrator (connecting to C{localhost}) and a worker (to
    C{127.0.0.1}), each verifying the broker's certificate and presenting
    its own, answer a task over C{amqps://}.
    """
    port = procs.orchestrator(node, *certificate(pki, "orchestrator"))
    procs.worker(node, *certificate(pki, "worker"))
    procs.wait_log("orchestrator", "Connected to the broker")
    procs.wait_log("worker", "Connected to the broker")
    conn = LineSocket(port, timeout=30)
    try:
        conn.send_json({"tarea_id": "x", "tipo": "1", "contenido": "hola"})
        reply = conn.read_json()
    finally:
        conn.close()
    assert (reply["estado"], reply["resultado"], reply["tarea_id"]) == ("ok", "HOLA", "x")
    assert str(reply["worker"]).startswith("w1/")


@pytest.mark.integration
def test_broker_certificate_from_another_ca(
    node: Node, pki: Dict[str, Any], procs: Processes,
) -> None:
    """
    Trusting another CA, the orchestrator refuses the broker's certificate,
    logs why, never connects, and answers tasks at once with
    C{broker_no_disponible}.
    """
    port = procs.orchestrator(node, *certificate(pki, "orchestrator", ca="other_ca"))
    procs.wait_log("orchestrator", "TLS with the broker at localhost:")
    assert "certificate verify failed" in procs.log("orchestrator")
    reply = refused_quickly(port)
    assert (reply["estado"], reply["codigo"]) == ("error", "broker_no_disponible")
    assert "Connected to the broker" not in procs.log("orchestrator")


@pytest.mark.integration
def test_host_name_is_verified(node: Node, pki: Dict[str, Any], procs: Processes) -> None:
    """
    A certificate from the right CA for another host name is refused too:
    here the name checked is set to one the certificate does not hold.
    """
    url = node.url("127.0.0.1") + "?ssl_options=" + repr(
        {"ca_certs": str(pki["ca"]), "certfile": str(pki["orchestrator"].cert),
         "keyfile": str(pki["orchestrator"].key), "server_hostname": "rabbit.example.org"})
    port = free_port()
    proc = procs.start("orchestrator", [
        "pfo3", "--port", f"tcp:{port}:interface=127.0.0.1", "--broker", url,
        "--broker-prefix", "tls"])
    wait_for_port(port, proc=proc)
    procs.wait_log("orchestrator", "does not name this host")
    assert refused_quickly(port)["codigo"] == "broker_no_disponible"


@pytest.mark.integration
def test_worker_without_a_client_certificate(
    node: Node, pki: Dict[str, Any], procs: Processes,
) -> None:
    """
    The broker requires client certificates: a worker that trusts it but
    presents none, or one from another CA, cannot connect, and says why.
    """
    procs.worker(node, "--broker-ca", str(pki["ca"]), name="bare")
    procs.worker(node, *certificate(pki, "stranger"), name="stranger")
    text = procs.wait_log("bare", "TLS with the broker at 127.0.0.1:")
    assert "certificate required" in text, text
    text = procs.wait_log("stranger", "TLS with the broker at 127.0.0.1:")
    assert "unknown ca" in text, text
    for name in ("bare", "stranger"):
        assert "Connected to the broker" not in procs.log(name)
