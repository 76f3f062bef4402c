"""`gamestream demo`: collector + processor + generator in one process, on the embedded log (or `--log URL`);
`gamestream demo --cluster`: the scale-out shape on one machine, every part its own process.

Shutdown order (Ctrl-C, SIGTERM or --duration): stop the generator, stop the collector(s) (in-flight requests
are answered), then let the processor(s) drain the log, so every acknowledged event is committed to the table
before the command returns; in the cluster, the nats-server nodes stop last.
"""

from __future__ import annotations

import asyncio
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
from gamestream.demo.generator import SendStats, live_events, send
from gamestream.log import EventLog, connect
from gamestream.process.pipeline import Pipeline
from gamestream.process.processor import ProcessorStats
from gamestream.settings import Settings

if TYPE_CHECKING:
    from gamestream.demo.nats_cluster import NatsCluster


@dataclass
class DemoSummary:
    url: str
    sent: SendStats
    processed: ProcessorStats
    seconds: float


async def run_demo(settings: Settings, *, port: int, rate: float | None, users: int, duration: float | None,
                   seed: int, on_started: Callable[[str], None], on_tick: Callable[[SendStats, ProcessorStats, int],
                                                                                    None]) -> DemoSummary:
    started = time.monotonic()
    stop = _ThreadsafeEvent(asyncio.get_running_loop())
    server.install_stop_signals(stop)
    log = connect(settings)
    processor = Pipeline(settings, log, maintenance=True)
    failures: list[BaseException] = []

    def process() -> None:
        try:
            processor.run()
        except BaseException as error:  # surfaced to the command once the collector has stopped
            failures.append(error)
            stop.set_threadsafe()

    processing = threading.Thread(target=process, name="processor", daemon=True)
    processing.start()
    app = create_app(settings, log)
    sock = server.bind(settings.host, port)
    url = f"http://{settings.host}:{sock.getsockname()[1]}"
    collector_stop = asyncio.Event()
    serving = asyncio.create_task(server.serve(app, sock, collector_stop, settings))
    await _wait_until_up(url)
    on_started(url)

    stats = SendStats()
    api_key = settings.api_keys[0] if settings.api_keys else None
    generating = asyncio.create_task(send(url, live_events(users=users, seed=seed), batch=20, concurrency=4,
                                          rate=rate, duration=duration, api_key=api_key, stop=stop, stats=stats))
    try:
        while not generating.done():
            await asyncio.wait([generating], timeout=2.0)
            backlog = app.state.collector.backlog
            on_tick(stats, processor.stats, backlog)
    finally:
        stop.set()
        await asyncio.gather(generating, return_exceptions=True)
        collector_stop.set()
        await serving
        processor.stop(drain=True)
        await asyncio.to_thread(processing.join)
        log.close()
    if failures:
        raise RuntimeError("the processor failed") from failures[0]
    return DemoSummary(url=url, sent=stats, processed=processor.stats, seconds=time.monotonic() - started)


class _ThreadsafeEvent(asyncio.Event):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._owner = loop

    def set_threadsafe(self) -> None:
        self._owner.call_soon_threadsafe(self.set)


async def _wait_until_up(url: str) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                if (await client.get(url + "/healthz")).status_code in (200, 503):
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the collector did not come up at {url}")


# ----------------------------------------------------------------------------------------------------- cluster
CLUSTER_COLLECTORS = 2
CLUSTER_PROCESSORS = 2
CHILD_STOP_S = 60.0
"""How long a collector or processor gets to stop after SIGTERM (answering, committing) before it is killed."""
DRAIN_TIMEOUT_S = 120.0
"""How long the processors get to commit everything the collectors acknowledged before they are stopped."""


@dataclass
class ClusterUrls:
    nats: str
    collectors: list[str]
    logs: Path  # where each child process writes its output


@dataclass
class ClusterDemoSummary:
    urls: ClusterUrls
    sent: list[SendStats]  # one per collector
    committed: int  # events the events table gained during the run
    quarantined: int  # as the processors reported on stopping
    seconds: float

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

    def start(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output, "wb") as handle:
            # Its own session: a Ctrl-C in the terminal reaches only the demo, which stops the children in order
            # (a processor stopped before the collectors would leave acknowledged events behind). Parent-death
            # signal: should the demo itself be killed, the child still goes.
            self.process = subprocess.Popen([sys.executable, "-m", "gamestream", *self.args], stdout=handle,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True, preexec_fn=_die_with_parent)

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


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the demo process dies (Linux prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


async def run_cluster_demo(settings: Settings, *, port: int, rate: float | None, users: int,
                           duration: float | None, seed: int, log_format: str,
                           on_started: Callable[[ClusterUrls], None],
                           on_tick: Callable[[list[SendStats], int | None], None]) -> ClusterDemoSummary:
    """Three nats-server nodes (clustered, replicas 3, fsync before every acknowledgement) under
    `<data_dir>/nats`, two collectors (`gamestream serve --log <cluster>`) on `port` and `port + 1` (0: free
    ports), two processors (`gamestream process --log <cluster>`, the first with `--maintenance`) sharing the
    partitions, and a generator posting to each collector. The Delta tables stay under the data directory.

    Stopping (Ctrl-C, SIGTERM or `duration`), in the order that loses nothing (`_stop_in_order`):
    1. the generators stop (their in-flight requests are answered);
    2. the collectors get SIGTERM and answer what they are serving;
    3. the processors commit everything in the log (the events table's txn versions reach every partition's
       last offset), then get SIGTERM;
    4. the nats-server nodes stop.
    """
    from gamestream.demo.nats_cluster import NatsCluster

    started = time.monotonic()
    stop = _ThreadsafeEvent(asyncio.get_running_loop())
    server.install_stop_signals(stop)
    run = _ClusterRun(settings, NatsCluster(settings.data_dir / "nats", nodes=3), settings.data_dir / "cluster",
                      stop, sent=[SendStats() for _ in range(CLUSTER_COLLECTORS)])
    rows_before = 0
    failure: str | None = None
    try:
        rows_before = await _open_cluster_log(run)
        _plan_children(run, port=port, log_format=log_format)
        await _start_children(run)
        if not stop.is_set():
            on_started(run.cluster_urls())
            run.generating = _start_generators(run, rate=rate, users=users, duration=duration, seed=seed)
            failure = await _watch(run, on_tick)
    finally:
        await _stop_in_order(run, failure)
    if failure:
        raise RuntimeError(failure)
    committed = await asyncio.to_thread(_events_in_table, settings) - rows_before
    return ClusterDemoSummary(urls=run.cluster_urls(), sent=run.sent, committed=committed,
                              quarantined=_quarantined(run.processors), seconds=time.monotonic() - started)


@dataclass
class _ClusterRun:
    """What one `run_cluster_demo` has started so far, handed from each of its steps to the next (and to the
    stopping steps, which stop only what is there)."""

    settings: Settings
    nats: NatsCluster
    logs_dir: Path  # where each child process writes its output
    stop: _ThreadsafeEvent
    sent: list[SendStats]  # one per collector
    log: EventLog | None = None
    log_settings: Settings | None = None  # `settings` with the cluster as the log; set with `log`
    processors: list[_Child] = field(default_factory=list)
    collectors: list[_Child] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # the collectors', as each came up
    generating: list[asyncio.Task] = field(default_factory=list)

    def cluster_urls(self) -> ClusterUrls:
        return ClusterUrls(nats=self.nats.url, collectors=self.urls, logs=self.logs_dir)


async def _open_cluster_log(run: _ClusterRun) -> int:
    """Starts the nats-server nodes and opens the log on them; returns the events table's rows before the run."""
    await asyncio.to_thread(run.nats.start)
    run.log_settings = run.settings.with_(log=run.nats.url)
    # Creates the stream with the partition count once, before any child races to create it.
    run.log = await asyncio.to_thread(connect, run.log_settings)
    return await asyncio.to_thread(_events_in_table, run.settings)


def _plan_children(run: _ClusterRun, *, port: int, log_format: str) -> None:
    """The processors (the first with `--maintenance`) and the collectors (on `port`, `port + 1`; 0: free ports)
    as child processes, not started yet."""
    settings = run.settings
    env = _child_env(settings)
    common = ["--data-dir", str(settings.data_dir), "--log", run.nats.url, "--tables", settings.tables_root,
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
    """Starts the processors, then the collectors (their URLs go to `run.urls`); stops starting them when the
    demo is stopped meanwhile."""
    # One at a time: each finds the stream, buckets and leases the ones before it created, instead of racing
    # them to create the same ones on a cluster that has just elected its leaders.
    for child in run.processors:
        child.start()
        if await _output_match(child, r"processing partitions", run.stop) is None:
            break  # stopped while starting
    for child in run.collectors:
        if run.stop.is_set():
            break
        child.start()
        url = await _output_match(child, r"listening on (http://\S+?)/v1/events", run.stop)
        if url is None:
            break
        run.urls.append(url)
        await _wait_until_up(url)


def _start_generators(run: _ClusterRun, *, rate: float | None, users: int, duration: float | None,
                      seed: int) -> list[asyncio.Task]:
    """A generator posting to each collector, with its share of `rate` and a seed of its own."""
    api_key = run.settings.api_keys[0] if run.settings.api_keys else None
    share = rate / len(run.urls) if rate else None
    return [asyncio.create_task(send(url, live_events(users=users, seed=seed + index), batch=20, concurrency=4,
                                     rate=share, duration=duration, api_key=api_key, stop=run.stop,
                                     stats=run.sent[index]))
            for index, url in enumerate(run.urls)]


async def _watch(run: _ClusterRun, on_tick: Callable[[list[SendStats], int | None], None]) -> str | None:
    """Reports progress until the generators are done or the demo is stopped; what went wrong when a child
    exited meanwhile, else None."""
    children = run.processors + run.collectors
    while not all(task.done() for task in run.generating) and not run.stop.is_set():
        await asyncio.wait(run.generating, timeout=2.0)
        dead = [child for child in children if child.exited() is not None]
        if dead:
            return f"{dead[0].name} exited with status {dead[0].exited()}: see {dead[0].output}"
        on_tick(run.sent, await _backlog(run))
    return None


async def _backlog(run: _ClusterRun) -> int | None:
    """The events in the log that the processors have not committed yet; None when the log cannot say now."""
    try:
        return await asyncio.to_thread(run.log.pending_events, run.settings.pipeline)  # type: ignore[union-attr]
    except Exception:
        return None


async def _stop_in_order(run: _ClusterRun, failure: str | None) -> None:
    """The stopping steps of `run_cluster_demo`'s docstring, for whatever the run had started."""
    # Step 1: the generators stop
    run.stop.set()
    await asyncio.gather(*run.generating, return_exceptions=True)
    # Step 2: the collectors
    await _stop_children(run.collectors)
    # Step 3: the processors, once they have committed what the collectors acknowledged
    if _should_drain(run, failure):
        await asyncio.to_thread(_wait_until_committed, run.log_settings, run.log,  # type: ignore[arg-type]
                                run.processors)
    await _stop_children(run.processors)
    # Step 4: the log, then the nats-server nodes
    if run.log is not None:
        await asyncio.to_thread(run.log.close)
    await asyncio.to_thread(run.nats.stop)


def _should_drain(run: _ClusterRun, failure: str | None) -> bool:
    """Whether to wait for the processors to commit the log: it is open, nothing failed and every processor
    still runs (a dead one would never get there)."""
    return run.log is not None and failure is None and all(child.exited() is None for child in run.processors)


async def _stop_children(children: list[_Child]) -> None:
    """SIGTERM to every child at once, then waits for each that was started (killed after CHILD_STOP_S)."""
    for child in children:
        child.terminate()
    for child in children:
        if child.process is not None:
            await asyncio.to_thread(child.wait, CHILD_STOP_S)


def _quarantined(processors: list[_Child]) -> int:
    """The events the processors reported as quarantined on stopping (`quarantined N;` in their output)."""
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
    first group, or the whole match. None when the demo is stopped before."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop.is_set():
            return None
        match = re.search(pattern, child.text())
        if match:
            return match[1] if match.re.groups else match[0]
        if child.exited() is not None:
            break
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{child.name} did not start: see {child.output}\n{child.text()[-2000:]}")


def _wait_until_committed(settings: Settings, log, processors: list[_Child]) -> None:
    """Until the events table's txn version of every partition reaches the log's last offset there: everything
    the collectors acknowledged is then in the table (the processors commit it exactly once)."""
    from gamestream.tables import lake

    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    targets = {lake.txn_app_id(settings.pipeline, p): log.last_offset(p) for p in range(log.partitions)}
    while time.monotonic() < deadline and all(child.exited() is None for child in processors):
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
