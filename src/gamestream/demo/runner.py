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
from typing import Callable

from gamestream.api import server
from gamestream.api.app import create_app
from gamestream.demo.generator import SendStats, live_events, send
from gamestream.log import connect
from gamestream.process.pipeline import Pipeline
from gamestream.process.processor import ProcessorStats
from gamestream.settings import Settings


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

    Stopping (Ctrl-C, SIGTERM or `duration`), in the order that loses nothing:
    1. the generators stop (their in-flight requests are answered);
    2. the collectors get SIGTERM and answer what they are serving;
    3. the processors commit everything in the log (the events table's txn versions reach every partition's
       last offset), then get SIGTERM;
    4. the nats-server nodes stop.
    """
    from gamestream.demo.nats_cluster import NatsCluster

    started = time.monotonic()
    loop = asyncio.get_running_loop()
    stop = _ThreadsafeEvent(loop)
    server.install_stop_signals(stop)
    logs_dir = settings.data_dir / "cluster"
    cluster = NatsCluster(settings.data_dir / "nats", nodes=3)
    children: list[_Child] = []
    log = None
    sent = [SendStats() for _ in range(CLUSTER_COLLECTORS)]
    generating: list[asyncio.Task] = []
    collectors: list[_Child] = []
    processors: list[_Child] = []
    rows_before = 0
    urls: list[str] = []
    failure: str | None = None
    try:
        await asyncio.to_thread(cluster.start)
        cluster_settings = settings.with_(log=cluster.url)
        # Creates the stream with the partition count once, before any child races to create it.
        log = await asyncio.to_thread(connect, cluster_settings)
        rows_before = await asyncio.to_thread(_events_in_table, settings)
        env = _child_env(settings)
        common = ["--data-dir", str(settings.data_dir), "--log", cluster.url, "--tables", settings.tables_root,
                  *(["--unsafe-no-conditional-writes"] if settings.unsafe_no_conditional_writes else [])]
        for index in range(CLUSTER_PROCESSORS):
            extra = ["--maintenance"] if index == 0 else []
            processors.append(_Child(f"processor-{index + 1}", ["--log-format", log_format, "process", *common,
                                                                 *extra], logs_dir / f"processor-{index + 1}.log",
                                     env))
        for index in range(CLUSTER_COLLECTORS):
            collector_port = port + index if port else 0
            collectors.append(_Child(f"collector-{index + 1}", [
                "--log-format", log_format, "serve", *common, "--port", str(collector_port),
                "--host", settings.host, *(["--insecure-no-auth"] if settings.insecure_no_auth else [])],
                logs_dir / f"collector-{index + 1}.log", env))
        children = processors + collectors
        # One at a time: each finds the stream, buckets and leases the ones before it created, instead of racing
        # them to create the same ones on a cluster that has just elected its leaders.
        for child in processors:
            child.start()
            if await _output_match(child, r"processing partitions", stop) is None:
                break  # stopped while starting
        for child in collectors:
            if stop.is_set():
                break
            child.start()
            url = await _output_match(child, r"listening on (http://\S+?)/v1/events", stop)
            if url is None:
                break
            urls.append(url)
            await _wait_until_up(url)
        if not stop.is_set():
            on_started(ClusterUrls(nats=cluster.url, collectors=urls, logs=logs_dir))

            api_key = settings.api_keys[0] if settings.api_keys else None
            share = rate / len(urls) if rate else None
            generating = [asyncio.create_task(send(url, live_events(users=users, seed=seed + index), batch=20,
                                                   concurrency=4, rate=share, duration=duration, api_key=api_key,
                                                   stop=stop, stats=sent[index]))
                          for index, url in enumerate(urls)]
            while not all(task.done() for task in generating) and not stop.is_set():
                await asyncio.wait(generating, timeout=2.0)
                dead = [child for child in children if child.exited() is not None]
                if dead:
                    failure = f"{dead[0].name} exited with status {dead[0].exited()}: see {dead[0].output}"
                    break
                try:
                    backlog: int | None = await asyncio.to_thread(log.pending_events, settings.pipeline)
                except Exception:
                    backlog = None
                on_tick(sent, backlog)
    finally:
        stop.set()
        await asyncio.gather(*generating, return_exceptions=True)
        for child in collectors:
            child.terminate()
        for child in collectors:
            if child.process is not None:
                await asyncio.to_thread(child.wait, CHILD_STOP_S)
        if log is not None and failure is None and all(c.exited() is None for c in processors):
            await asyncio.to_thread(_wait_until_committed, cluster_settings, log,  # type: ignore[possibly-undefined]
                                    processors)
        for child in processors:
            child.terminate()
        for child in processors:
            if child.process is not None:
                await asyncio.to_thread(child.wait, CHILD_STOP_S)
        if log is not None:
            await asyncio.to_thread(log.close)
        await asyncio.to_thread(cluster.stop)
    if failure:
        raise RuntimeError(failure)
    committed = await asyncio.to_thread(_events_in_table, settings) - rows_before
    quarantined = sum(int(m.replace(",", "")) for child in processors
                      for m in re.findall(r"quarantined ([\d,]+);", child.text()))
    return ClusterDemoSummary(urls=ClusterUrls(nats=cluster.url, collectors=urls, logs=logs_dir), sent=sent,
                              committed=committed, quarantined=quarantined, seconds=time.monotonic() - started)


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
