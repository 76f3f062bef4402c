"""Regenerates docs/dashboard.png: the dashboard over 45 days of players who install and come back less and less.

    .venv/bin/python scripts/dashboard_screenshot.py [--data-dir DIR] [--out docs/dashboard.png]

Each day a new cohort of players installs (their first events); on the days after, a shrinking share of them plays
again (about 45 % on day 1, 17 % on day 7, 8 % on day 30), so the retention table decays as a real game's does.
The events (up to now, UTC) are loaded with `gamestream load` and processed with `gamestream process --until-idle`,
which writes the KPI tables, then `gamestream serve` shows them to a headless Chromium (Debian's `chromium`,
driven by Playwright, as in tests/browser.py) and the full page is saved. Without --data-dir the data lives in a
temporary folder that is removed afterwards. Takes a few minutes (about a million events).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from gamestream.demo.generator import simulate

REPO = Path(__file__).resolve().parents[1]
UTC = dt.timezone.utc
EVENTS_PER_USER_DAY = 60  # about four sessions of a dozen-odd events for each player who plays that day


def returning_share(days_since_install: int) -> float:
    """The share of a cohort that plays again N days after installing: all of it on day 0, then a power-law decay
    (0.45 on day 1, 0.17 on day 7, 0.08 on day 30)."""
    return 1.0 if days_since_install == 0 else 0.45 * days_since_install ** -0.5


def cohort_events(*, days: int, cohort_users: int, now: dt.datetime, seed: int = 16) -> Iterator[dict]:
    """The events of `days` days up to `now`, one day at a time in eventTime order. Cohort `i` installs on day i;
    on each later day the first round(cohort_users × share) of its players play (`simulate` with the same seed
    makes the same players, and fewer of them are the first ones)."""
    first = now.date() - dt.timedelta(days=days - 1)
    for d in range(days):
        midnight = dt.datetime.combine(first + dt.timedelta(days=d), dt.time(), UTC)
        today: list[dict] = []
        for cohort in range(d + 1):
            users = round(cohort_users * returning_share(d - cohort))
            if users:
                today += simulate(events=users * EVENTS_PER_USER_DAY, users=users, seed=seed * 1000 + cohort,
                                  start=midnight, days=1)
        today = [e for e in today if e["eventTime"] <= now.isoformat().replace("+00:00", "Z")]
        today.sort(key=lambda e: e["eventTime"])
        yield from today


def gamestream(*args: str, data_dir: Path) -> None:
    subprocess.run([sys.executable, "-m", "gamestream", *args, "--data-dir", str(data_dir)], check=True,
                   stdout=subprocess.DEVNULL)


def screenshot(data_dir: Path, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    server = subprocess.Popen([sys.executable, "-m", "gamestream", "serve", "--data-dir", str(data_dir),
                               "--port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in server.stderr:
            if match := re.search(r"listening on (http://[\d.]+:\d+)", line):
                url = match[1]
                break
        if url is None:
            raise RuntimeError("gamestream serve did not start")
        executable = shutil.which("chromium") or "/usr/bin/chromium"
        with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                profile, executable_path=executable, headless=True, viewport={"width": 1280, "height": 900},
                args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.wait_for_selector("[data-testid=cohorts] tr[data-cohort]", timeout=60_000)
                page.wait_for_function("() => window.gamestream.polls >= 3 && window.gamestream.plots.activity",
                                       timeout=60_000)
                page.screenshot(path=str(out), full_page=True)
            finally:
                browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="keep the data here (a new folder) instead of a temporary one")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--days", type=int, default=45)
    parser.add_argument("--cohort-users", type=int, default=40)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data = options.data_dir or Path(scratch) / "data"
        events = Path(scratch) / "events.ndjson"
        with open(events, "w") as handle:
            for event in cohort_events(days=options.days, cohort_users=options.cohort_users,
                                       now=dt.datetime.now(UTC)):
                handle.write(json.dumps(event, separators=(",", ":")) + "\n")
        print(f"{events.stat().st_size / 1e6:.0f} MB of events; loading and processing into {data}", flush=True)
        gamestream("load", str(events), data_dir=data)
        gamestream("process", "--until-idle", data_dir=data)
        missing = [name for name in ("kpi_retention", "kpi_top_events") if not (data / "tables" / name).exists()]
        if missing:
            print(f"warning: the KPI stage wrote no {', '.join(missing)}: those parts read 'no data yet'",
                  file=sys.stderr)
        screenshot(data, options.out)
        print(options.out, os.path.getsize(options.out), "bytes")


if __name__ == "__main__":
    main()
