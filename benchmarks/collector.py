"""Collector throughput and acknowledgement latency, against a peer on the same server stack.

    .venv/bin/python benchmarks/collector.py [--seconds 10] [--connections 16]

Runs `gamestream serve` (validation + durable, fsync'd SQLite append before each answer) and, as the peer, a
Starlette app on the same uvicorn/uvloop/httptools stack whose endpoint reads the body and answers 200 without
looking at it: the ceiling of the HTTP stack on this machine. A small asyncio HTTP/1.1 client in this process
keeps `--connections` keep-alive connections busy (httpx would be the bottleneck). Prints events/s, requests/s
and latency p50/p99 for single events and 100-event batches, and the ratio to the peer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from gamestream.demo.generator import live_events

PEER_APP = textwrap.dedent("""
    import sys, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def ingest(request):
        await request.body()
        return Response(b'{"accepted":1,"rejected":0,"errors":[]}', media_type="application/json")

    app = Starlette(routes=[Route("/v1/events", ingest, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
                http="httptools", loop="uvloop")
""")


def start(command: list[str], url_pattern: str | None, port: int | None) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if url_pattern:
        while True:
            line = process.stderr.readline()
            if not line:
                raise RuntimeError("server did not start")
            if match := re.search(url_pattern, line):
                return process, match[1]
    return process, f"http://127.0.0.1:{port}"


async def wait_up(host: str, port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("server not reachable")


async def load(url: str, bodies: list[bytes], content_type: str, seconds: float, connections: int):
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
            head = (f"POST /v1/events HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            sent = time.perf_counter()
            writer.write(head + body)
            headers = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", headers)[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - sent)
            status = int(headers[9:12])
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection(w) for w in range(connections)))
    return latencies, statuses, time.perf_counter() - started


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    events = [json.dumps(e, separators=(",", ":")).encode() for e in live_events(users=5000, seed=3, limit=20_000)]
    singles = events[:5000]
    batches = [b"\n".join(events[i:i + 100]) for i in range(0, len(events), 100)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gamestream, url = start([sys.executable, "-m", "gamestream", "serve", "--data-dir", str(Path(tmp) / "d"),
                                 "--port", "0"], r"listening on (http://[\d.]+:\d+)", None)
        peer_port = 18000 + os.getpid() % 1000
        peer, peer_url = start([sys.executable, "-c", PEER_APP, str(peer_port)], None, peer_port)
        try:
            for name, bodies, content_type, per_request in (
                ("single events", singles, "application/json", 1),
                ("100-event batches", batches, "application/x-ndjson", 100),
            ):
                for server_name, target in (("gamestream", url), ("peer: no-op endpoint", peer_url)):
                    latencies, statuses, seconds = asyncio.run(
                        load(target, bodies, content_type, args.seconds, args.connections))
                    assert set(statuses) == {200}, statuses
                    requests_per_s = len(latencies) / seconds
                    rows.append((name, server_name, requests_per_s * per_request, requests_per_s,
                                 quantile(latencies, 0.5) * 1000, quantile(latencies, 0.99) * 1000))
        finally:
            gamestream.terminate()
            peer.terminate()
            gamestream.wait()
            peer.wait()
    print(f"{args.connections} connections, {args.seconds:.0f}s each, {os.cpu_count()} cores shared by client and server")
    print(f"{'workload':<20}{'server':<24}{'events/s':>12}{'requests/s':>12}{'p50 ms':>9}{'p99 ms':>9}")
    for row in rows:
        print(f"{row[0]:<20}{row[1]:<24}{row[2]:>12,.0f}{row[3]:>12,.0f}{row[4]:>9.2f}{row[5]:>9.2f}")
    single, single_peer, batch, batch_peer = rows
    print(f"RESULT single_eps={single[2]:.0f} single_rps={single[3]:.0f} batch_eps={batch[2]:.0f} "
          f"batch_rps={batch[3]:.0f} single_p50_ms={single[4]:.2f} single_p99_ms={single[5]:.2f} "
          f"batch_p50_ms={batch[4]:.2f} batch_p99_ms={batch[5]:.2f} "
          f"single_vs_peer={single[3] / single_peer[3]:.2f} batch_vs_peer={batch[3] / batch_peer[3]:.2f}")


if __name__ == "__main__":
    main()
