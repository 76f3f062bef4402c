"""Alerts end to end: a real `gamestream serve` and `gamestream process` on loopback, a real HTTP receiver for the
webhook, the `alerts` Delta table, and `gamestream alerts`; plus the configuration's errors and the window
conditions (a change against last week, a band of past values) over real KPI tables."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from collector_server import ServeProcess
from conftest import gamestream
from gamestream.alerts.configuration import AlertConfigError, parse_alerting
from gamestream.kpi import tables as kt

SECRET = "SECRET-TOKEN-4242"
RULE = "purchases stopped"
INTERVAL_S = 1.0
OVER_S = 4.0
UTC = dt.timezone.utc


# ------------------------------------------------------------------------------------------------ the receiver
class Receiver:
    """A webhook receiver on a loopback port: records every JSON body; `down()` closes the port (connections are
    refused), `up()` opens the same port again."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.up()

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                receiver.bodies.append({**body, "received_at": time.monotonic()})
                receiver.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def of(self, state: str, rule: str = RULE) -> list[dict]:
        return [b for b in self.bodies if b.get("rule") == rule and b.get("state") == state]


def wait_for(predicate, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


# ---------------------------------------------------------------------------------------------- the pipeline
class Purchases:
    """Posts a purchase (and a few other events) to the collector every 0.2 s while `flowing` is set; every
    answer's status and latency is kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.flowing = threading.Event()
        self.done = threading.Event()
        self.answers: list[tuple[float, int, float]] = []  # (monotonic, status, seconds)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            n = 0
            while not self.done.is_set():
                n += 1
                events = [{"eventName": "level_up", "eventParams": {"device_id": f"player-{n % 7}"}}]
                if self.flowing.is_set():
                    events.append({"eventName": "purchaseEvent",
                                   "eventParams": {"device_id": f"buyer-{n % 5}", "amount": 0.99}})
                started = time.monotonic()
                answer = client.post(self.url + "/v1/events", content="\n".join(json.dumps(e) for e in events),
                                     headers={"Content-Type": "application/x-ndjson"})
                self.answers.append((started, answer.status_code, time.monotonic() - started))
                time.sleep(0.2)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)


def purchases_total(data_dir: Path) -> int:
    path = data_dir / "tables" / "kpi_bookings_hourly"
    if not DeltaTable.is_deltatable(str(path)):
        return 0
    return sum(v or 0 for v in DeltaTable(str(path)).to_pyarrow_table(columns=["purchases"])["purchases"].to_pylist())


def settled_at(data_dir: Path, quiet_s: float) -> float:
    """Waits until the KPI table's purchases stop changing for `quiet_s`; returns when they last changed."""
    last, changed = purchases_total(data_dir), time.monotonic()
    while time.monotonic() - changed < quiet_s:
        time.sleep(0.1)
        now = purchases_total(data_dir)
        if now != last:
            last, changed = now, time.monotonic()
    return changed


def alert_rows(data_dir: Path, rule: str = RULE) -> list[dict]:
    path = data_dir / "tables" / "alerts"
    if not DeltaTable.is_deltatable(str(path)):
        return []
    rows = DeltaTable(str(path)).to_pyarrow_table().to_pylist()
    return sorted((r for r in rows if r["rule"] == rule), key=lambda r: r["at"])


def write_config(data_dir: Path, receiver: Receiver) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "gamestream.toml").write_text(f"""
[alerting]
webhook = "http://127.0.0.1:{receiver.port}/hook/{SECRET}"
format = "json"
interval = "{INTERVAL_S:g}s"
retry_max_wait = "1s"

[[alerts]]
name = "{RULE}"
kpi = "kpi_bookings_hourly.purchases"
over = "{OVER_S:g}s"
below = 1
severity = "critical"
summary = "no purchase reached the KPI tables for {OVER_S:g} seconds"
""")


@pytest.fixture
def pipeline(tmp_path: Path):
    """serve + process on an empty data directory whose gamestream.toml has the purchases rule, a receiver,
    and purchases flowing."""
    receiver = Receiver()
    data = tmp_path / "data"
    write_config(data, receiver)
    server = ServeProcess(data)
    purchases = Purchases(server.url)
    purchases.flowing.set()
    log_path = tmp_path / "process.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "gamestream", "process", "--data-dir", str(data)],
                                   stdout=subprocess.DEVNULL, stderr=log_file, env={**os.environ})
    try:
        yield {"data": data, "receiver": receiver, "server": server, "purchases": purchases, "process": process,
               "log": log_path}
    finally:
        purchases.stop()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        server.stop()
        if receiver.server is not None:
            receiver.down()


@pytest.mark.slow
def test_purchases_stopping_fires_once_resuming_resolves_once_and_a_receiver_down_is_retried(pipeline):
    data, receiver, purchases = pipeline["data"], pipeline["receiver"], pipeline["purchases"]
    process = pipeline["process"]

    # purchases flow into the KPI tables; once the evaluator has watched `over`, the rule is ok: nothing sent
    wait_for(lambda: purchases_total(data) > 0, 60, "purchases in kpi_bookings_hourly")
    time.sleep(OVER_S + 3 * INTERVAL_S)
    assert receiver.of("firing") == [], receiver.bodies

    # 1. purchases stop → exactly one firing, within two intervals of the condition holding
    purchases.flowing.clear()
    last_change = settled_at(data, quiet_s=2.0)
    firing = wait_for(lambda: receiver.of("firing"), 30, "the firing")
    latency = firing[0]["received_at"] - last_change
    assert latency <= OVER_S + 2 * INTERVAL_S + 2.0, f"fired {latency:.1f}s after the last purchase was folded"
    time.sleep(4 * INTERVAL_S)
    assert len(receiver.of("firing")) == 1, receiver.bodies
    body = receiver.of("firing")[0]
    assert body["value"] == 0 and body["threshold"] == 1 and body["severity"] == "critical"
    assert body["condition"] == "below 1" and body["firing_id"]
    assert receiver.paths[0] == f"/hook/{SECRET}"  # the token reaches the receiver…

    # 2. they resume → exactly one resolve, of the same episode
    purchases.flowing.set()
    resolved = wait_for(lambda: receiver.of("resolved"), 30, "the resolve")
    assert resolved[0]["value"] >= 1 and resolved[0]["firing_id"] == body["firing_id"]
    time.sleep(4 * INTERVAL_S)
    assert (len(receiver.of("firing")), len(receiver.of("resolved"))) == (1, 1), receiver.bodies
    assert [r["state"] for r in alert_rows(data)] == ["firing", "resolved"]

    # 3. the receiver is down: the firing is recorded and retried; ingest goes on answering and committing
    receiver.down()
    committed_before = sum(DeltaTable(str(data / "tables" / "events")).get_add_actions(flatten=True)
                           .column("num_records").to_pylist())
    purchases.flowing.clear()
    down_since = time.monotonic()
    wait_for(lambda: len(alert_rows(data)) == 3, 30, "the second firing in the alerts table")
    wait_for(lambda: "alert notification not delivered; retrying" in pipeline["log"].read_text(), 15,
             "a retry in the process log")
    time.sleep(3.0)  # a few more attempts against the closed port
    during = [a for a in purchases.answers if a[0] >= down_since]
    assert during and all(status == 200 for _, status, _ in during), during
    assert max(seconds for _, _, seconds in during) < 2.0, during
    committed_after = sum(DeltaTable(str(data / "tables" / "events")).get_add_actions(flatten=True)
                          .column("num_records").to_pylist())
    assert committed_after > committed_before
    assert process.poll() is None
    assert len(receiver.of("firing")) == 1

    # 4. it comes back on the same port: the firing is delivered, once
    receiver.up()
    second = wait_for(lambda: [b for b in receiver.of("firing") if b["firing_id"] != body["firing_id"]], 30,
                      "the firing retried until the receiver answered")
    assert len(second) == 1 and second[0]["firing_id"] == alert_rows(data)[2]["firing_id"]
    purchases.flowing.set()
    wait_for(lambda: len(receiver.of("resolved")) == 2, 30, "the second resolve")
    time.sleep(2 * INTERVAL_S)
    assert (len(receiver.of("firing")), len(receiver.of("resolved"))) == (2, 2), receiver.bodies
    assert [r["state"] for r in alert_rows(data)] == ["firing", "resolved", "firing", "resolved"]

    # `gamestream alerts` lists the rule, ok now, with its last resolve; the table is there for SQL too
    listed = json.loads(gamestream("alerts", "--format", "json", data_dir=data).stdout)
    rule = next(r for r in listed if r["name"] == RULE)
    assert rule["state"] == "ok" and rule["last_change_state"] == "resolved"
    assert rule["webhook"] == f"http://127.0.0.1:{receiver.port}/…" and rule["condition"] == "below 1"
    assert {r["name"] for r in listed} >= {"pipeline.backlog_growing", "pipeline.freshness",
                                           "pipeline.quarantine_rate", "pipeline.commit_errors"}
    history = json.loads(gamestream("alerts", "history", "--format", "json", "--rule", RULE, data_dir=data).stdout)
    assert [r["state"] for r in history] == ["resolved", "firing", "resolved", "firing"]
    counted = gamestream("sql", f"SELECT state, count(*) AS n FROM alerts WHERE rule = '{RULE}' GROUP BY state "
                                "ORDER BY state", "--format", "json", data_dir=data)
    assert json.loads(counted.stdout) == [{"state": "firing", "n": 2}, {"state": "resolved", "n": 2}]

    # the built-in rules stayed quiet on a healthy pipeline, and the token never reached a log line
    assert {b["rule"] for b in receiver.bodies} == {RULE}
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    text = pipeline["log"].read_text()
    assert SECRET not in text and "/hook/" not in text
    assert "alert evaluation runs here" in text


# ----------------------------------------------------------------------------------------- one at a time
@pytest.mark.slow
def test_a_second_evaluator_stands_by_while_the_first_holds_the_role(tmp_path: Path):
    receiver = Receiver()
    data = tmp_path / "data"
    write_config(data, receiver)
    runs = []
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    try:
        for path in logs:
            with open(path, "w") as handle:
                runs.append(subprocess.Popen([sys.executable, "-m", "gamestream", "alerts", "run", "--data-dir",
                                              str(data)], stdout=subprocess.DEVNULL, stderr=handle))
            wait_for(lambda: "alert evaluation runs here" in logs[0].read_text(), 30, "the first evaluator")
        wait_for(lambda: "standing by" in logs[1].read_text(), 30, "the second evaluator standing by")
        assert "alert evaluation runs here" not in logs[1].read_text()
        # the first one stops: the second takes the role over
        runs[0].send_signal(signal.SIGTERM)
        assert runs[0].wait(30) == 0
        wait_for(lambda: "alert evaluation runs here" in logs[1].read_text(), 30, "the takeover")
    finally:
        for run in runs:
            if run.poll() is None:
                run.send_signal(signal.SIGTERM)
                run.wait(30)
        receiver.down()


# ------------------------------------------------------------------------------------------ configuration
def _error(text: str, tmp_path: Path) -> str:
    path = tmp_path / "gamestream.toml"
    path.write_text(text)
    import tomllib

    with pytest.raises(AlertConfigError) as caught:
        parse_alerting(tomllib.loads(text), path)
    return str(caught.value)


@pytest.mark.parametrize("rule, expected", [
    ('kpi = "kpi_daily.nope"\nbelow = 1', "kpi_daily has no column 'nope'; its columns are dau, events"),
    ('kpi = "kpi_weekly.dau"\nbelow = 1', "unknown table 'kpi_weekly'"),
    ('kpi = "kpi_daily.dau"', "give one condition"),
    ('kpi = "kpi_daily.dau"\nbelow = 1\ndrop_pct = 20', "given: above/below, drop_pct/rise_pct"),
    ('kpi = "kpi_daily.arpdau"\nover = "5m"\nbelow = 1', "over needs a column that adds up over time"),
    ('kpi = "kpi_daily.dau"\ndrop_pct = 20\nwindow = "current"', "changes and bands compare whole windows"),
    ('kpi = "kpi_daily.dau"\noutside_band = 1', "outside_band is how many past same-window values"),
    ('kpi = "kpi_daily.dau"\nbelow = 1\nsegment = "DE"', "segment must be \"<dimension>=<value>\""),
    ('kpi = "kpi_bookings_hourly.purchases"\nbelow = 1\nsegment = "country=DE"', "segment applies to kpi_daily's"),
    ('kpi = "kpi_daily.wau"\nbelow = 1\nsegment = "country=DE"', "kpi_daily_segments has no column 'wau'"),
    ('sql = "DELETE FROM events"\nabove = 1', "sql: DELETE is not allowed here"),
    ('sql = "SELEC count(*) FROM events"\nabove = 1', "sql: "),
    ('sql = "SELECT 1"\ndrop_pct = 10', "a sql rule takes above/below"),
    ('kpi = "kpi_daily.dau"\nbelow = 1\nfor = "a while"', "for must be a duration such as"),
    ('kpi = "kpi_daily.dau"\nbelow = 1\nthreshold = 3', "unknown key threshold (known: above"),
    ('kpi = "kpi_daily.dau"\nbelow = 5\nabove = 1', "below (5) is over above (1)"),
])
def test_a_rule_written_wrong_is_refused_at_start_saying_which_rule_and_key(tmp_path, rule, expected):
    message = _error(f'[[alerts]]\nname = "r1"\n{rule}\n', tmp_path)
    assert expected in message and "[[alerts]] #1 ('r1')" in message and str(tmp_path) in message


def test_webhook_mistakes_never_quote_the_token(tmp_path):
    message = _error(f'[alerting]\nwebhook = "ftp://user:{SECRET}@hooks.example.com/x/{SECRET}"\n', tmp_path)
    assert "webhook must be an http:// or https:// URL (given: ftp://hooks.example.com/…)" in message
    assert SECRET not in message
    message = _error('[alerting]\nwebhook_env = "GAMESTREAM_TEST_UNSET_HOOK"\n', tmp_path)
    assert "the environment variable GAMESTREAM_TEST_UNSET_HOOK is not set" in message


def test_builtin_rules_are_on_by_default_and_can_be_tuned_or_turned_off(tmp_path):
    import tomllib

    text = '[alerting.pipeline]\nfreshness = { above = 60, for = "30s" }\ncommit_errors = false\n'
    config = parse_alerting(tomllib.loads(text), tmp_path / "gamestream.toml")
    names = [rule.name for rule in config.rules]
    assert names == ["pipeline.backlog_growing", "pipeline.freshness", "pipeline.quarantine_rate"]
    freshness = config.rule("pipeline.freshness")
    assert (freshness.condition.above, freshness.for_s) == (60, 30)
    assert "unknown key nope" in _error("[alerting.pipeline]\nnope = false\n", tmp_path)
    assert "quarantine_rate" in _error("[alerting.pipeline]\nquarantine_rate = { above = 5 }\n", tmp_path)


def test_commands_report_a_bad_rule_in_one_line_and_exit_2(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "gamestream.toml").write_text('[[alerts]]\nname = "dau"\nkpi = "kpi_daily.dau"\nbelow = "ten"\n')
    for args in (("alerts",), ("process", "--until-idle"), ("alerts", "run")):
        run = gamestream(*args, data_dir=data, check=False)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert "[[alerts]] #1 ('dau'): below must be a number, not 'ten'" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr


def test_alerts_without_a_configuration_says_how_to_add_one(tmp_path):
    run = gamestream("alerts", data_dir=tmp_path / "data")
    assert "no alerting configured: add an [alerting] table or [[alerts]] rules to" in run.stderr


# --------------------------------------------------------------------------- conditions over real KPI tables
def _hourly_rows(values_by_start: dict[int, int]) -> pa.Table:
    rows = [{"window_start": dt.datetime.fromtimestamp(s, UTC), "window_end": dt.datetime.fromtimestamp(s + 3600, UTC),
             "bookings": float(v), "purchases": v, "final": True, "late_events": 0}
            for s, v in sorted(values_by_start.items())]
    return pa.Table.from_pylist(rows, schema=kt.BOOKINGS_HOURLY)


def test_changes_against_last_week_and_bands_of_past_hours_read_the_last_complete_window(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    if time.time() % 3600 > 3590:  # the rows are written for the last complete hour: not across its end
        time.sleep(3600 - time.time() % 3600 + 1)
    last = int(time.time() // 3600 * 3600) - 3600
    week, day = 7 * 86400, 86400
    # the same hour on each of the 7 previous days: 100 ± 3; the last hour: 40; a week ago (also the 7th day): 100
    past = {last - k * day: 100 + (k % 3) - 1 for k in range(1, 8)}
    write_deltalake(str(data / "tables" / "kpi_bookings_hourly"), _hourly_rows({**past, last: 40}), mode="append")
    (data / "gamestream.toml").write_text("""
[alerting.pipeline]
backlog_growing = false
freshness = false
quarantine_rate = false
commit_errors = false

[[alerts]]
name = "drop"
kpi = "kpi_bookings_hourly.purchases"
drop_pct = 50

[[alerts]]
name = "small drop"
kpi = "kpi_bookings_hourly.purchases"
drop_pct = 70

[[alerts]]
name = "band"
kpi = "kpi_bookings_hourly.purchases"
outside_band = 7

[[alerts]]
name = "minmax"
kpi = "kpi_bookings_hourly.bookings"
outside_band = 3
band = "minmax"

[[alerts]]
name = "now"
kpi = "kpi_bookings_hourly.purchases"
window = "current"
below = 1

[[alerts]]
name = "sql"
sql = "SELECT sum(purchases) FROM kpi_bookings_hourly"
above = 700
""")
    rows = {r["name"]: r for r in json.loads(gamestream("alerts", "--format", "json", data_dir=data).stdout)}
    assert week == 7 * day and past[last - week] == 100
    assert rows["drop"]["value_now"] == 40 and rows["drop"]["breach_now"] is True
    assert "-60.0% vs 100 a week earlier" in rows["drop"]["note"]
    assert rows["small drop"]["breach_now"] is False
    assert rows["band"]["breach_now"] is True and "of 7 values" in rows["band"]["note"]
    assert rows["minmax"]["breach_now"] is True and "band 99..101 of 3 values" in rows["minmax"]["note"]
    # the hour under way has no row yet: 0 purchases (a count), so "below 1" holds
    assert rows["now"]["value_now"] == 0 and rows["now"]["breach_now"] is True
    assert rows["sql"]["value_now"] == sum(past.values()) + 40 and rows["sql"]["breach_now"] is True
    assert all(r["state"] == "ok" and r["last_change"] is None for r in rows.values())
    table = gamestream("alerts", data_dir=data).stdout
    assert "down more than 50% vs a week earlier" in table and "(breach)" in table


# ------------------------------------------------------------------------------------------ the state machine
def test_a_rule_fires_once_after_for_resolves_once_and_no_data_never_resolves_it():
    from gamestream.alerts.configuration import Condition, Rule
    from gamestream.alerts.signals import Reading
    from gamestream.alerts.state import RuleState, step

    rule = Rule(name="low", source="sql", sql="SELECT 1", condition=Condition("threshold", below=1),
                interval_s=1, for_s=2)
    state = RuleState()
    seen = [step(rule, state, Reading(value), t) for t, value in
            [(0, 5), (1, 0), (2, 0), (3, 0), (4, 0), (5, None), (6, 0), (7, 3), (8, 3)]]
    kinds = [(t, s.state) for t, s in enumerate(seen) if s is not None]
    assert kinds == [(3, "firing"), (7, "resolved")]  # pending from t=1, held 2 s; no data at t=5 kept it firing
    assert seen[3].firing_id == seen[7].firing_id and seen[7].since == seen[3].since
    # a breach that does not last `for` never fires; no data sends a pending rule back to ok
    state = RuleState()
    assert [step(rule, state, Reading(v), t) for t, v in [(0, 0), (1, None), (2, 0), (3, 5), (4, 0)]] == [None] * 5
    assert state.status == "pending"


# ------------------------------------------------------------------------------------------------- delivery
class Flaky(BaseHTTPRequestHandler):
    """Answers each POST with the next status of `statuses` (then 200), recording the bodies."""

    statuses: list[int] = []
    bodies: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        status = self.statuses.pop(0) if self.statuses else 200
        self.bodies.append({"status": status, **body})
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("statuses, attempts, delivered", [([503, 429], 3, True), ([404], 1, False)])
def test_a_5xx_or_429_is_retried_and_another_4xx_is_not(statuses, attempts, delivered, tmp_path):
    import tomllib

    from gamestream.alerts.notify import Notifier
    from gamestream.alerts.signals import Reading
    from gamestream.alerts.state import RuleState, step

    Flaky.statuses, Flaky.bodies = list(statuses), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        text = (f'[alerting]\nwebhook = "http://127.0.0.1:{server.server_address[1]}/services/{SECRET}"\n'
                'retry_max_wait = "0.2s"\n[[alerts]]\nname = "low"\nsql = "SELECT 1"\nbelow = 1\n')
        config = parse_alerting(tomllib.loads(text), tmp_path / "gamestream.toml")
        rule = config.rule("low")
        assert rule.webhook is not None and rule.webhook.format == "slack" and SECRET not in repr(rule)
        notifier = Notifier(config, "gamestream")
        notifier.send(step(rule, RuleState(), Reading(0.0), time.time()))
        wait_for(lambda: len(Flaky.bodies) >= attempts, 20, "the attempts")
        time.sleep(1.0)  # no attempt beyond them
        notifier.close(5)
    finally:
        server.shutdown()
        server.server_close()
    assert [b["status"] for b in Flaky.bodies] == [*statuses, 200][:attempts]
    assert (Flaky.bodies[-1]["status"] == 200) is delivered
    # the Slack-compatible body: one "text" line saying what fired, its value and condition
    assert set(Flaky.bodies[0]) == {"status", "text"}
    assert "[FIRING] low: 0 (below 1)" in Flaky.bodies[0]["text"]
