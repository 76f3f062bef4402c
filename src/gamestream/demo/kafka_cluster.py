"""A local Apache Kafka cluster for gamestream's Kafka log: 3 KRaft brokers on loopback (each broker and
controller at once), replication factor 3, min.insync.replicas=2.

    scripts/kafka-cluster fetch        fetches the broker jars once (see below); nothing else
    scripts/kafka-cluster start DIR    starts the brokers with their data under DIR (kept for the next start),
                                       waits until every one serves, prints the bootstrap servers
                                       (export GAMESTREAM_LOG=kafka://$(scripts/kafka-cluster start DIR)/events)
    scripts/kafka-cluster stop DIR     stops the brokers started with DIR (the data stays)
    scripts/kafka-cluster status DIR   prints each broker's pid and port, and whether it runs

The jars: `org.apache.kafka:kafka_2.13:4.4.0` with its runtime dependencies (and log4j's SLF4J binding, so the
brokers log), resolved from Maven Central by Maven (Debian's `maven` package; `apt-get install maven`) with
strict checksums, then each jar checked again against the `.sha1` file Maven Central publishes beside it. They
are cached in ${GAMESTREAM_KAFKA_CACHE:-~/.cache/gamestream/kafka-4.4.0}/jars with a manifest of their SHA-1s;
once there, nothing is downloaded again and Maven is not needed.

Each broker is one JVM (`java -cp 'jars/*' kafka.Kafka server.properties`, after `kafka.tools.StorageTool format`),
kept small (-Xmx256m, C1 only, serial GC, 2 network and 2 I/O threads): three of them share a 2-core machine with
the tests. Ports are picked free at the first start and kept in DIR/cluster.json, so a restarted broker comes
back on its own port with its own data. Like the NATS nodes of `gamestream demo --cluster` (`sync_interval:
always`), every broker fsyncs each appended batch before it counts as written (`log.flush.interval.messages=1`):
an acknowledged record is on the disk of every in-sync replica, not only in its page cache.

`gamestream demo --cluster --log kafka` starts one under `<data_dir>/kafka` and supervises its brokers;
tests/kafka_cluster.py adds what the fault tests need (which broker leads a partition, which replicas are in sync).
Only the standard library: scripts/kafka-cluster runs it with any Python 3.11.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

KAFKA_VERSION = "4.4.0"
SCALA_VERSION = "2.13"
LOG4J_VERSION = "2.25.5"  # the log4j that kafka 4.4.0 depends on: its SLF4J 1.x binding, so the brokers log
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
MAVEN_CENTRAL = "https://repo1.maven.org/maven2"
CACHE = Path(os.environ.get("GAMESTREAM_KAFKA_CACHE") or Path.home() / ".cache" / "gamestream" /
             f"kafka-{KAFKA_VERSION}")
HEAP = os.environ.get("GAMESTREAM_KAFKA_HEAP", "256m")
START_SECONDS = 180.0  # three JVMs starting at once on 2 busy cores can take a minute
STARTED_LINE = "Kafka Server started"  # what KafkaRaftServer logs once the broker is registered and unfenced

_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>gamestream</groupId><artifactId>kafka-broker</artifactId><version>1</version><packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_{SCALA_VERSION}</artifactId>
      <version>{KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_VERSION}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J = """status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.state.name = state.change.logger
logger.state.level = warn
logger.clients.name = org.apache.kafka.clients
logger.clients.level = warn
"""


# ------------------------------------------------------------------------------------------------------ jars
def jars_dir() -> Path:
    return CACHE / "jars"


def _manifest() -> Path:
    return CACHE / "jars.sha1"


def _cached() -> bool:
    """Whether every jar of the manifest is in the cache with its SHA-1 (sizes and names only: the full hash was
    checked when the jars were fetched, and a cache is not re-hashed at every start)."""
    manifest = _manifest()
    if not manifest.exists():
        return False
    for line in manifest.read_text().splitlines():
        _, name = line.split("  ", 1)
        if not (jars_dir() / name).is_file():
            return False
    return True


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _central_sha1(relative: str) -> str:
    """The SHA-1 Maven Central publishes for a file (its `.sha1`; some hold "hash  filename")."""
    with urllib.request.urlopen(f"{MAVEN_CENTRAL}/{relative}.sha1", timeout=30) as answer:
        return answer.read().decode().split()[0].strip().lower()


def fetch(quiet: bool = False) -> Path:
    """The directory of the broker jars, fetched into the cache on the first call (under a lock, so parallel test
    workers fetch once). Raises RuntimeError when Maven is missing or a checksum does not match."""
    if _cached():
        return jars_dir()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _cached():
            return jars_dir()
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError("the Kafka broker jars are not cached and Maven is missing: install Debian's maven "
                               "(apt-get install maven), or run scripts/setup-test-env")
        if not quiet:
            print(f"fetching Apache Kafka {KAFKA_VERSION} (kafka_{SCALA_VERSION} and its runtime dependencies) "
                  f"from Maven Central into {CACHE} (once)", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=CACHE) as work:
            work_path = Path(work)
            (work_path / "pom.xml").write_text(_POM)
            layout = work_path / "layout"
            # -C: Maven fails on a checksum that does not match; the repository layout keeps each jar's
            # coordinates in its path, to check it against Maven Central's .sha1 below.
            completed = subprocess.run(
                [mvn, "-B", "-q", "-C", "-f", str(work_path / "pom.xml"), f"-Dmaven.repo.local={work_path / 'm2'}",
                 f"{DEPENDENCY_PLUGIN}:copy-dependencies", "-DincludeScope=runtime", "-Dmdep.useRepositoryLayout=true",
                 f"-DoutputDirectory={layout}"], capture_output=True, text=True)
            if completed.returncode != 0:
                raise RuntimeError(f"Maven could not resolve kafka_{SCALA_VERSION}:{KAFKA_VERSION}:\n"
                                   f"{completed.stdout[-3000:]}{completed.stderr[-3000:]}")
            staged = work_path / "jars"
            staged.mkdir()
            lines = []
            for jar in sorted(layout.rglob("*.jar")):
                relative = jar.relative_to(layout).as_posix()
                actual, published = _sha1(jar), _central_sha1(relative)
                if actual != published:
                    raise RuntimeError(f"{relative}: SHA-1 {actual} is not Maven Central's {published}")
                shutil.copy2(jar, staged / jar.name)
                lines.append(f"{actual}  {jar.name}")
            if not any(name.endswith(f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar") for name in lines):
                raise RuntimeError(f"Maven resolved no kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar")
            if jars_dir().exists():
                shutil.rmtree(jars_dir())
            staged.rename(jars_dir())
            _manifest().write_text("\n".join(lines) + "\n")
        if not quiet:
            print(f"{len(lines)} jars verified against Maven Central's SHA-1s", file=sys.stderr)
    return jars_dir()


# --------------------------------------------------------------------------------------------------- cluster
def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports (held together while picked, so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Broker:
    node_id: int
    directory: Path
    port: int  # the PLAINTEXT listener clients use
    controller_port: int
    pid: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.directory / "server.properties"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    @property
    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.pid is not None and _is_our_broker(self.pid, self.config)


def _is_our_broker(pid: int, config: Path) -> bool:
    """Whether `pid` is a live broker JVM started with `config` (not a reused pid)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and b"kafka.Kafka" in command and str(config).encode() in command


@dataclass
class KafkaCluster:
    """`brokers` KRaft brokers (each also a controller) with data under `directory`.

    >>> cluster = KafkaCluster(Path("/tmp/kafka")).start()
    >>> cluster.bootstrap          # '127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3'
    >>> cluster.kill(0); cluster.restart(0); cluster.stop()
    """

    directory: Path
    brokers: int = 3
    members: list[Broker] = field(default_factory=list)
    cluster_id: str = ""

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).absolute()
        state = self.directory / "cluster.json"
        if not self.members and state.exists():  # started before: same ports, same data, same cluster id
            saved = json.loads(state.read_text())
            self.cluster_id = saved["cluster_id"]
            self.members = [Broker(b["node_id"], Path(b["directory"]), b["port"], b["controller_port"], b.get("pid"))
                            for b in saved["brokers"]]
            self.brokers = len(self.members)
        if not self.members:
            ports = free_ports(2 * self.brokers)
            self.members = [Broker(i + 1, self.directory / f"broker{i + 1}", ports[2 * i], ports[2 * i + 1])
                            for i in range(self.brokers)]
        if not self.cluster_id:
            # base64url of a UUID, as Kafka's own tool makes it; may start with "-", hence `--cluster-id=` below
            self.cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()

    @property
    def bootstrap(self) -> str:
        return ",".join(broker.address for broker in self.members)

    def _save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        brokers = [{"node_id": b.node_id, "directory": str(b.directory), "port": b.port,
                    "controller_port": b.controller_port, "pid": b.pid} for b in self.members]
        (self.directory / "cluster.json").write_text(json.dumps(
            {"cluster_id": self.cluster_id, "bootstrap": self.bootstrap, "brokers": brokers}, indent=2))

    def _properties(self, broker: Broker) -> str:
        voters = ",".join(f"{b.node_id}@127.0.0.1:{b.controller_port}" for b in self.members)
        replicas = min(3, len(self.members))
        settings = {
            "process.roles": "broker,controller",
            "node.id": broker.node_id,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{broker.port},CONTROLLER://127.0.0.1:{broker.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{broker.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": broker.directory / "data",
            "auto.create.topics.enable": "false",
            "default.replication.factor": replicas,
            "min.insync.replicas": min(2, replicas),
            "unclean.leader.election.enable": "false",
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": 5,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min(2, replicas),
            "transaction.state.log.num.partitions": 5,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min(2, replicas),
            "group.initial.rebalance.delay.ms": 0,
            # an acknowledged record is fsync'd on every in-sync replica (see the module docstring)
            "log.flush.interval.messages": 1,
            # a killed broker is noticed in seconds, not the default 9 s, so its partitions get new leaders fast
            "broker.session.timeout.ms": 3000,
            "broker.heartbeat.interval.ms": 500,
            "replica.lag.time.max.ms": 5000,
            # small: three brokers and the tests share two cores
            "num.network.threads": 2,
            "num.io.threads": 2,
            "num.replica.fetchers": 1,
            "background.threads": 2,
            "log.cleaner.threads": 1,
            "num.recovery.threads.per.data.dir": 1,
            "message.max.bytes": 8 * 1024 * 1024 + 1024,
            "replica.fetch.max.bytes": 8 * 1024 * 1024 + 1024,
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _java(self, *arguments: str) -> list[str]:
        return ["java", f"-Xmx{HEAP}", "-Xms64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={self.directory / 'log4j2.properties'}",
                "-cp", f"{fetch(quiet=True)}/*", *arguments]

    def _prepare(self, broker: Broker) -> None:
        """The broker's config, and its storage formatted once (the cluster id and node id written in its data
        directory: a restart must find them, and must not format again)."""
        broker.directory.mkdir(parents=True, exist_ok=True)
        broker.config.write_text(self._properties(broker))
        (self.directory / "log4j2.properties").write_text(_LOG4J)
        if (broker.directory / "data" / "meta.properties").exists():
            return
        completed = subprocess.run(self._java("kafka.tools.StorageTool", "format", "--config", str(broker.config),
                                              f"--cluster-id={self.cluster_id}", "--ignore-formatted"),
                                   capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"formatting broker {broker.node_id}'s storage failed:\n{completed.stdout}"
                               f"{completed.stderr}")

    def _launch(self, index: int) -> None:
        broker = self.members[index]
        with open(broker.log, "ab") as log:
            # its own session: a Ctrl+C in the caller's terminal does not reach it; `stop` signals the process
            broker.process = subprocess.Popen(self._java("kafka.Kafka", str(broker.config)), stdout=log, stderr=log,
                                              stdin=subprocess.DEVNULL, start_new_session=True)
        broker.pid = broker.process.pid
        self._save()

    def start(self, timeout: float = START_SECONDS) -> KafkaCluster:
        """Formats (first time) and starts every broker, and waits until each has logged that it serves. The ports
        were picked free, but another process can bind one before the broker does: a first start that fails so
        is tried again on new ports (twice at most)."""
        first_start = not (self.directory / "cluster.json").exists()
        for attempt in range(3):
            try:
                return self._start_once(timeout)
            except RuntimeError:
                if not (first_start and attempt < 2 and self._port_taken()):
                    raise
                for broker in self.members:  # only what this start made: the caller's directory may hold more
                    shutil.rmtree(broker.directory, ignore_errors=True)
                (self.directory / "cluster.json").unlink(missing_ok=True)
                ports = free_ports(2 * len(self.members))
                for index, broker in enumerate(self.members):
                    broker.port, broker.controller_port = ports[2 * index], ports[2 * index + 1]
        return self

    def _port_taken(self) -> bool:
        return any(broker.log.exists() and "address already in use" in broker.log.read_text(errors="replace").lower()
                   for broker in self.members)

    def _start_once(self, timeout: float) -> KafkaCluster:
        if shutil.which("java") is None:
            raise RuntimeError("the Kafka brokers need Java 17 or later on the PATH (Debian: apt-get install "
                               "default-jre-headless)")
        self.directory.mkdir(parents=True, exist_ok=True)
        fetch()
        for broker in self.members:
            self._prepare(broker)
        marks = {}
        for index, broker in enumerate(self.members):
            if broker.running:
                continue
            marks[index] = broker.log.stat().st_size if broker.log.exists() else 0
            self._launch(index)
        try:
            self.wait_started(marks, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_started(self, marks: dict[int, int], timeout: float = START_SECONDS) -> None:
        """Waits until each broker `marks` names has logged STARTED_LINE past its log's size at launch."""
        deadline = time.monotonic() + timeout
        waiting = dict(marks)
        while waiting:
            for index, mark in list(waiting.items()):
                broker = self.members[index]
                with open(broker.log, "rb") as log:
                    log.seek(mark)
                    if STARTED_LINE.encode() in log.read():
                        del waiting[index]
                        continue
                if not broker.running:
                    raise RuntimeError(f"Kafka broker {broker.node_id} exited while starting; the end of "
                                       f"{broker.log}:\n{_tail(broker.log)}")
            if waiting and time.monotonic() > deadline:
                names = ", ".join(str(self.members[i].node_id) for i in waiting)
                raise TimeoutError(f"Kafka brokers {names} not started within {timeout:.0f} s; see "
                                   f"{self.directory}/broker*/server.log")
            time.sleep(0.2)

    def signal(self, index: int, sig: int) -> None:
        """Sends `sig` to broker `index` (SIGKILL, SIGSTOP, SIGCONT, …); after SIGKILL or SIGTERM waits until it is
        gone."""
        broker = self.members[index]
        if not broker.running or broker.pid is None:
            return
        os.kill(broker.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self._wait_gone(broker, 60 if sig == signal.SIGTERM else 10)

    def kill(self, index: int) -> None:
        self.signal(index, signal.SIGKILL)

    def pause(self, index: int) -> None:
        self.signal(index, signal.SIGSTOP)

    def resume(self, index: int) -> None:
        self.signal(index, signal.SIGCONT)

    def restart(self, index: int, timeout: float = START_SECONDS) -> None:
        """Kills broker `index` if it runs, and starts it again on its port with its data."""
        broker = self.members[index]
        if broker.running:
            os.kill(broker.pid, signal.SIGCONT)  # type: ignore[arg-type]
            self.kill(index)
        mark = broker.log.stat().st_size if broker.log.exists() else 0
        self._launch(index)
        self.wait_started({index: mark}, timeout)

    @staticmethod
    def _wait_gone(broker: Broker, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if broker.process is not None:
                try:
                    broker.process.wait(timeout=0.1)
                    return True
                except subprocess.TimeoutExpired:
                    continue
            if not broker.running:
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Stops every broker: SIGCONT (a paused one), SIGTERM (a clean shutdown), SIGKILL after 30 s."""
        for broker in self.members:
            if broker.running and broker.pid is not None:
                os.kill(broker.pid, signal.SIGCONT)
                os.kill(broker.pid, signal.SIGTERM)
        for broker in self.members:
            if broker.pid is not None and not self._wait_gone(broker, 30):
                os.kill(broker.pid, signal.SIGKILL)
                self._wait_gone(broker, 10)
        for broker in self.members:
            broker.pid = None
        if self.directory.exists():
            self._save()

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("help", "-h", "--help"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "fetch":
        print(fetch())
        return 0
    if command not in ("start", "stop", "status") or len(rest) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    cluster = KafkaCluster(Path(rest[0]))
    if command == "start":
        if all(broker.running for broker in cluster.members):
            print(f"Kafka already running from {cluster.directory}", file=sys.stderr)
        else:
            print(f"starting {cluster.brokers} Kafka brokers (data and logs in {cluster.directory})", file=sys.stderr)
            cluster.start()
            print(f"stop them with: {sys.argv[0]} stop {rest[0]}", file=sys.stderr)
        print(cluster.bootstrap)
    elif command == "stop":
        running = [broker for broker in cluster.members if broker.running]
        cluster.stop()
        print(f"stopped {len(running)} Kafka brokers (data kept in {cluster.directory})", file=sys.stderr)
    else:
        for broker in cluster.members:
            state = "running" if broker.running else "stopped"
            print(f"broker {broker.node_id}  {broker.address}  pid {broker.pid or '-'}  {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
