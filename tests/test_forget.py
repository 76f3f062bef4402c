"""`gamestream forget` and `POST /v1/forget`: a device's rows leave every table, the KPIs are what they would be
without it, the audit knows only a salted hash of it, and after `--purge` no file under the tables directory —
data files, old versions, `_delta_log` commits and checkpoints, `_change_data` — holds its id.

Real parts throughout: the `gamestream` command in child processes, the embedded log, Delta tables in a temporary
folder, a real collector on a loopback port."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from collector_server import ServeProcess
from conftest import gamestream, table_rows, write_ndjson
from kpi_reference import daily_and_cohorts

FORGOTTEN = "Player-Forget-7f3a9c"  # mixed case: a case-folded copy would be found too
KEEPERS = ["keeper-alpha", "keeper-bravo", "keeper-charlie"]
FAST = {"GAMESTREAM_SQL_TIMEOUT_S": "1", "GAMESTREAM_VACUUM_RETAIN_H": "168"}
START = dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.timezone.utc)


def event_id(name: str) -> str:
    """An opaque event id (as a client's UUID is): the table keeps min/max statistics of eventId in its
    `_delta_log`, so an id spelling out the device would be copied there (docs/privacy.md)."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def events_of(devices: list[str], *, hours: int = 30, start: dt.datetime = START, tag: str = "") -> list[dict]:
    """Every device sends a levelStart each hour over `hours` hours (two days) and a purchase every 5th hour."""
    events = []
    for hour in range(hours):
        for number, device in enumerate(devices):
            at = start + dt.timedelta(hours=hour, minutes=number)
            events.append({"eventId": event_id(f"{tag}{device}-{hour}-start"), "eventName": "levelStart",
                           "eventTime": at.isoformat().replace("+00:00", "Z"),
                           "eventParams": {"device_id": device, "level": hour}})
            if hour % 5 == number % 5:
                events.append({"eventId": event_id(f"{tag}{device}-{hour}-buy"), "eventName": "purchaseEvent",
                               "eventTime": (at + dt.timedelta(minutes=1)).isoformat().replace("+00:00", "Z"),
                               "eventParams": {"device_id": device, "amount": 1.25 + number}})
    return events


def append_raw(data: Path, lines: list[str]) -> None:
    """Appends NDJSON lines as one log record per line, as a foreign producer would: the processor quarantines the
    ones that are not valid events, with their raw text."""
    from gamestream.log import Append, open_log

    log = open_log(data, partitions=None)
    try:
        log.append([Append(0, line.encode(), 1) for line in lines])
    finally:
        log.close()


def id_spellings(device_id: str) -> set[bytes]:
    forms = {device_id, device_id.lower(), device_id.upper(), json.dumps(device_id)[1:-1]}
    return {f.encode() for f in forms} | {f.encode("utf-16-le") for f in forms}


def files_holding(root: Path, device_id: str) -> list[str]:
    """Every file under `root` whose bytes, or (for Parquet, which compresses) whose decoded values, hold the id in
    any spelling."""
    spellings = id_spellings(device_id)
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        text = b""
        if path.suffix == ".parquet":
            text = json.dumps(pq.read_table(path).to_pylist(), default=str).encode()
        if any(s in raw or s in text for s in spellings):
            found.append(str(path.relative_to(root)))
    return found


def plain_kpis(events: list[dict]) -> tuple[dict, dict, dict]:
    """kpi_daily (dau, events, bookings) per day, events per hourly window, (bookings, purchases) per hourly
    window: computed in plain Python from raw events."""
    daily: dict = defaultdict(lambda: {"devices": set(), "events": 0, "bookings": 0.0})
    hourly: dict = defaultdict(int)
    bookings: dict = defaultdict(lambda: [0.0, 0])
    for event in events:
        at = dt.datetime.fromisoformat(event["eventTime"].replace("Z", "+00:00"))
        window = at.replace(minute=0, second=0, microsecond=0)
        day = daily[at.date()]
        day["devices"].add(event["eventParams"]["device_id"])
        day["events"] += 1
        hourly[window] += 1
        if event["eventName"] == "purchaseEvent":
            day["bookings"] += event["eventParams"]["amount"]
            bookings[window][0] += event["eventParams"]["amount"]
            bookings[window][1] += 1
    return ({d: (len(v["devices"]), v["events"], round(v["bookings"], 6)) for d, v in daily.items()},
            dict(hourly), {w: (round(b, 6), n) for w, (b, n) in bookings.items()})


def table_kpis(tables: Path) -> tuple[dict, dict, dict]:
    daily = {r["eventDate"]: (r["dau"], r["events"], round(r["bookings"], 6))
             for r in table_rows(tables / "kpi_daily") if r["events"]}
    hourly = {r["window_start"]: r["events"] for r in table_rows(tables / "kpi_events_hourly") if r["events"]}
    bookings = {r["window_start"]: (round(r["bookings"], 6), r["purchases"])
                for r in table_rows(tables / "kpi_bookings_hourly") if r["purchases"]}
    return daily, hourly, bookings


# ------------------------------------------------------------------------------------- forget + purge, end to end
@pytest.fixture(scope="module", params=["global", "partitioned"])
def purged(tmp_path_factory, request) -> dict:
    """A pipeline's tables with the device in every place a copy can hide — several commits, an OPTIMIZE (old
    files), quarantined raw lines (one invalid JSON, one JSON-escaped) — then `forget --purge`. Once with the
    KPIs folded globally, once partitioned (each partition's copies of the state tables hold device ids too)."""
    mode = {"GAMESTREAM_KPI_MODE": request.param}
    root = tmp_path_factory.mktemp("forget")
    data = root / "data"
    events = events_of([FORGOTTEN, *KEEPERS])
    gamestream("load", str(write_ndjson(root / "events.ndjson", events)), "--chunk-lines", "40", data_dir=data)
    append_raw(data, [
        '{"eventName":"levelStart","eventParams":{"device_id":"' + FORGOTTEN + '"',  # cut short: not JSON
        json.dumps({"eventName": "levelStart", "eventTime": "soon", "eventParams": {"device_id": FORGOTTEN}}),
        json.dumps({"eventName": "levelStart", "eventTime": "soon", "eventParams": {"device_id": KEEPERS[0]}}),
    ])
    gamestream("process", "--until-idle", data_dir=data, env=mode)
    gamestream("optimize", data_dir=data)
    tables = data / "tables"
    assert files_holding(tables, FORGOTTEN), "the set-up must put the id in files for the test to mean anything"
    if request.param == "partitioned":
        assert any("kpi_parts" in f for f in files_holding(tables, FORGOTTEN))
    quarantined_before = table_rows(tables / "events_quarantine")
    answer = gamestream("forget", "--device-id", FORGOTTEN, "--purge", "--json", data_dir=data,
                        env={**FAST, **mode})
    return {"data": data, "tables": tables, "events": events, "report": json.loads(answer.stdout),
            "quarantined_before": quarantined_before}


def test_after_forget_and_purge_no_file_under_the_tables_holds_the_device_id(purged) -> None:
    assert files_holding(purged["tables"], FORGOTTEN) == []
    report = purged["report"]
    assert report["status"] == "purged" and report["purged"] is True
    assert report["events_deleted"] == sum(e["eventParams"]["device_id"] == FORGOTTEN for e in purged["events"])
    assert report["quarantine_deleted"] == 2


def test_the_other_devices_rows_are_all_still_there_exactly_once(purged) -> None:
    ids = [r["eventId"] for r in table_rows(purged["tables"] / "events", ["eventId"])]
    expected = [e["eventId"] for e in purged["events"] if e["eventParams"]["device_id"] != FORGOTTEN]
    assert sorted(ids) == sorted(expected)
    quarantined = table_rows(purged["tables"] / "events_quarantine")
    assert len(purged["quarantined_before"]) == 3
    assert [q["payload"] for q in quarantined] == [q["payload"] for q in purged["quarantined_before"]
                                                   if KEEPERS[0] in q["payload"]]


def test_the_audit_holds_the_salted_hash_and_not_the_id(purged) -> None:
    from deltalake import DeltaTable

    audit = DeltaTable(str(purged["tables"] / "audit"))
    salt = audit.metadata().configuration["gamestream.forget.salt"]
    expected = hashlib.sha256((salt + FORGOTTEN).encode()).hexdigest()
    rows = [r for r in audit.to_pyarrow_table().to_pylist() if r["entry"] == purged["report"]["entry"]]
    assert [r["step"] for r in sorted(rows, key=lambda r: r["at"])] == ["registered", "deleted", "purged"]
    for row in rows:
        assert row["hashes"] == [expected]
        assert row["requestedBy"] and "@" in row["requestedBy"]
        assert FORGOTTEN.lower() not in json.dumps(row, default=str).lower()
    deleted = next(r for r in rows if r["step"] == "deleted")
    assert deleted["eventsDeleted"] == purged["report"]["events_deleted"]
    versions = json.loads(deleted["versions"])
    assert versions["events"]["forget_commits"] and versions["events"]["after"] > versions["events"]["before"]
    # the forget commit tells the KPI stage which devices went, by hash only
    commit = next(c for c in DeltaTable(str(purged["tables"] / "events")).history()
                  if c.get("version") == versions["events"]["forget_commits"][0])
    assert json.loads(commit["gamestream.forget"]) == {"hashes": [expected], "audit": purged["report"]["entry"]}


def test_kpis_equal_a_recomputation_without_the_device(purged) -> None:
    remaining = [e for e in purged["events"] if e["eventParams"]["device_id"] != FORGOTTEN]
    assert table_kpis(purged["tables"]) == plain_kpis(remaining)
    # and every game KPI: new users, WAU/MAU, retention, sessions, top events
    daily, cohorts, names = daily_and_cohorts(remaining)

    def rounded(row: dict) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}

    tables = purged["tables"]
    assert {r.pop("eventDate"): rounded(r) for r in table_rows(tables / "kpi_daily")} == {
        d: rounded(r) for d, r in daily.items()}
    assert {r.pop("cohort_day"): rounded(r) for r in table_rows(tables / "kpi_retention")} == {
        d: rounded(r) for d, r in cohorts.items()}
    assert {(r["eventDate"], r["eventName"]): r["events"] for r in table_rows(tables / "kpi_top_events")} == names
    copies = [tables / "kpi_devices"] if (tables / "kpi_devices").exists() else sorted(
        (tables / "kpi_parts").glob("p*/kpi_devices"))
    assert copies and all(FORGOTTEN not in {r["device_id"] for r in table_rows(c)} for c in copies)


def test_without_purge_the_id_is_physically_gone_once_vacuum_passes_the_retention(tmp_path: Path) -> None:
    """No `--purge`: the rewritten files (and the forget's change data, which VACUUM itself leaves alone) go with
    the first VACUUM past the retention — here 0 hours, forced."""
    data = tmp_path / "data"
    gamestream("load", str(write_ndjson(tmp_path / "e.ndjson", events_of([FORGOTTEN, *KEEPERS], hours=6))),
               "--chunk-lines", "20", data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    gamestream("forget", "--device-id", FORGOTTEN, data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)  # the KPI stage folds the forget
    tables = data / "tables"
    assert any("_change_data" in f for f in files_holding(tables, FORGOTTEN))  # still there before the vacuum
    for name in ("events", "events_quarantine", "kpi_activity", "kpi_devices", "kpi_device_segments"):
        gamestream("vacuum", "--table", name, "--retain", "0h", "--force", data_dir=data)
    assert files_holding(tables, FORGOTTEN) == []


# ------------------------------------------------------------------------------------------ the processor filter
def test_events_of_a_forgotten_device_still_in_the_log_are_not_added_again(tmp_path: Path) -> None:
    data = tmp_path / "data"
    gamestream("load", str(write_ndjson(tmp_path / "first.ndjson", events_of([FORGOTTEN, KEEPERS[0]], hours=4))),
               data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    # appended before the forget, processed after it
    unprocessed = events_of([FORGOTTEN, KEEPERS[1]], hours=3, tag="late-")
    gamestream("load", str(write_ndjson(tmp_path / "late.ndjson", unprocessed)), data_dir=data)
    gamestream("forget", "--device-id", FORGOTTEN, data_dir=data)
    # and appended after the forget: a stale client, a replay
    again = events_of([FORGOTTEN, KEEPERS[2]], hours=3, tag="again-")
    gamestream("load", str(write_ndjson(tmp_path / "again.ndjson", again)), data_dir=data)
    append_raw(data, [json.dumps({"eventName": "levelStart", "eventTime": "soon",
                                  "eventParams": {"device_id": FORGOTTEN}})])
    gamestream("process", "--until-idle", data_dir=data)
    rows = table_rows(data / "tables" / "events", ["eventId", "eventParams"])
    assert not [r for r in rows if r["eventParams"]["device_id"] == FORGOTTEN]
    kept = sorted(e["eventId"] for e in events_of([FORGOTTEN, KEEPERS[0]], hours=4) + unprocessed + again
                  if e["eventParams"]["device_id"] != FORGOTTEN)
    assert sorted(r["eventId"] for r in rows) == kept
    assert not [q for q in table_rows(data / "tables" / "events_quarantine") if FORGOTTEN in q["payload"]]


def test_forgetting_an_unknown_device_deletes_nothing_and_is_audited(tmp_path: Path) -> None:
    data = tmp_path / "data"
    events = events_of(KEEPERS, hours=2)
    gamestream("load", str(write_ndjson(tmp_path / "e.ndjson", events)), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    first = json.loads(gamestream("forget", "--device-id", "nobody-ever", "--json", data_dir=data).stdout)
    second = json.loads(gamestream("forget", "--device-id", "nobody-ever", "--json", data_dir=data).stdout)
    assert first["events_deleted"] == second["events_deleted"] == 0
    assert first["versions"]["events"]["forget_commits"] == []
    assert sorted(r["eventId"] for r in table_rows(data / "tables" / "events", ["eventId"])) == sorted(
        e["eventId"] for e in events)
    entries = {r["entry"] for r in table_rows(data / "tables" / "audit") if r["step"] == "deleted"}
    assert entries == {first["entry"], second["entry"]}


def test_forget_refuses_a_request_without_a_usable_device_id(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for args in (("forget",), ("forget", "--device-id", "  ")):
        completed = gamestream(*args, data_dir=data, check=False)
        assert completed.returncode == 2, completed.stderr
        assert "Traceback" not in completed.stderr


# ----------------------------------------------------------------------------------------------------- over HTTP
def test_forget_over_http_needs_the_admin_key_answers_the_audit_entry_and_purges_in_the_background(tmp_path: Path) -> None:
    data = tmp_path / "data"
    gamestream("load", str(write_ndjson(tmp_path / "e.ndjson", events_of([FORGOTTEN, KEEPERS[0]], hours=2))),
               data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    server = ServeProcess(data, "--api-key", "write-key", "--admin-key", "admin-key", env=FAST)
    try:
        url = server.url + "/v1/forget"
        body = {"device_ids": [FORGOTTEN]}
        assert httpx.post(url, json=body).status_code == 401
        assert httpx.post(url, json=body, headers={"X-API-Key": "write-key"}).status_code == 401
        admin = {"Authorization": "Bearer admin-key"}
        for bad in (b"not json", b'{"device_ids": "x"}', b'{"device_ids": []}', b'{"device_ids": [""]}',
                    b'{"device_ids": [7]}', b'{"device_ids": ["a"], "purge": "yes"}', b"[]", b"null"):
            refused = httpx.post(url, content=bad, headers=admin)
            assert refused.status_code == 400, (bad, refused.text)
            assert refused.json()["error"]
        answer = httpx.post(url, json=body, headers=admin, timeout=60)
        assert answer.status_code == 200, answer.text
        entry = answer.json()
        assert entry["events_deleted"] == 3 and entry["status"] == "deleted" and "VACUUM" in entry["message"]
        assert "admin-key" not in answer.text and entry["requested_by"].startswith("admin key sha256:")
        assert entry["requested_by"].endswith(" from 127.0.0.1")  # the peer: no proxy is trusted
        assert httpx.get(f"{url}/{entry['entry']}", headers=admin).json()["state"] == "done"  # without purge
        accepted = httpx.post(url, json={"device_ids": [KEEPERS[0]], "purge": True}, headers=admin, timeout=60)
        assert accepted.status_code == 202, accepted.text  # the purge runs on: poll Location
        assert accepted.json()["state"] == "running" and accepted.json()["status"] == "deleted"
        poll = server.url + accepted.headers["Location"]
        assert poll == f"{url}/{accepted.json()['entry']}"
        assert httpx.get(poll).status_code == 401 and httpx.get(url + "/nothing", headers=admin).status_code == 404
        deadline = time.monotonic() + 120
        while (purged := httpx.get(poll, headers=admin)).json()["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert purged.status_code == 200, purged.text
        assert purged.json()["state"] == "done" and "reason" not in purged.json(), purged.text
        assert purged.json()["status"] == "purged" and purged.json()["purged"] is True
    finally:
        server.stop()
    assert not [r for r in table_rows(data / "tables" / "events", ["eventParams"])
                if r["eventParams"]["device_id"] == FORGOTTEN]
    assert files_holding(data / "tables", FORGOTTEN) == files_holding(data / "tables", KEEPERS[0]) == []
    audit = table_rows(data / "tables" / "audit")
    assert {r["entry"] for r in audit} == {entry["entry"], purged.json()["entry"]}
    assert "admin-key" not in json.dumps(audit, default=str)


# ------------------------------------------------------------------------------------------------------ matching
def test_a_quarantined_payload_is_matched_by_the_whole_id_in_any_spelling() -> None:
    from gamestream.tables.forget import payload_mentions

    assert payload_mentions('{"eventParams":{"device_id":"d1"', ["d1"])
    assert not payload_mentions('{"eventParams":{"device_id":"d10"}}', ["d1"])
    assert payload_mentions('{"device_id":"caf\\u00e9/\\"x\\""}', ['café/"x"'])
    assert payload_mentions(json.dumps({"body": json.dumps({"eventParams": {"device_id": "a b"}})}), ["a b"])
    import base64

    gateway = {"isBase64Encoded": True, "body": base64.b64encode(b'{"eventParams":{"device_id":"zz-9"}}').decode()}
    assert payload_mentions(json.dumps(gateway), ["zz-9"])


def test_device_hash_is_the_salted_sha256_that_the_delete_predicate_computes() -> None:
    from gamestream.tables.forgotten import device_hash, hash_predicate

    assert device_hash("00ff", "b") == hashlib.sha256(b"00ffb").hexdigest()
    predicate = hash_predicate("00ff", [device_hash("00ff", "b")])
    assert "'b'" not in predicate and device_hash("00ff", "b") in predicate
    with pytest.raises(ValueError):
        hash_predicate("00ff", ["'; drop"])
