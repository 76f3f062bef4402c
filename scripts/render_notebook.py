"""Renders notebooks/gamestream.ipynb to docs/notebook.html from freshly generated events.

    .venv/bin/python scripts/render_notebook.py [--days 35] [--users 2000] [--events 400000] [--out docs/notebook.html]

1. generates simulated players' events for the last `--days` UTC days, ending now (`gamestream generate --out`);
2. loads them (`gamestream load`) and processes them in small batches (`process --until-idle
   --max-batch-events`), so the events table has the small files that the notebook's OPTIMIZE compacts;
3. executes the notebook with nbclient on the venv's own ipykernel (`kernel_name="python3"`, no Jupyter install
   needed), with GAMESTREAM_DATA_DIR pointing at that data directory;
4. writes the HTML (nbconvert, images inlined), stamped with a digest of the notebook's cell sources:
   `tests/test_notebook.py` fails when the committed HTML no longer matches the notebook.

The test uses the same functions on a few days of data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "gamestream.ipynb"
HTML = REPO / "docs" / "notebook.html"
DIGEST_META = "gamestream-notebook-sources"


def gamestream(*args: str, data_dir: Path, timeout: float = 600) -> str:
    """Runs `python -m gamestream <args> --data-dir <data_dir>` as a user would; its stdout."""
    completed = subprocess.run([sys.executable, "-m", "gamestream", *args, "--data-dir", str(data_dir)],
                               capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"gamestream {' '.join(args)} exited {completed.returncode}:\n"
                           f"{completed.stdout}\n{completed.stderr}")
    return completed.stdout


def generate_data(data_dir: Path, *, days: int, users: int, events: int, batch_events: int,
                  now: dt.datetime | None = None) -> None:
    """A data directory holding `events` events of `users` players over the `days` UTC days ending `now`
    (today included, so the DAU query on `current_date` finds players), processed into every table."""
    now = now or dt.datetime.now(dt.timezone.utc)
    first_day = now.date() - dt.timedelta(days=days - 1)
    span_days = (now - dt.datetime.combine(first_day, dt.time(), dt.timezone.utc)).total_seconds() / 86400
    ndjson = data_dir.parent / f"{data_dir.name}-events.ndjson"
    gamestream("generate", "--out", str(ndjson), "--events", str(events), "--users", str(users),
               "--days", f"{span_days:.6f}", "--start", first_day.isoformat(), data_dir=data_dir)
    try:
        gamestream("load", str(ndjson), data_dir=data_dir)
    finally:
        ndjson.unlink(missing_ok=True)
    gamestream("process", "--until-idle", "--max-batch-events", str(batch_events), data_dir=data_dir)


def execute(data_dir: Path, *, notebook: Path = NOTEBOOK, cell_timeout: float = 120):
    """The notebook executed against `data_dir` (an nbformat node with outputs); raises
    nbclient.exceptions.CellExecutionError at the first cell that fails (a failed `assert` included)."""
    import nbformat
    from nbclient import NotebookClient

    node = nbformat.read(notebook, as_version=4)
    previous = os.environ.get("GAMESTREAM_DATA_DIR")
    os.environ["GAMESTREAM_DATA_DIR"] = str(data_dir.absolute())  # the kernel inherits this environment
    try:
        NotebookClient(node, timeout=cell_timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(notebook.parent)}}).execute()
    finally:
        if previous is None:
            os.environ.pop("GAMESTREAM_DATA_DIR", None)
        else:
            os.environ["GAMESTREAM_DATA_DIR"] = previous
    return node


def sources_digest(node) -> str:
    """A digest of the cells' kinds and sources: what the rendered HTML must have been made from."""
    cells = [[cell.cell_type, cell.source] for cell in node.cells]
    return "sha256:" + hashlib.sha256(json.dumps(cells, ensure_ascii=False).encode()).hexdigest()


def to_html(node) -> str:
    """The executed notebook as one self-contained HTML page (images inlined), stamped with `sources_digest`."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(node)
    stamp = f'<meta name="{DIGEST_META}" content="{sources_digest(node)}">'
    return body.replace("<head>", f"<head>\n{stamp}", 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=35)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--batch-events", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=HTML)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gamestream-notebook-") as folder:
        data_dir = Path(folder) / "data"
        generate_data(data_dir, days=options.days, users=options.users, events=options.events,
                      batch_events=options.batch_events)
        node = execute(data_dir)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(to_html(node))
    print(f"wrote {options.out} ({options.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
