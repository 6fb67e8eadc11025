"""
Processes under attack: a C{twistd -n pfo3} (or C{pfo3-worker}) started in
a scratch directory, with what the suite measures of it (resident memory,
open file descriptors, tracebacks in its log), and a throwaway TLS
certificate authority for its C{ssl:} endpoint.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pfo3

#: The RabbitMQ the distributed runs use.
BROKER = os.environ.get("PFO3_CHAOS_BROKER", "amqp://guest:guest@127.0.0.1:5672/%2F")

#: The log lines that betray an exception nobody handled.
TRACEBACK_MARKERS = ("Traceback (most recent call last)", "Unhandled Error",
                     "Unhandled error in Deferred")


def free_port() -> int:
    """
    @return: A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, proc: Optional[subprocess.Popen[Any]] = None, deadline: float = 20.0
) -> None:
    """
    Wait until something accepts connections on 127.0.0.1:C{port}.

    @raise RuntimeError: if C{proc} exits first or the deadline passes.
    """
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process exited early with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {deadline}s")


def twistd_env() -> dict[str, str]:
    """
    @return: An environment in which C{twistd} finds this pfo3 and its
        plugin first.
    """
    env = dict(os.environ)
    root = str(Path(pfo3.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def twistd_command(plugin: str, *args: str) -> List[str]:
    """
    @return: The command line of C{twistd -n PLUGIN ARGS} with this
        interpreter.
    """
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", plugin, *args]


class Process:
    """
    A C{twistd} process, its log, and what the suite reads of it in C{/proc}.
    """

    def __init__(self, workdir: Path, name: str, plugin: str, args: Sequence[str],
                 wait_port: Optional[int] = None, wait_log: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None) -> None:
        self.workdir = workdir
        self.env = {**twistd_env(), **(env or {})}
        self.name = name
        self.log = workdir / f"{name}.log"
        self.plugin = plugin
        self.args = list(args)
        self.proc = self._spawn()
        try:
            if wait_port is not None:
                wait_for_port(wait_port, self.proc)
            if wait_log is not None:
                self.wait_log(wait_log)
        except Exception:
            self.kill()
            raise RuntimeError(self.log.read_text(errors="replace")[-4000:])

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(
                twistd_command(self.plugin, *self.args), cwd=self.workdir, env=self.env,
                stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, text: str, count: int = 1, deadline: float = 20.0) -> None:
        """
        Wait until C{text} appears C{count} times in the log.
        """
        end = time.monotonic() + deadline
        while self.log_text().count(text) < count:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            if time.monotonic() > end:
                raise RuntimeError(f"{text!r} not in the log of {self.name} after {deadline}s")
            time.sleep(0.05)

    def rss_kib(self) -> int:
        """
        @return: The resident memory of the process (VmRSS), in KiB.
        """
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def fd_count(self) -> int:
        """
        @return: How many file descriptors the process holds open.
        """
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def tracebacks(self) -> List[str]:
        """
        @return: The log lines that show an unhandled exception.
        """
        return [line for line in self.log_text().splitlines()
                if any(m in line for m in TRACEBACK_MARKERS)]

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, deadline: float = 20.0) -> Optional[int]:
        """
        SIGTERM, then SIGKILL past the deadline.

        @return: The exit status.
        """
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(deadline)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> None:
        """
        Start the same command again (after it stopped).
        """
        self.proc = self._spawn()


class ThrowawayCA:
    """
    A certificate authority made for one run and a C{localhost} server
    certificate it signed, as files in C{directory}.
    """

    def __init__(self, directory: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=1)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pfo3 chaos CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca = directory / "chaos-ca.pem"
        self.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self.key = directory / "chaos-server.key"
        self.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        self.cert = directory / "chaos-server.pem"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def endpoint(self, port: int) -> str:
        """
        @return: The C{ssl:} server endpoint for this certificate on C{port}.
        """
        return f"ssl:{port}:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"


def delete_broker_objects(prefix: str, orchestrators: Sequence[str]) -> Optional[str]:
    """
    Delete the queues and exchanges that a run declared under C{prefix}.

    @return: L{None}, or why the broker could not be cleaned.
    """
    try:
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(BROKER))
    except Exception as e:  # the broker's fault, not the run's
        return f"cannot clean up the broker: {e}"
    try:
        channel = connection.channel()
        for q in ["tareas", "muertas", *(f"respuestas.{n}" for n in orchestrators)]:
            channel.queue_delete(f"{prefix}.{q}")
        for x in ["muertas", "cancelaciones"]:
            channel.exchange_delete(f"{prefix}.{x}")
    finally:
        connection.close()
    return None
