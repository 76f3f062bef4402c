"""What a new user meets on the command line: --version, one-line errors for an unusable data directory,
read-only commands on a read-only copy, `./dev` running from the caller's directory."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import gamestream, write_ndjson

REPO = Path(__file__).resolve().parents[1]


def test_version_is_printed() -> None:
    completed = subprocess.run([sys.executable, "-m", "gamestream", "--version"], capture_output=True, text=True,
                               timeout=60)
    assert completed.returncode == 0
    assert completed.stdout.startswith("gamestream, version ")


POOL_PROBE = """
import sys
import click
from gamestream.cli import app

@app.cli.command("pool-probe")
def pool_probe():
    import os
    threads = len(os.listdir("/proc/self/task"))
    import numpy
    started = len(os.listdir("/proc/self/task")) - threads  # by numpy's import
    import pyarrow
    click.echo(pyarrow.default_memory_pool().backend_name)
    click.echo(os.environ["OPENBLAS_NUM_THREADS"])
    click.echo(started)

sys.argv = ["gamestream", "pool-probe"]
app.main()
"""


@pytest.mark.parametrize(("given", "expected"), [(None, "system"), ("jemalloc", "jemalloc")])
def test_commands_give_arrow_the_system_allocator_unless_the_user_chose_one(given: str | None,
                                                                              expected: str) -> None:
    """`main` sets ARROW_DEFAULT_MEMORY_POOL=system before pyarrow is imported (less memory and CPU for the
    processor than Arrow's mimalloc, docs/configuration.md); a pool the user chose is kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL", "OPENBLAS_NUM_THREADS")}
    if given is not None:
        env["ARROW_DEFAULT_MEMORY_POOL"] = given
    completed = subprocess.run([sys.executable, "-c", POOL_PROBE], capture_output=True, text=True, timeout=60,
                               env=env)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split()[0] == expected


@pytest.mark.parametrize("given", [None, "2"])
def test_commands_keep_numpys_openblas_from_starting_threads_unless_the_user_chose_a_number(
        given: str | None) -> None:
    """`main` sets OPENBLAS_NUM_THREADS=1 before numpy is imported: OpenBLAS's threads, started at import, spin
    idle (~0.09 s of CPU a process, docs/configuration.md). Here importing numpy starts no thread; a number the
    user chose is kept (and, on a machine of 2 cores or more, gives OpenBLAS its threads)."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    completed = subprocess.run([sys.executable, "-c", POOL_PROBE], capture_output=True, text=True, timeout=60,
                               env=env)
    assert completed.returncode == 0, completed.stderr
    _, setting, started = completed.stdout.split()
    assert setting == (given or "1")
    if given is None:
        assert started == "0"
    elif (os.cpu_count() or 1) >= 2:
        assert int(started) >= 1  # the probe sees OpenBLAS's threads when they exist


@contextlib.contextmanager
def read_only_view(source: Path, view: Path):
    """A read-only bind mount of `source` at `view` (root only): nothing under it can be written, not even by
    root, as on a read-only volume."""
    view.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(source), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root (CI runs as root)")
def test_read_only_data_dir_gives_one_line_and_readers_still_work(tmp_path: Path) -> None:
    data = tmp_path / "data"
    gamestream("generate", "--to-log", "--events", "500", data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    with read_only_view(data, tmp_path / "ro") as ro:
        writers = [("process", "--until-idle"), ("load", str(write_ndjson(tmp_path / "e.ndjson", []))),
                   ("demo", "--duration", "1", "--port", "0"), ("serve", "--port", "0"),
                   ("optimize",), ("vacuum",), ("generate", "--to-log", "--events", "10")]
        for args in writers:
            completed = gamestream(*args, data_dir=ro, check=False, timeout=120)
            assert completed.returncode == 2, (args, completed.stdout, completed.stderr)
            assert "Traceback" not in completed.stderr, args
            lines = [line for line in completed.stderr.splitlines() if line.strip()]
            assert len(lines) == 1, (args, completed.stderr)
            assert str(ro) in lines[0] and "Read-only file system" in lines[0], (args, lines[0])

        status = gamestream("status", data_dir=ro, check=False)
        assert status.returncode == 0, status.stderr
        assert "Traceback" not in status.stderr
        assert "500" in status.stdout  # the events table's rows are still shown
        dry = gamestream("vacuum", "--dry-run", data_dir=ro, check=False)
        assert dry.returncode == 0, dry.stderr
        assert "would delete 0 unreferenced file(s)" in dry.stdout
        counted = gamestream("sql", "select count(*) as n from events", "--format", "csv", data_dir=ro)
        assert counted.stdout.splitlines() == ["n", "500"]
    assert not any(tmp_path.glob("ro/**/.write-probe-*"))


def test_status_labels_log_offsets_as_offsets(tmp_path: Path) -> None:
    data = tmp_path / "data"
    gamestream("generate", "--to-log", "--events", "300", data_dir=data)
    status = gamestream("status", data_dir=data).stdout
    assert "appended up to (offset)" in status and "committed up to (offset)" in status
    assert "events not yet committed" in status and "not event counts" in status


def test_dev_runs_commands_in_the_callers_directory(tmp_path: Path) -> None:
    """`./dev gamestream load my.ndjson` from elsewhere finds my.ndjson, and a relative --data-dir is the
    caller's."""
    write_ndjson(tmp_path / "my.ndjson", [{"eventName": "levelStart", "eventParams": {"device_id": "d1"}},
                                          {"eventName": "levelStart", "eventParams": {"device_id": 5}}])
    completed = subprocess.run([str(REPO / "dev"), "gamestream", "load", "my.ndjson", "--data-dir", "here"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    assert "1 accepted" in completed.stdout and "1 rejected" in completed.stdout
    assert (tmp_path / "here" / "log").is_dir()
    assert not (REPO / "here").exists()


def test_sql_text_output_rounds_money_and_json_stays_exact(tmp_path: Path) -> None:
    import json

    amounts = [0.1, 0.2]  # 0.30000000000000004 in binary floating point
    events = [{"eventName": "purchaseEvent", "eventParams": {"device_id": f"d{i}", "amount": a}}
              for i, a in enumerate(amounts)]
    data = tmp_path / "data"
    gamestream("load", str(write_ndjson(tmp_path / "buys.ndjson", events)), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    query = "select sum(eventParams.amount) as bookings, sum(eventParams.amount) / 7 as per_day from events"
    exact = json.loads(gamestream("sql", query, "--format", "json", data_dir=data).stdout)[0]
    assert exact["bookings"] == 0.30000000000000004  # the exact double, noise and all
    table = gamestream("sql", query, data_dir=data).stdout
    assert "0.30 " in table and "0.3000000" not in table
    assert f"{exact['per_day']:.6f}".rstrip("0") in table
    csv_lines = gamestream("sql", query, "--format", "csv", data_dir=data).stdout.splitlines()
    assert csv_lines == ["bookings,per_day", f"{sum(amounts):.2f},{exact['per_day']:.6f}".rstrip("0")]


def test_process_logs_json_lines_and_serves_its_metrics(tmp_path: Path) -> None:
    """`--log-format json` gives one JSON object per stderr line (lifecycle with its context), and
    `process --metrics-port` serves the processor's Prometheus figures while it runs."""
    import json
    import re
    import signal
    import time

    import httpx

    data = tmp_path / "data"
    gamestream("generate", "--to-log", "--events", "1200", data_dir=data)
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gamestream", "--log-format", "json", "process", "--data-dir", str(data),
             "--metrics-port", "0"], stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + 60
        committed = None
        while time.monotonic() < deadline and process.poll() is None:
            match = re.search(r"metrics on (http://[\d.]+:\d+/metrics)", err.read_text())
            if match:
                text = httpx.get(match[1], timeout=5).text
                found = re.search(r"^gamestream_events_committed_total (\S+)$", text, re.MULTILINE)
                committed = float(found[1]) if found else None
                # the lag gauges are refreshed every few seconds: the last commit's may not be in yet
                if committed == 1200 and re.search(r'^gamestream_log_lag_events\{partition="0"\} 0', text,
                                                   re.MULTILINE):
                    break
            time.sleep(0.2)
        assert committed == 1200, err.read_text()
        assert re.search(r'^gamestream_commits_total\{table="events"\} [1-9]', text, re.MULTILINE)
        assert re.search(r'^gamestream_log_lag_events\{partition="0"\} 0', text, re.MULTILINE)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0
    records = [json.loads(line) for line in err.read_text().splitlines() if line.startswith("{")]
    started = [r for r in records if r["message"] == "processor started"]
    assert started and started[0]["logger"] == "gamestream.process.processor" and started[0]["level"] == "INFO"
    assert any(r["message"] == "processor stopped" for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
