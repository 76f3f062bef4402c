"""`gamestream demo`: collector + processor + generator in one process, on the embedded log (or `--log URL`);
`gamestream demo --cluster`: the scale-out shape on one machine, every part its own process.

Shutdown order (Ctrl-C, SIGTERM or --duration): stop the generator, stop the collector(s) (in-flight requests
are answered), then let the processor(s) drain the log, so every acknowledged event is committed to the table
before the command returns; in the cluster, the nats-server nodes stop last.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from gamestream.api import server
from gamestream.api.app import create_app
from gamestream.demo.generator import COUNTED, AckedFile, SendStats, live_events, send
from gamestream.demo.leases import GroupView, LeaseView
from gamestream.demo.supervisor import Part, Supervisor, how_it_ended, last_line
from gamestream.log import EventLog, connect
from gamestream.process.pipeline import Pipeline
from gamestream.process.processor import ProcessorStats
from gamestream.settings import Settings

if TYPE_CHECKING:
    from gamestream.demo.kafka_cluster import KafkaCluster
    from gamestream.demo.nats_cluster import NatsCluster

TICK_S = 2.0
"""How often the demo prints its counter line."""


class DemoError(RuntimeError):
    """The demo cannot start (a port taken, a binary missing, a child that never came up): one line says why."""


@dataclass
class DemoSummary:
    url: str
    sent: SendStats
    processed: ProcessorStats
    seconds: float


async def run_demo(settings: Settings, *, port: int, rate: float | None, users: int, duration: float | None,
                   seed: int, on_started: Callable[[str], None], on_tick: Callable[[SendStats, ProcessorStats, int],
                                                                                    None],
                   on_news: Callable[[str], None] = lambda line: None) -> DemoSummary:
    """The collector (a task), the processor (a thread) and the generator (a task) in this process.

    Supervised (`gamestream.demo.supervisor`): a processor thread or generator task that fails is reported in one
    line to `on_news` and started again after a short delay (given up after repeated fast failures); a collector
    that fails is reported in one line and stops the demo (in order: every acknowledged event still committed)."""
    started = time.monotonic()
    stop = _ThreadsafeEvent(asyncio.get_running_loop())
    server.install_stop_signals(stop)
    try:  # before anything starts: a port in use is one line
        sock = server.bind(settings.host, port)
    except OSError as error:
        raise DemoError(f"the collector cannot listen on {settings.host}:{port}: {error.strerror or error}") \
            from None
    log = connect(settings)
    supervisor = Supervisor(on_news)
    processor = _ProcessorRuns(settings, log)
    processor.start()
    supervisor.add(Part("processor", start=processor.start, ended=processor.ended))
    app = create_app(settings, log)
    url = f"http://{settings.host}:{sock.getsockname()[1]}"
    collector_stop = asyncio.Event()
    serving = asyncio.create_task(server.serve(app, sock, collector_stop, settings))
    await _wait_until_up(url)
    on_started(url)

    api_key = settings.api_keys[0] if settings.api_keys else None
    generator = _Generator(url, 0)
    deadline = time.monotonic() + duration if duration else None

    def start_generator() -> None:
        generator.restart(send(url, live_events(users=users, seed=seed + 1000 * generator.runs), batch=20,
                               concurrency=4, rate=rate, duration=_left(deadline), api_key=api_key, stop=stop,
                               stats=generator.next_stats()))

    start_generator()
    supervisor.add(Part("generator", start=start_generator, ended=generator.ended))
    supervision_ends = asyncio.Event()
    supervising = asyncio.create_task(supervisor.run(supervision_ends))
    try:
        while not stop.is_set() and not (generator.finished() or supervisor.parts["generator"].given_up):
            try:
                await asyncio.wait_for(stop.wait(), TICK_S)
            except TimeoutError:
                pass
            if serving.done():
                error = None if serving.cancelled() else serving.exception()
                on_news(f"collector failed ({type(error).__name__}: {error}): stopping the demo" if error else
                        "collector stopped by itself: stopping the demo")
                break
            on_tick(generator.stats(), processor.stats, app.state.collector.backlog)
    finally:
        stop.set()
        supervisor.release(["generator"])
        await asyncio.gather(*(t for t in [generator.task] if t), return_exceptions=True)
        collector_stop.set()
        await asyncio.gather(serving, return_exceptions=True)
        supervisor.release()
        supervision_ends.set()
        await supervising
        failed_before = processor.error
        await asyncio.to_thread(processor.stop_and_join)
        if processor.error is not None and processor.error is not failed_before:
            on_news(f"processor {processor.ended()} while draining: the table may lack events the collector "
                    f"acknowledged; the next `gamestream process` commits them")
        log.close()
    return DemoSummary(url=url, sent=generator.stats(), processed=processor.stats,
                       seconds=time.monotonic() - started)


class _ProcessorRuns:
    """The plain demo's processor thread (a `Pipeline`), started again by the supervisor should it fail; its
    stats add up over its runs. A run that fails has released its partitions (`Pipeline.run`), so the next one
    takes them."""

    def __init__(self, settings: Settings, log: EventLog) -> None:
        self.settings, self.log = settings, log
        self.past = ProcessorStats()
        self.pipeline: Pipeline | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        if self.pipeline is not None:
            done = self.pipeline.stats
            self.past.events_committed += done.events_committed
            self.past.events_quarantined += done.events_quarantined
            self.past.duplicates_dropped += done.duplicates_dropped
            self.past.commits += done.commits
        self.error = None
        self.pipeline = Pipeline(self.settings, self.log, maintenance=True)
        self.thread = threading.Thread(target=self._run, args=(self.pipeline,), name="processor", daemon=True)
        self.thread.start()

    def _run(self, pipeline: Pipeline) -> None:
        try:
            pipeline.run()
        except BaseException as error:  # reported by the supervisor, in one line
            self.error = error

    def ended(self) -> str | None:
        if self.thread is None or self.thread.is_alive():
            return None
        if self.error is None:
            return "stopped by itself"
        return f"failed ({type(self.error).__name__}: {self.error})"

    @property
    def stats(self) -> ProcessorStats:
        current = self.pipeline.stats if self.pipeline else ProcessorStats()
        if not (self.past.commits or self.past.events_committed):
            return current
        return ProcessorStats(events_committed=self.past.events_committed + current.events_committed,
                              events_quarantined=self.past.events_quarantined + current.events_quarantined,
                              duplicates_dropped=self.past.duplicates_dropped + current.duplicates_dropped,
                              commits=self.past.commits + current.commits, started=self.past.started)

    def stop_and_join(self) -> None:
        """Drains the log (every acknowledged event committed) and waits for the thread."""
        if self.pipeline is not None and self.thread is not None and self.thread.is_alive():
            self.pipeline.stop(drain=True)
            self.thread.join()


def _left(deadline: float | None) -> float | None:
    return max(0.0, deadline - time.monotonic()) if deadline else None


@dataclass
class _Generator:
    """A generator: an asyncio task in the demo, started again (with a seed of its own, so its events are new
    ones) by the supervisor should it fail; its counts add up over its runs."""

    url: str
    index: int
    past: SendStats = field(default_factory=SendStats)  # the runs before this one, added up
    current: SendStats = field(default_factory=SendStats)
    task: asyncio.Task | None = None
    first_started: float = 0.0
    runs: int = 0

    def next_stats(self) -> SendStats:
        """The stats for the next run (the counts so far go to `past`)."""
        if self.runs:
            for name in COUNTED:
                setattr(self.past, name, getattr(self.past, name) + getattr(self.current, name))
            self.current = SendStats()
        return self.current

    def restart(self, sending) -> None:
        self.task = asyncio.ensure_future(sending)
        self.runs += 1
        self.first_started = self.first_started or time.monotonic()

    def stats(self) -> SendStats:
        total = SendStats()
        for name in COUNTED:
            setattr(total, name, getattr(self.past, name) + getattr(self.current, name))
        total.started = self.first_started or self.current.started
        total.finished = self.current.finished if self.finished() else 0.0
        return total

    def finished(self) -> bool:
        """Done by itself (its duration is over, or the demo was stopped), not failed."""
        return (self.task is not None and self.task.done() and not self.task.cancelled()
                and self.task.exception() is None)

    def ended(self) -> str | None:
        if self.task is None or not self.task.done() or self.finished():
            return None
        error = None if self.task.cancelled() else self.task.exception()
        return "was cancelled" if error is None else f"failed ({type(error).__name__}: {error})"


class _ThreadsafeEvent(asyncio.Event):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._owner = loop

    def set_threadsafe(self) -> None:
        self._owner.call_soon_threadsafe(self.set)


async def _wait_until_up(url: str, timeout: float = 60.0) -> None:
    """Until the collector at `url` answers its health check (`DemoError` after `timeout`: one line, on a
    machine too busy to start it)."""
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(url + "/healthz")).status_code in (200, 503):
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise DemoError(f"the collector at {url} did not answer its health check within {timeout:.0f}s")


# ----------------------------------------------------------------------------------------------------- cluster
CLUSTER_COLLECTORS = 2
CLUSTER_PROCESSORS = 2
CHILD_STOP_S = 60.0
"""How long a collector or processor gets to stop after SIGTERM (answering, committing) before it is killed."""
DRAIN_TIMEOUT_S = 120.0
"""How long the processors get to commit everything the collectors acknowledged before they are stopped."""


@dataclass
class ClusterUrls:
    log: str  # the log's URL (nats://… or kafka://…/TOPIC)
    servers: str  # what serves it, in words
    collectors: list[str]
    logs: Path  # where each child process writes its output
    pids: dict[str, int] = field(default_factory=dict)  # each child's pid at start: nats-n1…, processor-1…


@dataclass
class ClusterTick:
    """What the counter line shows, every TICK_S."""

    sent: list[SendStats]  # one per collector
    backlog: int | None  # events in the log not committed yet; None: the log cannot say now
    committed: int | None  # events the events table gained during the run; None: cannot say now
    owners: dict[str, list[int]] | None  # who holds which partitions (a child's name, or "free"); None: unknown


@dataclass
class ClusterDemoSummary:
    urls: ClusterUrls
    sent: list[SendStats]  # one per collector
    committed: int  # events the events table gained during the run
    quarantined: int  # as the processors reported on stopping
    seconds: float
    restarts: dict[str, int] = field(default_factory=dict)  # child → times it was restarted

    @property
    def accepted(self) -> int:
        return sum(stats.accepted for stats in self.sent)


@dataclass
class _Child:
    """A `gamestream` command run as a child process, its output in a file under the data directory."""

    name: str
    args: list[str]
    output: Path
    env: dict[str, str]
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, *, append: bool = False) -> int:
        """Starts it (again: `append` keeps the output of the earlier runs); its pid."""
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output, "ab" if append else "wb") as handle:
            # Its own session: a Ctrl-C in the terminal reaches only the demo, which stops the children in order
            # (a processor stopped before the collectors would leave acknowledged events behind). Parent-death
            # signal: should the demo itself be killed, the child still goes.
            self.process = subprocess.Popen([sys.executable, "-m", "gamestream", *self.args], stdout=handle,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        return self.process.pid

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def text(self) -> str:
        try:
            return self.output.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def part(self) -> Part:
        """This child as a part the supervisor restarts (on the same command line, output appended)."""
        return Part(self.name, start=lambda: self.start(append=True),
                    ended=lambda: None if self.exited() is None else how_it_ended(self.exited()),
                    why=lambda: last_line(self.output))


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the demo process dies (Linux prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


async def run_cluster_demo(settings: Settings, *, port: int, rate: float | None, users: int,
                           duration: float | None, seed: int, log_format: str,
                           on_started: Callable[[ClusterUrls], None], on_tick: Callable[[ClusterTick], None],
                           on_news: Callable[[str], None] = lambda line: None,
                           log_kind: str = "nats") -> ClusterDemoSummary:
    """Three nats-server nodes (clustered, replicas 3, fsync before every acknowledgement) under
    `<data_dir>/nats` — or, with `log_kind="kafka"`, three Kafka brokers (KRaft, replication factor 3,
    min.insync.replicas 2, fsync before every acknowledgement) under `<data_dir>/kafka` and the topic `events` —,
    two collectors (`gamestream serve --log <cluster>`) on `port` and `port + 1` (0: free
    ports), two processors (`gamestream process --log <cluster>`, the first with `--maintenance`) sharing the
    partitions, and a generator posting to each collector. The Delta tables stay under the data directory.

    Supervised (`gamestream.demo.supervisor`): a child that ends while the demo runs (killed, crashed) is reported
    in one line to `on_news` and started again after a short delay, on the same command line — a collector on
    the same port (the generators retry with the same Idempotency-Key), a nats-server node with its own port and
    data directory (JetStream's replicas catch it up; a Kafka broker likewise), a processor joining the leases (on
    Kafka: the consumer group) again (its partitions move back to it). After repeated fast failures a child is given up, in one line. A child that cannot start at
    all when the demo starts raises `DemoError` (one line).

    Stopping (Ctrl-C, SIGTERM or `duration`), in the order that loses nothing (`_stop_in_order`):
    1. the generators stop (their in-flight requests are answered);
    2. the collectors get SIGTERM and answer what they are serving;
    3. the processors commit everything in the log (the events table's txn versions reach every partition's
       last offset; a processor dying meanwhile is still restarted), then get SIGTERM;
    4. the nats-server nodes (or Kafka brokers) stop.
    """
    started = time.monotonic()
    stop = _ThreadsafeEvent(asyncio.get_running_loop())
    server.install_stop_signals(stop)
    run = _ClusterRun(settings, _LogCluster.of(log_kind, settings.data_dir), settings.data_dir / "cluster", stop,
                      Supervisor(on_news))
    try:
        await _open_cluster_log(run)
        _plan_children(run, port=port, log_format=log_format)
        await _start_children(run)
        if not stop.is_set():
            _start_generators(run, rate=rate, users=users, duration=duration, seed=seed)
            on_started(run.cluster_urls())
            run.supervising = asyncio.create_task(run.supervisor.run(run.supervision_ends))
            await _watch(run, on_tick)
    finally:
        await _stop_in_order(run)
    committed = await asyncio.to_thread(_events_in_table, settings) - run.rows_before
    return ClusterDemoSummary(urls=run.cluster_urls(), sent=run.sent(), committed=committed,
                              quarantined=_quarantined(run.processors), seconds=time.monotonic() - started,
                              restarts={part.name: part.restarts for part in run.supervisor.parts.values()
                                        if part.restarts})


@dataclass
class _ClusterRun:
    """What one `run_cluster_demo` has started so far, handed from each of its steps to the next (and to the
    stopping steps, which stop only what is there)."""

    settings: Settings
    cluster: _LogCluster
    logs_dir: Path  # where each child process writes its output
    stop: _ThreadsafeEvent
    supervisor: Supervisor
    supervision_ends: asyncio.Event = field(default_factory=asyncio.Event)
    supervising: asyncio.Task | None = None
    rows_before: int = 0
    log: EventLog | None = None
    log_settings: Settings | None = None  # `settings` with the cluster as the log; set with `log`
    leases: LeaseView | GroupView | None = None
    processors: list[_Child] = field(default_factory=list)
    collectors: list[_Child] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # the collectors', as each came up
    generators: list[_GeneratorChild] = field(default_factory=list)

    def cluster_urls(self) -> ClusterUrls:
        pids = {name: part.pids[0] for name, part in self.supervisor.parts.items() if part.pids}
        return ClusterUrls(log=self.cluster.url, servers=self.cluster.description, collectors=self.urls, logs=self.logs_dir, pids=pids)

    def sent(self) -> list[SendStats]:
        if self.generators:
            return [generator.stats() for generator in self.generators]
        return [SendStats() for _ in range(CLUSTER_COLLECTORS)]

    def processors_left(self) -> bool:
        """Whether any processor runs or will be restarted (not every one given up)."""
        parts = [self.supervisor.parts.get(child.name) for child in self.processors]
        return any(part is None or not part.given_up for part in parts) if parts else False


@dataclass
class _LogCluster:
    """The log's servers the cluster demo runs: nats-server nodes or Kafka brokers, each a supervised part."""

    kind: str  # "nats" or "kafka"
    servers: NatsCluster | KafkaCluster

    @classmethod
    def of(cls, kind: str, data_dir: Path) -> _LogCluster:
        if kind == "nats":
            from gamestream.demo.nats_cluster import NatsCluster

            return cls(kind, NatsCluster(data_dir / "nats", nodes=3))
        if kind == "kafka":
            from gamestream.demo.kafka_cluster import KafkaCluster

            return cls(kind, KafkaCluster(data_dir / "kafka", brokers=3))
        raise ValueError(f"the cluster demo runs its own NATS or Kafka cluster, not {kind!r}")

    @property
    def url(self) -> str:
        if self.kind == "kafka":
            return f"kafka://{self.servers.bootstrap}/{KAFKA_TOPIC}"  # type: ignore[union-attr]
        return self.servers.url  # type: ignore[union-attr]

    @property
    def description(self) -> str:
        if self.kind == "kafka":
            return "kafka (3 KRaft brokers, replication factor 3, min.insync.replicas 2, fsync every batch)"
        return "nats (3 nodes, replicas 3, fsync always)"

    def start(self) -> None:
        self.servers.start()

    def stop(self) -> None:
        self.servers.stop()

    def parts(self) -> list[tuple[Part, int | None]]:
        """Each node or broker as a part the supervisor restarts (the same config, port and data directory), with
        its pid now."""
        parts = []
        for index, node in enumerate(self.servers.members):
            name, output = ((f"kafka-broker{node.node_id}", node.log) if self.kind == "kafka"  # type: ignore
                            else (f"nats-{node.name}", node.directory / "nats.log"))  # type: ignore[union-attr]
            parts.append((self._part(index, name, output), node.process.pid if node.process else None))
        return parts

    def _part(self, index: int, name: str, output: Path) -> Part:
        node = self.servers.members[index]

        def start() -> int:
            self.servers._launch(index)
            return node.process.pid  # type: ignore[union-attr]

        def ended() -> str | None:
            status = None if node.process is None else node.process.poll()
            return None if status is None else how_it_ended(status)

        return Part(name, start=start, ended=ended, why=lambda: last_line(output))

    def owners_view(self, pipeline: str, partitions: int) -> LeaseView | GroupView:
        view = GroupView if self.kind == "kafka" else LeaseView
        return view(self.url, pipeline=pipeline, partitions=partitions)


KAFKA_TOPIC = "events"  # the cluster demo's topic on its own Kafka brokers


async def _open_cluster_log(run: _ClusterRun) -> None:
    """Starts the log's servers (supervised from then on) and opens the log on them; notes the events table's
    rows before the run."""
    try:
        await asyncio.to_thread(run.cluster.start)
    except Exception as error:  # a binary or Java missing, a server that exits at once (a port taken): one line
        what = "Kafka brokers" if run.cluster.kind == "kafka" else "nats-server nodes"
        raise DemoError(f"the {what} could not start: {error}") from None
    for part, pid in run.cluster.parts():
        run.supervisor.add(part, pid)
    run.log_settings = run.settings.with_(log=run.cluster.url)
    # Creates the stream (the topic) with the partition count once, before any child races to create it.
    run.log = await asyncio.to_thread(connect, run.log_settings)
    run.leases = run.cluster.owners_view(run.settings.pipeline, run.log.partitions)
    run.rows_before = await asyncio.to_thread(_events_in_table, run.settings)


def _plan_children(run: _ClusterRun, *, port: int, log_format: str) -> None:
    """The processors (the first with `--maintenance`) and the collectors (on `port`, `port + 1`; 0: free ports)
    as child processes, not started yet."""
    settings = run.settings
    env = _child_env(settings)
    common = ["--data-dir", str(settings.data_dir), "--log", run.cluster.url, "--tables", settings.tables_root,
              *(["--unsafe-no-conditional-writes"] if settings.unsafe_no_conditional_writes else [])]
    for index in range(CLUSTER_PROCESSORS):
        extra = ["--maintenance"] if index == 0 else []
        run.processors.append(_Child(f"processor-{index + 1}", ["--log-format", log_format, "process", *common,
                                                                *extra], run.logs_dir / f"processor-{index + 1}.log",
                                     env))
    for index in range(CLUSTER_COLLECTORS):
        collector_port = port + index if port else 0
        run.collectors.append(_Child(f"collector-{index + 1}", [
            "--log-format", log_format, "serve", *common, "--port", str(collector_port),
            "--host", settings.host, *(["--insecure-no-auth"] if settings.insecure_no_auth else [])],
            run.logs_dir / f"collector-{index + 1}.log", env))


async def _start_children(run: _ClusterRun) -> None:
    """Starts the processors, then the collectors (their URLs go to `run.urls`; a collector restarted later
    comes back on the same port); stops starting them when the demo is stopped meanwhile. Each is supervised
    once started."""
    # One at a time: each finds the stream, buckets and leases the ones before it created, instead of racing
    # them to create the same ones on a cluster that has just elected its leaders.
    for child in run.processors:
        run.supervisor.add(_processor_part(run, child), _start_child(child))
        if await _output_match(child, r"processing partitions", run.stop) is None:
            break  # stopped while starting
    for child in run.collectors:
        if run.stop.is_set():
            break
        run.supervisor.add(child.part(), _start_child(child))
        url = await _output_match(child, r"listening on (http://\S+?)/v1/events", run.stop)
        if url is None:
            break
        run.urls.append(url)
        child.args[child.args.index("--port") + 1] = url.rsplit(":", 1)[1]  # `--port 0`: the port it got
        await _wait_until_up(url)


def _processor_part(run: _ClusterRun, child: _Child) -> Part:
    """A processor as a supervised part, restarted only once its leases have lapsed and the other processor has
    had a round to take its partitions over (TTL + two renewal rounds + 1 s): the counter line then shows them
    move away and, once it is back, half of them return (fair share). Restarted sooner, it would win its own
    partitions back as they lapse and nothing would be seen to move."""
    part = child.part()
    ttl = max(1, math.ceil(run.settings.lease_ttl_s))
    part.min_delay_s = ttl + 2 * ttl / 3 + 1
    part.delay_note = "once its leases have lapsed: its partitions move to the other processor meanwhile"
    return part


def _start_child(child: _Child) -> int:
    return _start_child_with(child.name, child.start)


def _start_child_with(name: str, start: Callable[[], int]) -> int:
    try:
        return start()
    except OSError as error:
        raise DemoError(f"{name} could not start: {error}") from None


@dataclass
class _GeneratorChild:
    """A generator as a child process (`gamestream generate --target URL --acked FILE`), supervised like the
    others: started again after a kill with a seed of its own (new events, new eventIds) for the time left. The
    eventIds it was answered for accumulate in FILE over its runs, written as each answer arrives, so what a
    generator killed with SIGKILL had acknowledged is still known; its other counts add up over its runs."""

    index: int
    url: str
    child: _Child
    acked: Path
    seed: int
    users: int
    rate: float | None
    deadline: float | None
    past: dict[str, int] = field(default_factory=lambda: {name: 0 for name in COUNTED})
    runs: int = 0
    first_started: float = 0.0
    finished_at: float = 0.0
    _lines: int = 0
    _read_to: int = 0

    @property
    def name(self) -> str:
        return f"generator-{self.index + 1}"

    def start(self) -> int:
        if self.runs:  # the run that ended: its last counts join the past ones
            for name, value in AckedFile.read_counts(self.acked).items():
                self.past[name] += value
            self.acked.with_name(self.acked.name + ".counts").unlink(missing_ok=True)
        left = _left(self.deadline)
        self.child.args = ["generate", "--target", self.url, "--acked", str(self.acked), "--batch", "20",
                           "--concurrency", "4", "--users", str(self.users),
                           "--seed", str(self.seed + self.index + 1000 * self.runs),
                           "--duration", f"{left if left is not None else 10.0 ** 9:.3f}",
                           *(["--rate", f"{self.rate:g}"] if self.rate else [])]
        pid = self.child.start(append=self.runs > 0)
        self.runs += 1
        self.first_started = self.first_started or time.monotonic()
        return pid

    def finished(self) -> bool:
        """Done by itself (its duration over, or stopped by the demo), not killed or failed."""
        done = self.child.exited() == 0
        if done and not self.finished_at:
            self.finished_at = time.monotonic()
        return done

    def ended(self) -> str | None:
        status = self.child.exited()
        return None if status is None or status == 0 else how_it_ended(status)

    def accepted(self) -> int:
        """The events acknowledged over every run: the lines of the acked file (read on from where it was)."""
        try:
            with open(self.acked, "rb") as handle:
                handle.seek(self._read_to)
                data = handle.read()
        except OSError:
            return self._lines
        complete = data.rfind(b"\n") + 1  # a line being written counts once it is whole
        self._lines += data.count(b"\n", 0, complete)
        self._read_to += complete
        return self._lines

    def stats(self) -> SendStats:
        current = AckedFile.read_counts(self.acked)
        total = SendStats(**{name: self.past[name] + current[name] for name in COUNTED})
        total.accepted = self.accepted()
        total.events_sent = max(total.events_sent, total.accepted)  # counts lag the ids by up to half a second
        total.started = self.first_started
        total.finished = self.finished_at if self.finished() else 0.0
        return total


def _start_generators(run: _ClusterRun, *, rate: float | None, users: int, duration: float | None,
                      seed: int) -> None:
    """A generator process posting to each collector, with its share of `rate` and a seed of its own;
    supervised. The write key goes by environment (GAMESTREAM_API_KEY), never on its command line."""
    env = _child_env(run.settings)
    if run.settings.api_keys:
        env["GAMESTREAM_API_KEY"] = run.settings.api_keys[0]
    deadline = time.monotonic() + duration if duration else None
    for index, url in enumerate(run.urls):
        name = f"generator-{index + 1}"
        generator = _GeneratorChild(index, url, _Child(name, [], run.logs_dir / f"{name}.log", env),
                                    acked=run.logs_dir / f"{name}.acked", seed=seed, users=users,
                                    rate=rate / len(run.urls) if rate else None, deadline=deadline)
        generator.acked.unlink(missing_ok=True)
        generator.acked.with_name(generator.acked.name + ".counts").unlink(missing_ok=True)
        run.generators.append(generator)
        pid = _start_child_with(name, generator.start)
        run.supervisor.add(Part(name, start=generator.start, ended=generator.ended,
                                why=lambda child=generator.child: last_line(child.output)), pid)


def _generators_done(run: _ClusterRun) -> bool:
    """Every generator finished by itself (its duration over) or was given up."""
    return all(generator.finished() or run.supervisor.parts[generator.name].given_up
               for generator in run.generators)


async def _watch(run: _ClusterRun, on_tick: Callable[[ClusterTick], None]) -> None:
    """Reports progress every TICK_S until the generators are done or the demo is stopped (the supervisor
    meanwhile restarts what ends)."""
    while not _generators_done(run) and not run.stop.is_set():
        try:
            await asyncio.wait_for(run.stop.wait(), TICK_S)
        except TimeoutError:
            pass
        if run.stop.is_set():
            break
        backlog, committed, owners = await asyncio.gather(_backlog(run), _committed(run), _owners(run))
        on_tick(ClusterTick(run.sent(), backlog, committed, owners))


async def _backlog(run: _ClusterRun) -> int | None:
    """The events in the log that the processors have not committed yet; None when the log cannot say now."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(run.log.pending_events,  # type: ignore[union-attr]
                                                        run.settings.pipeline), TICK_S)
    except Exception:
        return None


async def _committed(run: _ClusterRun) -> int | None:
    """The events the events table gained since the demo started; None when the table cannot say now."""
    try:
        return await asyncio.to_thread(_events_in_table, run.settings) - run.rows_before
    except Exception:
        return None


async def _owners(run: _ClusterRun) -> dict[str, list[int]] | None:
    """Who holds which partition's lease now: a child's name (`processor-1 (old pid N)` for the lease of a
    process that is gone and has not lapsed yet), or "free"."""
    holders = await run.leases.holders() if run.leases else None
    if holders is None:
        return None
    owners: dict[str, list[int]] = {}
    for partition, pid in sorted(holders.items()):
        if pid is None:
            label = "free"
        else:
            known = run.supervisor.owner_of(pid)
            label = f"pid {pid}" if known is None else known[0] if known[1] else f"{known[0]} (old pid {pid})"
        owners.setdefault(label, []).append(partition)
    return owners


async def _stop_in_order(run: _ClusterRun) -> None:
    """The stopping steps of `run_cluster_demo`'s docstring, for whatever the run had started."""
    supervisor = run.supervisor
    # Step 1: the generators stop (SIGTERM: no new requests; those in flight are answered)
    run.stop.set()
    supervisor.release([g.name for g in run.generators])
    await _stop_children([g.child for g in run.generators])
    # Step 2: the collectors
    supervisor.release([child.name for child in run.collectors])
    await _stop_children(run.collectors)
    # Step 3: the processors, once they have committed what the collectors acknowledged (still supervised)
    if _should_drain(run):
        await asyncio.to_thread(_wait_until_committed, run.log_settings, run.log,  # type: ignore[arg-type]
                                run.processors_left)
    supervisor.release([child.name for child in run.processors])
    await _stop_children(run.processors)
    # Step 4: the log, then its servers
    supervisor.release()
    run.supervision_ends.set()
    if run.supervising is not None:
        await run.supervising
    if run.leases is not None:
        await run.leases.close()
    if run.log is not None:
        await asyncio.to_thread(run.log.close)
    await asyncio.to_thread(run.cluster.stop)


def _should_drain(run: _ClusterRun) -> bool:
    """Whether to wait for the processors to commit the log: it is open, the children were all started (the
    supervision runs) and some processor runs or will (one given up leaves its partitions to the others)."""
    return run.log is not None and run.supervising is not None and run.processors_left()


async def _stop_children(children: list[_Child]) -> None:
    """SIGTERM to every child at once, then waits for each that was started (killed after CHILD_STOP_S)."""
    for child in children:
        child.terminate()
    for child in children:
        if child.process is not None:
            await asyncio.to_thread(child.wait, CHILD_STOP_S)


def _quarantined(processors: list[_Child]) -> int:
    """The events the processors reported as quarantined on stopping (`quarantined N;` in their output, one per
    run that stopped cleanly)."""
    return sum(int(m.replace(",", "")) for child in processors
               for m in re.findall(r"quarantined ([\d,]+);", child.text()))


def _child_env(settings: Settings) -> dict[str, str]:
    """The children's environment: keys go by environment, never on a command line others can read (`ps`)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if settings.api_keys:
        env["GAMESTREAM_API_KEYS"] = ",".join(settings.api_keys)
    if settings.admin_keys:
        env["GAMESTREAM_ADMIN_KEYS"] = ",".join(settings.admin_keys)
    env.pop("GAMESTREAM_LOG", None)  # every child is given --log
    return env


async def _output_match(child: _Child, pattern: str, stop: asyncio.Event, timeout: float = 120.0) -> str | None:
    """Waits for `pattern` in a child's output (a `serve` printing its URL, a `process` its partitions); its
    first group, or the whole match. None when the demo is stopped before. `DemoError` (one line) when the child
    exits or does not get there in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop.is_set():
            return None
        match = re.search(pattern, child.text())
        if match:
            return match[1] if match.re.groups else match[0]
        if child.exited() is not None:
            why = last_line(child.output)
            raise DemoError(f"{child.name} could not start: it {how_it_ended(child.exited())}"
                            f"{f' ({why})' if why else ''}; its output: {child.output}")
        await asyncio.sleep(0.1)
    raise DemoError(f"{child.name} did not start within {timeout:.0f}s; its output: {child.output}")


def _wait_until_committed(settings: Settings, log, processors_left: Callable[[], bool]) -> None:
    """Until the events table's txn version of every partition reaches the log's last offset there: everything
    the collectors acknowledged is then in the table (the processors commit it exactly once). Gives up when no
    processor is left to do it, or after DRAIN_TIMEOUT_S."""
    from gamestream.tables import lake

    from gamestream.log import LogUnavailable

    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:  # a broker just restarted may not lead its partitions yet: asked again until the deadline
        try:
            targets = {lake.txn_app_id(settings.pipeline, p): log.last_offset(p) for p in range(log.partitions)}
            break
        except LogUnavailable:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.25)
    while time.monotonic() < deadline and processors_left():
        try:
            versions = lake.committed_versions(lake.open_table(settings.table_uri("events")), list(targets))
        except Exception:  # no table yet: nothing committed so far
            versions = {}
        if all(versions.get(app_id, 0) >= offset for app_id, offset in targets.items()):
            return
        time.sleep(0.25)


def _events_in_table(settings: Settings) -> int:
    from gamestream.tables import lake

    uri = settings.table_uri("events")
    if not lake.table_exists(uri):
        return 0
    actions = lake.open_table(uri).get_add_actions(flatten=True)
    return sum(actions.column("num_records").to_pylist()) if actions.num_rows else 0
