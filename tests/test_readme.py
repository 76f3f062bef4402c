"""The README's Python snippets that read the tables, run as a user runs them: each one a script in its own
interpreter, ten times, over tables filled by `gamestream load` and `gamestream process`. Every run must exit 0
and print what the tables hold.

Ten runs, because the failure this guards against is intermittent: with deltalake 1.6.3, a script that reads a
table with `DeltaTable(...).to_pyarrow_table()` does its work and then may abort at interpreter shutdown
("terminate called without an active exception", exit 134; from none to all of ten runs here, depending on the
machine's load; see gamestream/tables/read.py). The snippets read through `gamestream.tables.read` (or Polars' own
Delta reader) instead, and the fast test below refuses deltalake's pyarrow readers in them outright.

The S3 snippet runs against moto's S3 server (tests/s3_store.py), its bucket and prefix put in place of the
README's `s3://my-bucket/gamestream`. The Spark snippets need a SparkSession and a JVM; tests/test_spark.py reads
the tables from Spark.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import gamestream, write_ndjson
from s3_store import BUCKET, MotoServer, aws_environment

README = Path(__file__).resolve().parents[1] / "README.md"
RUNS = 10
README_S3 = "s3://my-bucket/gamestream"

# 3 days x 10 events, 7 devices every day; every third event a purchase: 10 purchases, 20 level starts
EVENTS = [{"eventName": "purchaseEvent" if i % 3 == 0 else "levelStart",
           "eventTime": f"2024-05-0{1 + i % 3}T10:{i:02d}:00Z",
           "eventParams": {"device_id": f"device-{i % 7}", **({"amount": 1.5} if i % 3 == 0 else {})}}
          for i in range(30)]

POLARS_COUNTS = [r"levelStart\s*┆\s*20\b", r"purchaseEvent\s*┆\s*10\b"]
# What each snippet must print, keyed by a fragment only that snippet holds.
EXPECTED = {
    'read_table("kpi_daily"': [
        re.escape("{'eventDate': datetime.date(2024, 5, 1), 'dau': 7, 'new_users': 7}"),
        re.escape("{'eventDate': datetime.date(2024, 5, 3), 'dau': 7, 'new_users': 0}"),
        r"\b10 purchases\b",
        *(rf"2024-05-0{day}\s*│\s*7\s*│" for day in (1, 2, 3)),  # DuckDB's DAU per day
    ],
    'pl.read_delta("gamestream-data/tables/events")': POLARS_COUNTS,
    f'tables="{README_S3}"': [*(rf"2024-05-0{day}\s*│\s*10\s*│" for day in (1, 2, 3)), *POLARS_COUNTS],
}


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def reads_tables(block: str) -> bool:
    return any(word in block for word in ("gamestream.tables.read", "read_delta", "deltalake", "DeltaTable",
                                          "gamestream-data", "s3://"))


def is_spark(block: str) -> bool:
    return "spark." in block


def runnable_blocks() -> list[str]:
    return [block for block in python_blocks() if reads_tables(block) and not is_spark(block)]


def _block_id(block: str) -> str:
    return next((key for key in EXPECTED if key in block), block.splitlines()[0])[:40]


def _clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without gamestream's or AWS's variables (a user's shell), plus `extra`."""
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("GAMESTREAM_", "AWS_"))}
    return {**environment, **extra}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose `gamestream-data` holds the tables of EVENTS, as the README's snippets expect."""
    folder = tmp_path_factory.mktemp("readme")
    data = folder / "gamestream-data"
    gamestream("load", str(write_ndjson(folder / "events.ndjson", EVENTS)), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    return folder


@pytest.fixture(scope="module")
def s3_tables(tmp_path_factory: pytest.TempPathFactory):
    """The same events, processed into tables on moto's S3 server: (tables URI, AWS environment)."""
    server = MotoServer()
    try:
        folder = tmp_path_factory.mktemp("readme-s3")
        environment = aws_environment(server.endpoint)
        tables = f"s3://{BUCKET}/readme"
        data = folder / "gamestream-data"
        gamestream("load", str(write_ndjson(folder / "events.ndjson", EVENTS)), data_dir=data)
        gamestream("process", "--until-idle", "--tables", tables, data_dir=data, env=environment)
        yield tables, environment
    finally:
        server.stop()


def test_the_readme_reads_tables_in_python_only_through_paths_that_exit_cleanly() -> None:
    blocks = runnable_blocks()
    assert len(blocks) >= 3, "the README's Python snippets that read tables were not found"
    for block in blocks:
        assert "DeltaTable" not in block and "to_pyarrow_" not in block, \
            f"read tables through gamestream.tables.read in the README (see its docstring):\n{block}"
        assert sum(key in block for key in EXPECTED) == 1, f"no single expected output for this snippet:\n{block}"


@pytest.mark.slow
@pytest.mark.parametrize("block", runnable_blocks(), ids=_block_id)
def test_each_readme_snippet_exits_0_ten_times_in_a_row(block: str, workdir: Path,
                                                        request: pytest.FixtureRequest) -> None:
    expected = next(patterns for key, patterns in EXPECTED.items() if key in block)
    environment = _clean_environment()
    if README_S3 in block:
        tables, aws = request.getfixturevalue("s3_tables")
        block = block.replace(README_S3, tables)
        environment.update(aws)
    script = workdir / ("snippet_" + re.sub(r"\W+", "_", request.node.callspec.id) + ".py")
    script.write_text(block)
    runs = []
    for _ in range(RUNS):
        completed = subprocess.run([sys.executable, str(script)], cwd=workdir, env=environment,
                                   capture_output=True, text=True, timeout=120)
        runs.append(completed)
    statuses = [run.returncode for run in runs]
    failed = next((run for run in runs if run.returncode != 0), None)
    assert statuses == [0] * RUNS, (f"exit statuses {statuses}; a failed run's stderr:\n"
                                    f"{failed.stderr[-2000:] if failed else ''}")
    for run in runs:
        assert "terminate called" not in run.stderr
        for pattern in expected:
            assert re.search(pattern, run.stdout), f"{pattern!r} not in the snippet's output:\n{run.stdout}"


def test_read_table_returns_what_deltalake_reads_partition_column_included(workdir: Path) -> None:
    from gamestream.tables import lake
    from gamestream.tables.read import read_table, table_uri

    data = workdir / "gamestream-data"
    for name in ("events", "kpi_daily"):
        ours = read_table(name, data_dir=data)
        theirs = lake.open_table(table_uri(name, data_dir=data)).to_pyarrow_table()
        assert ours.schema == theirs.schema
        key = "eventId" if name == "events" else "eventDate"
        assert ours.sort_by(key).to_pylist() == theirs.sort_by(key).to_pylist()
    first_day = read_table("events", data_dir=data, columns=["eventDate"],
                           filters=[("eventDate", "=", datetime.date(2024, 5, 1))])
    assert first_day.column_names == ["eventDate"] and first_day.num_rows == 10
    assert read_table("events", data_dir=data, version=0).num_rows == 0  # the table's creation, before any commit
