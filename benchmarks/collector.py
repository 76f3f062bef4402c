"""Where the collector's CPU goes: server CPU per acknowledged event, by layer, request size, encoding and
connections (issue "the ingest tier at a fraction of its cost").

    .venv/bin/python benchmarks/collector.py [--seconds 5] [--sizes 1,10,100,500] [--connections 8]
        [--encodings plain,gzip] [--servers noop-starlette,noop-asgi,stubbed-python,collector-python,stubbed,collector]

Servers, each its own process, one worker:
- `noop-starlette`: a Starlette route on uvicorn (uvloop, httptools) that reads the body and answers 200 without
  looking at it (the HTTP stack with Starlette's routing);
- `noop-asgi`: the same as a raw ASGI callable (the HTTP stack alone);
- `stubbed-python`: gamestream's whole collector app on uvicorn (`create_app`, served by `api.server.serve` with
  `--front python`, guard and all) with a log whose appends are acknowledged at once and stored nowhere:
  everything but the durable append;
- `collector-python`: `gamestream serve --front python` on the embedded log (group-committed, fsync'd before
  each answer);
- `stubbed` and `collector`: the same two with the native front (`serve`'s default, `api.front`).

A small asyncio HTTP/1.1 client in this process keeps `--connections` keep-alive connections busy with bodies of
`size` events (NDJSON; one JSON object for 1), plain or gzip'd, each event with a fresh eventId. Per run: the
server's CPU (utime + stime of all its threads, from /proc/<pid>/stat) per acknowledged event and per request,
the client's CPU apart (this process), acknowledged events/s, latency p50/p99, and for the collector the log's
group commits (one fsync each) per second, from its /metrics. Client and server share the machine's cores: the
CPU figures are the point, the rates are lower bounds.

The last line: `RESULT collector_us_per_event_10=… collector_us_per_event_100=…` (plain, the first --connections).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

from gamestream.demo.generator import live_events

ANSWER = b'{"accepted":1,"rejected":0,"errors":[]}'

NOOP_STARLETTE = textwrap.dedent("""
    import sys, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def ingest(request):
        await request.body()
        return Response(%r, media_type="application/json")

    app = Starlette(routes=[Route("/v1/events", ingest, methods=["POST"])])
    print("listening on http://127.0.0.1:" + sys.argv[1], file=sys.stderr, flush=True)
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
                http="httptools", loop="uvloop")
""" % ANSWER)

NOOP_ASGI = textwrap.dedent("""
    import sys, uvicorn

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d")]})
        await send({"type": "http.response.body", "body": %r})

    print("listening on http://127.0.0.1:" + sys.argv[1], file=sys.stderr, flush=True)
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
                http="httptools", loop="uvloop", lifespan="off")
""" % (len(ANSWER), ANSWER))

NOOP_GRANIAN = textwrap.dedent("""
    import asyncio, sys
    from granian.constants import Interfaces
    from granian.server.embed import Server

    class App:  # RSGI: the body read in one await, the answer in one call
        async def __rsgi__(self, scope, protocol):
            await protocol()
            protocol.response_bytes(200, [("content-type", "application/json")], %r)

    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d")]})
        await send({"type": "http.response.body", "body": %r})

    rsgi = sys.argv[2] == "rsgi"
    server = Server(App() if rsgi else asgi, address="127.0.0.1", port=int(sys.argv[1]),
                    interface=Interfaces.RSGI if rsgi else Interfaces.ASGI, log_enabled=False, websockets=False)
    print("listening on http://127.0.0.1:" + sys.argv[1], file=sys.stderr, flush=True)
    asyncio.run(server.serve())
""" % (ANSWER, len(ANSWER), ANSWER))

STUBBED = textwrap.dedent("""
    import asyncio, sys
    from concurrent.futures import Future
    from pathlib import Path

    from gamestream.api import server
    from gamestream.api.app import create_app
    from gamestream.log import AppendResult
    from gamestream.log.sqlite import SqliteEventLog
    from gamestream.settings import Settings

    class AcknowledgingLog(SqliteEventLog):
        # every append acknowledged at once, stored nowhere: the collector without its durable append
        def submit(self, records, idempotency=None):
            done = Future()
            done.set_result(AppendResult(offsets=[0] * len(records)))
            return done

        def append_group_now(self, group):  # the native front's appends
            return [AppendResult(offsets=[0] * len(records)) for records, _ in group]

    settings = Settings.from_env(data_dir=Path(sys.argv[1]), front=sys.argv[2])
    app = create_app(settings, log=AcknowledgingLog(settings.data_dir / "log", partitions=4))
    sock = server.bind("127.0.0.1", 0)
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr, flush=True)

    async def main():
        stop = asyncio.Event()
        server.install_stop_signals(stop)
        await server.serve(app, sock, stop, settings)

    server.run(main())
""")


def start(name: str, work: Path) -> tuple[subprocess.Popen, str]:
    port = str(18000 + (os.getpid() + len(name)) % 1000)
    command = {
        "noop-starlette": [sys.executable, "-c", NOOP_STARLETTE, port],
        "noop-asgi": [sys.executable, "-c", NOOP_ASGI, port],
        "noop-granian-rsgi": [sys.executable, "-c", NOOP_GRANIAN, port, "rsgi"],
        "noop-granian-asgi": [sys.executable, "-c", NOOP_GRANIAN, port, "asgi"],
        "stubbed-python": [sys.executable, "-c", STUBBED, str(work / name), "python"],
        "collector-python": [sys.executable, "-m", "gamestream", "serve", "--front", "python", "--data-dir",
                             str(work / name), "--port", "0"],
        "stubbed": [sys.executable, "-c", STUBBED, str(work / name), "native"],
        "collector": [sys.executable, "-m", "gamestream", "serve", "--front", "native", "--data-dir",
                      str(work / name), "--port", "0"],
    }[name]
    # no processor drains the log here: at the default bound (5M events) the later runs would be answered 503
    env = {**os.environ, "GAMESTREAM_MAX_BACKLOG_EVENTS": str(10**12)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    while True:
        line = process.stderr.readline()
        if not line:
            raise RuntimeError(f"{name} did not start")
        if match := re.search(r"listening on (http://[\d.]+:\d+)", line):
            return process, match[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_up(host: str, port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("server not reachable")


async def load(url: str, bodies: list[bytes], headers: str, seconds: float, connections: int):
    host, port = url.removeprefix("http://").split(":")
    await wait_up(host, int(port))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds

    async def connection(worker: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        i = worker
        while time.perf_counter() < deadline:
            body = bodies[i % len(bodies)]
            i += connections
            head = (f"POST /v1/events HTTP/1.1\r\nHost: {host}\r\n{headers}"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            sent = time.perf_counter()
            writer.write(head + body)
            answer = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", answer)[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - sent)
            status = int(answer[9:12])
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection(w) for w in range(connections)))
    return latencies, statuses, time.perf_counter() - started


def group_commits(url: str) -> float | None:
    """The collector's log group commits so far (its /metrics), or None for a server without them."""
    import urllib.request

    try:
        text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    except OSError:
        return None
    match = re.search(r"^gamestream_log_group_commits (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else None


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


def bodies_of(size: int, encoding: str, count: int = 400) -> list[bytes]:
    """`count` request bodies of `size` events, each event with its own eventId (fresh across bodies)."""
    events = live_events(users=5000, seed=3, limit=size * count)
    lines = []
    for event in events:
        event["eventId"] = str(uuid.uuid4())
        lines.append(json.dumps(event, separators=(",", ":")).encode())
    plain = [b"\n".join(lines[i:i + size]) for i in range(0, len(lines), size)]
    return [gzip.compress(b, 1) for b in plain] if encoding == "gzip" else plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sizes", default="1,10,100,500")
    parser.add_argument("--connections", default="8", help="comma-separated, e.g. 8,32,128")
    parser.add_argument("--encodings", default="plain,gzip")
    parser.add_argument("--servers", default="noop-starlette,noop-asgi,stubbed-python,collector-python,stubbed,"
                                             "collector")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("COLLECTOR_RESULTS.md"),
                        help="where to write the Markdown table ('-' to skip)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    connections = [int(c) for c in args.connections.split(",")]
    encodings = args.encodings.split(",")
    servers = args.servers.split(",")
    bodies = {(size, enc): bodies_of(size, enc) for size in sizes for enc in encodings}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in servers:
            process, url = start(name, Path(tmp))
            try:
                for size in sizes:
                    for enc in encodings:
                        headers = ("Content-Type: application/json\r\n" if size == 1 else
                                   "Content-Type: application/x-ndjson\r\n")
                        if enc == "gzip":
                            headers += "Content-Encoding: gzip\r\n"
                        for conns in connections:
                            commits_before = group_commits(url) if name.startswith("collector") else None
                            server_before, client_before = cpu_seconds(process.pid), time.process_time()
                            latencies, statuses, seconds = asyncio.run(
                                load(url, bodies[size, enc], headers, args.seconds, conns))
                            server_cpu = cpu_seconds(process.pid) - server_before
                            client_cpu = time.process_time() - client_before
                            commits_after = group_commits(url) if name.startswith("collector") else None
                            assert set(statuses) == {200}, (name, size, enc, statuses)
                            events = len(latencies) * size
                            rows.append({
                                "server": name, "size": size, "encoding": enc, "connections": conns,
                                "eps": events / seconds, "rps": len(latencies) / seconds,
                                "server_us_event": server_cpu / events * 1e6,
                                "server_us_request": server_cpu / len(latencies) * 1e6,
                                "client_us_event": client_cpu / events * 1e6,
                                "p50_ms": quantile(latencies, 0.5) * 1000, "p99_ms": quantile(latencies, 0.99) * 1000,
                                "fsync_per_s": ((commits_after - commits_before) / seconds
                                                if commits_before is not None and commits_after is not None
                                                else None)})
                            print(_line(rows[-1]), flush=True)
            finally:
                process.terminate()
                process.wait()
    print(f"\n{os.cpu_count()} cores shared by the client and the server; {args.seconds:g} s a run")
    print(HEADER)
    for row in rows:
        print(_line(row))
    result = {f"collector_us_per_event_{r['size']}": r["server_us_event"] for r in rows
              if r["server"] == "collector" and r["encoding"] == encodings[0] and r["connections"] == connections[0]}
    print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in result.items()))
    if str(args.results) != "-":
        write_results(args.results, rows, args)


def write_results(path: Path, rows: list[dict], args: argparse.Namespace) -> None:
    """The table as Markdown, with the command and the machine."""
    import datetime as dt
    import platform

    columns = ["server", "events", "enc", "conns", "events/s", "req/s", "server µs/event", "server µs/request",
               "client µs/event", "p50 ms", "p99 ms", "fsync/s"]
    lines = [
        "# Collector CPU, by layer (`benchmarks/collector.py`)", "",
        f"Written by `benchmarks/collector.py --seconds {args.seconds:g} --sizes {args.sizes} --connections "
        f"{args.connections} --encodings {args.encodings}` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC; {os.cpu_count()} cores shared by the client and the server, {platform.python_version()}.", "",
        "Server CPU is utime + stime of every thread of the server process (/proc), over the acknowledged "
        "events; the client's CPU is apart. `collector` is `gamestream serve` on the embedded log (fsync'd before "
        "each answer) with its native front, `collector-python` with `--front python`; `stubbed` and "
        "`stubbed-python` are the same with the log append acknowledged at once.", "",
        "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        fsync = f"{r['fsync_per_s']:,.0f}" if r["fsync_per_s"] is not None else "—"
        lines.append(f"| {r['server']} | {r['size']} | {r['encoding']} | {r['connections']} | {r['eps']:,.0f} | "
                     f"{r['rps']:,.0f} | {r['server_us_event']:.2f} | {r['server_us_request']:.1f} | "
                     f"{r['client_us_event']:.2f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {fsync} |")
    path.write_text("\n".join(lines) + "\n")


HEADER = (f"{'server':<17}{'events':>7}{'enc':>6}{'conns':>6}{'events/s':>11}{'req/s':>9}{'srv µs/ev':>10}"
          f"{'srv µs/req':>11}{'cli µs/ev':>10}{'p50 ms':>8}{'p99 ms':>8}{'fsync/s':>9}")


def _line(row: dict) -> str:
    fsync = f"{row['fsync_per_s']:>9,.0f}" if row["fsync_per_s"] is not None else f"{'-':>9}"
    return (f"{row['server']:<17}{row['size']:>7}{row['encoding']:>6}{row['connections']:>6}{row['eps']:>11,.0f}"
            f"{row['rps']:>9,.0f}{row['server_us_event']:>10.2f}{row['server_us_request']:>11.1f}"
            f"{row['client_us_event']:>10.2f}{row['p50_ms']:>8.2f}{row['p99_ms']:>8.2f}{fsync}")


if __name__ == "__main__":
    main()
