"""Forgetting a player: a device's rows deleted from every table, audited, and — with `purge` — physically gone.

`forget(settings, ["device-1"], requested_by=...)` runs these steps, in order (the code below follows them):

1. **Hash the ids.** Each device id becomes `sha256(salt + device_id)` (`device_hash`). The salt is made once
   (`secrets.token_hex`) and kept with the tables, as the property `gamestream.forget.salt` of the `audit`
   table (so a deployment on S3 has it too); it is never logged. From here on only hashes are written anywhere:
   the audit table, the DELETE predicates (which Delta writes in clear into `_delta_log`), commit metadata.
2. **Register** the hashes: an audit row `step = "registered"` (who, when, how many devices, the hashes). The
   processor reads the audit table's hashes (`ForgottenDevices`, refreshed at most every `REFRESH_S` in each
   flush's build step) and from then on drops those devices' events: events still in the log are not re-added.
3. **Delete from `events`** by the hash predicate (`hash_predicate`), a Delta DELETE whose commit carries
   `gamestream.forget` = `{"hashes": [...], "audit": "<entry id>"}`: the KPI stage, folding that version,
   revises the KPI rows those devices touched and deletes their rows from its own state tables.
4. **Delete from `events_quarantine`**: a quarantined row keeps the raw payload, which holds the device id in
   some textual form (as sent, JSON-escaped, inside an API Gateway body). Rows that mention an id
   (`payload_mentions`) are found in Python and deleted by a predicate on a salted hash of the whole payload,
   which names no id and holds whatever the row's log position (null for a Kinesis sequence number).
5. **Re-check after a grace period** (`grace_s`, default `GRACE_S`): a processor flush built before it read the
   registration may commit the device's events after step 3. The commits since are read back (their change
   data feed, inserts only) and, if any row of a forgotten device is there, it is deleted again (step 3, with
   the same metadata) — until a check finds none.
6. **Answer and audit**: an audit row `step = "deleted"` with the rows deleted per table, the table versions
   before and after, and when the old files will be physically gone: the deleted rows stay in files the tables
   no longer reference until VACUUM removes them, `vacuum_retain_h` after this delete at the earliest.
7. **Purge** (optional, `purge_forgotten`): once no reader can need the old files —
   a. every KPI table has folded the last forget commit (its `<pipeline>-kpi` txn version), waiting for the
      running KPI stage, or folding here while holding the KPI role when none runs;
   b. `sql_timeout_s` has passed since that commit and since the KPI tables were seen folded: a query holds a
      snapshot at most that long (the dashboard and SQL read the latest version through `lake.TableCache`);
   c. under the maintenance lock (no automatic OPTIMIZE/VACUUM meanwhile), VACUUM with retention 0 of
      `events`, `events_quarantine`, `kpi_activity`, `kpi_devices`, `kpi_device_segments`, keeping every version
      after the forget (`keep_versions`): the files removed at or before it go, what later versions (and a KPI
      stage still folding them) read stays;
   d. the forget commits' `_change_data` files are deleted (VACUUM leaves them; only change-feed reads of those
      versions need them, and the KPI stage has folded those);
   then an audit row `step = "purged"`.

Idempotent: forgetting a device twice deletes nothing the second time, and is audited again.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import logging
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, write_deltalake

from gamestream.log.ownership import KPI_ROLE, open_roles
from gamestream.settings import Settings
from gamestream.tables import lake
from gamestream.tables.forgotten import (
    AUDIT_SCHEMA,
    FORGET_KEY,
    SALT_PROPERTY,
    delete_change_data,
    device_hash,
    hash_predicate,
    kpi_part_tables,
    kpi_versions,
    open_audit,
    payload_device,
)
from gamestream.tables.maintenance import MaintenanceLock

FoldKpi = Callable[[Settings], None]
"""Folds what the events table holds into the KPI tables once, in this process (`gamestream.kpi.fold_once`).
Passed in by the caller: the KPI stage is a layer above the tables, so this module cannot import it."""

logger = logging.getLogger(__name__)

GRACE_S = 3.0
"""Step 5 waits this long (plus the processor's `batch_max_wait_s`) before reading back what was committed."""
MAX_RECHECKS = 5
KPI_WAIT_S = 300.0
"""Purge waits at most this long for a running KPI stage to fold the forget commit."""
PURGED_TABLES = ("events", "events_quarantine", "kpi_activity", "kpi_devices", "kpi_device_segments")
"""The tables whose old files may hold a device id (the KPI state tables keep device_id)."""

class ForgetError(ValueError):
    """A forget request that cannot be run as given (no device id, an empty one, …): the reason says what."""


class PurgeNotPossible(RuntimeError):
    """Purge could not make sure no reader needs the old files (the KPI stage did not fold the forget commit in
    time): the rows are deleted, the audit says so, and `forget --purge` can be run again later."""


# --------------------------------------------------------------------------------------- finding quarantined rows
def _textual_forms(device_id: str) -> set[str]:
    """How an id can be spelled in a stored payload: as sent, JSON-escaped (with or without \\u escapes, with
    `/` escaped or not), and escaped twice (a JSON body inside a JSON string: an API Gateway event)."""
    forms = {device_id}
    for ascii_only in (False, True):
        once = json.dumps(device_id, ensure_ascii=ascii_only)[1:-1]
        forms |= {once, once.replace("/", "\\/"), json.dumps(once, ensure_ascii=ascii_only)[1:-1]}
    return {f for f in forms if f}


def _mention_pattern(device_ids: Iterable[str]) -> re.Pattern[str]:
    # An id counts only as a whole token: forgetting "d1" must not delete a row of "d10".
    forms = sorted({form for d in device_ids for form in _textual_forms(d)}, key=len, reverse=True)
    return re.compile("(?<![A-Za-z0-9_.-])(?:" + "|".join(re.escape(f) for f in forms) + ")(?![A-Za-z0-9_.-])")


def _decoded_bodies(text: str) -> Iterator[str]:
    """The base64 body of an API Gateway event, decoded (the id is not visible in base64)."""
    import base64

    try:
        event = json.loads(text)
    except ValueError:
        return
    if isinstance(event, dict) and str(event.get("isBase64Encoded")).lower() == "true" and isinstance(
            event.get("body"), str):
        try:
            yield base64.b64decode(event["body"], validate=True).decode("utf-8", errors="replace")
        except ValueError:
            return


def payload_mentions(payload: str | None, device_ids: list[str], pattern: re.Pattern[str] | None = None) -> bool:
    """Whether a quarantined payload holds one of `device_ids`: as a token in any textual form, or as the
    device of the event it parses to."""
    if not payload:
        return False
    pattern = pattern or _mention_pattern(device_ids)
    if pattern.search(payload):
        return True
    if payload_device(payload) in device_ids:
        return True
    return any(pattern.search(body) for body in _decoded_bodies(payload))


# ------------------------------------------------------------------------------------------------ the report
@dataclass
class ForgetReport:
    entry: str
    requested_by: str
    at: str
    devices: int
    hashes: list[str]
    events_deleted: int = 0
    quarantine_deleted: int = 0
    versions: dict[str, dict] = field(default_factory=dict)
    files_gone_by: str | None = None
    purged: bool = False
    status: str = "registered"

    def to_dict(self) -> dict:
        return asdict(self)

    def retention_message(self, settings: Settings) -> str:
        if self.purged:
            return ("purged: the old files and change-data files that held these devices' rows are deleted; "
                    "the event log keeps its copy until trimmed (log_retention_h = "
                    f"{settings.log_retention_h:g} h after the processor committed it)")
        return (f"deleted from the current table versions; older versions' files still hold the rows until a "
                f"VACUUM removes them, no earlier than {self.files_gone_by} (vacuum_retain_h = "
                f"{settings.vacuum_retain_h:g} h; automatic maintenance vacuums every {settings.vacuum_every_h:g} h), "
                "and the forget commits' _change_data files until `gamestream forget --purge`; "
                "run `gamestream forget --purge --device-id …` to remove them now")


# ------------------------------------------------------------------------------------------------- forgetting
def who_at_this_terminal() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no login name (a container without one)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def key_fingerprint(key: str) -> str:
    """How the audit names an admin key: a short hash of it (the key itself is never written)."""
    return "admin key sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _clean_ids(device_ids: Iterable[object]) -> list[str]:
    ids: list[str] = []
    for device_id in device_ids:
        if not isinstance(device_id, str):
            raise ForgetError(f"a device id must be a string, not {type(device_id).__name__}")
        if not device_id.strip():
            raise ForgetError("a device id must not be empty")
        if device_id not in ids:
            ids.append(device_id)
    if not ids:
        raise ForgetError("give at least one device id")
    return ids


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _append_audit(audit: DeltaTable, report: ForgetReport, step: str) -> None:
    row = {"entry": report.entry, "step": step, "at": _now(), "requestedBy": report.requested_by,
           "devices": report.devices, "hashes": report.hashes,
           "eventsDeleted": None if step == "registered" else report.events_deleted,
           "quarantineDeleted": None if step == "registered" else report.quarantine_deleted,
           "versions": json.dumps(report.versions, sort_keys=True),
           "filesGoneBy": dt.datetime.fromisoformat(report.files_gone_by) if report.files_gone_by else None}
    for attempt in lake.CommitRetries("audit", stage="forget", conflicts=20):
        with attempt:
            if attempt.num > 1:
                audit.update_incremental()
            write_deltalake(audit, pa.Table.from_pylist([row], schema=AUDIT_SCHEMA), mode="append")


def _delete(table: DeltaTable, predicate: str, name: str, metadata: dict[str, str] | None = None) -> int:
    """One Delta DELETE, retried on a conflict with a concurrent writer; the rows it deleted."""
    deleted = 0
    for attempt in lake.CommitRetries(name, stage="forget", conflicts=20):
        with attempt:
            if attempt.num > 1:
                table.update_incremental()
            result = table.delete(predicate, commit_properties=CommitProperties(custom_metadata=metadata))
            deleted = int(result.get("num_deleted_rows") or 0)
    return deleted


def _events_of(table: DeltaTable, salt: str, hashes: set[str], since_version: int) -> int:
    """Rows of the forgotten devices that commits after `since_version` inserted (their change data feed)."""
    if table.version() <= since_version:
        return 0
    reader = table.load_cdf(starting_version=since_version + 1, columns=['"eventParams"', "_change_type"])
    changes = pa.table(reader.read_all())
    if not changes.num_rows:
        return 0
    inserted = changes.filter(pc.equal(changes["_change_type"].cast(pa.string()), "insert"))
    devices = pc.struct_field(inserted["eventParams"], "device_id").cast(pa.string())
    distinct = [d for d in pc.unique(devices).to_pylist() if d is not None]
    gone = [d for d in distinct if device_hash(salt, d) in hashes]
    return int(pc.sum(pc.is_in(devices, value_set=pa.array(gone, pa.string()))).as_py() or 0) if gone else 0


def _delete_quarantined(table: DeltaTable, salt: str, device_ids: list[str]) -> int:
    """Step 4: quarantine rows mentioning an id, deleted by a salted hash of their whole payload."""
    if table.version() == 0:
        return 0
    payloads = pc.unique(table.to_pyarrow_table(columns=["payload"])["payload"]).to_pylist()
    pattern = _mention_pattern(device_ids)
    doomed = [device_hash(salt, p) for p in payloads if payload_mentions(p, device_ids, pattern)]
    if not doomed:
        return 0
    return _delete(table, hash_predicate(salt, doomed, '"payload"'), "events_quarantine")


def forget(settings: Settings, device_ids: Iterable[object], *, requested_by: str, purge: bool = False,
           grace_s: float | None = None, fold_kpi: FoldKpi | None = None) -> ForgetReport:
    """Deletes the devices' rows from `events` and `events_quarantine`, audited (the module docstring's steps,
    marked `# Step N` below). Raises `ForgetError` for a request that cannot be run (no id, an empty one). With
    `purge`, `fold_kpi` folds the KPI tables here when no KPI stage runs (step 7a)."""
    ids = _clean_ids(device_ids)
    # Step 1: the salt, and the hashes
    audit = open_audit(settings)
    salt = audit.metadata().configuration[SALT_PROPERTY]
    report = ForgetReport(entry=uuid.uuid4().hex, requested_by=requested_by, at=_now().isoformat(),
                          devices=len(ids), hashes=sorted({device_hash(salt, d) for d in ids}))
    # Step 2: from here the processor drops their events
    _append_audit(audit, report, "registered")
    logger.info("forget registered", extra={"entry": report.entry, "devices": len(ids)})
    deletion = _Deletion.open(settings, salt, ids, report)
    # Step 3
    deletion.delete_events()
    # Step 4
    deletion.delete_quarantined()
    # Step 5: a flush built before the processor saw step 2 may land after step 3
    deletion.recheck(GRACE_S + settings.batch_max_wait_s if grace_s is None else grace_s)
    # Step 6
    _record_deleted(settings, audit, report, deletion)
    # Step 7
    if purge:
        purge_forgotten(settings, report, audit=audit, fold_kpi=fold_kpi)
    return report


@dataclass
class _Deletion:
    """Steps 3 to 5 of one forget: the two tables, what their DELETE commits carry, and the forget commits made
    in `events` so far."""

    events: DeltaTable
    quarantine: DeltaTable
    salt: str
    ids: list[str]
    report: ForgetReport
    before: dict[str, int]  # each table's version before the first delete
    metadata: dict[str, str]  # the events DELETE commits' `gamestream.forget`, read by the KPI stage
    predicate: str
    forget_commits: list[int] = field(default_factory=list)

    @classmethod
    def open(cls, settings: Settings, salt: str, ids: list[str], report: ForgetReport) -> _Deletion:
        events = lake.open_events(settings.table_uri("events"))
        quarantine = lake.open_quarantine(settings.table_uri("events_quarantine"))
        return cls(events, quarantine, salt, ids, report,
                   before={"events": events.version(), "events_quarantine": quarantine.version()},
                   metadata={FORGET_KEY: json.dumps({"hashes": report.hashes, "audit": report.entry})},
                   predicate=hash_predicate(salt, report.hashes))

    def delete_events(self) -> None:
        """Step 3: the DELETE by the hash predicate; a commit that deleted rows is a forget commit."""
        deleted = _delete(self.events, self.predicate, "events", self.metadata)
        if deleted:
            self.forget_commits.append(self.events.version())
            self.report.events_deleted += deleted

    def delete_quarantined(self) -> None:
        """Step 4."""
        self.report.quarantine_deleted += _delete_quarantined(self.quarantine, self.salt, self.ids)

    def recheck(self, wait: float) -> None:
        """Step 5: after each `wait`, the commits since the last check read back, the quarantine swept again,
        and step 3 repeated while a forgotten device's rows were re-added (at most MAX_RECHECKS times)."""
        checked_up_to = self.events.version()
        for _ in range(MAX_RECHECKS):
            time.sleep(wait)
            self.events.update_incremental()
            self.quarantine.update_incremental()
            readded = _events_of(self.events, self.salt, set(self.report.hashes), checked_up_to)
            self.delete_quarantined()
            if not readded:
                break
            logger.warning("a flush in flight re-added events of a forgotten device; deleting again",
                           extra={"entry": self.report.entry, "rows": readded})
            self.delete_events()
            checked_up_to = self.events.version()

    def versions(self) -> dict[str, dict]:
        """Each table's version before and after (the quarantine's brought up to date), and the forget commits."""
        self.quarantine.update_incremental()
        return {
            "events": {"before": self.before["events"], "after": self.events.version(),
                       "forget_commits": self.forget_commits},
            "events_quarantine": {"before": self.before["events_quarantine"], "after": self.quarantine.version()},
        }


def _record_deleted(settings: Settings, audit: DeltaTable, report: ForgetReport, deletion: _Deletion) -> None:
    """Step 6: the report's versions and the time the old files go, in an audit row `step = "deleted"`."""
    report.versions = deletion.versions()
    report.files_gone_by = (_now() + dt.timedelta(hours=settings.vacuum_retain_h)).isoformat()
    report.status = "deleted"
    _append_audit(audit, report, "deleted")
    logger.info("forget deleted", extra={"entry": report.entry, "events_deleted": report.events_deleted,
                                         "quarantine_deleted": report.quarantine_deleted,
                                         "forget_commits": deletion.forget_commits})


# ---------------------------------------------------------------------------------------------------- purging
def purge_forgotten(settings: Settings, report: ForgetReport, *, audit: DeltaTable | None = None,
                    kpi_wait_s: float = KPI_WAIT_S, fold_kpi: FoldKpi | None = None) -> None:
    """Step 7 of the module docstring: the old files and change-data files that held the rows, deleted once
    no reader can need them. Raises `PurgeNotPossible` when the KPI stage did not fold the forget commit within
    `kpi_wait_s` (and `fold_kpi`, when given, could not fold here because a KPI stage runs elsewhere)."""
    events_uri = settings.table_uri("events")
    events = lake.open_table(events_uri)
    forget_commits = report.versions["events"]["forget_commits"]
    last_forget = max(forget_commits, default=report.versions["events"]["after"])
    kpi_versions = _wait_for_kpi(settings, last_forget, kpi_wait_s, fold_kpi)  # a.
    forgotten_at = _commit_time(events, last_forget)
    ready = max(forgotten_at, time.time()) + settings.sql_timeout_s  # b.
    while (left := ready - time.time()) > 0:
        time.sleep(min(left, 1.0))
    keep_after = {"events": last_forget,
                  "events_quarantine": report.versions["events_quarantine"]["after"], **kpi_versions}
    handle = MaintenanceLock(settings).acquire(wait=True)  # c.
    try:
        swept: dict[str, int] = {}
        # the partitions' copies of the state tables too (partitioned KPIs): they hold device ids as well
        for name in (*PURGED_TABLES, *kpi_part_tables(settings, PURGED_TABLES[2:])):
            uri = settings.table_uri(name)
            if name not in keep_after or not lake.table_exists(uri):
                continue
            table = lake.open_table(uri)
            keep = list(range(keep_after[name] + 1, table.version() + 1))
            swept[name] = len(table.vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False,
                                           keep_versions=keep))
        events.update_incremental()
        swept["_change_data"] = delete_change_data(events, events_uri, up_to=last_forget)  # d.
    finally:
        handle.close()  # type: ignore[union-attr]
    logger.info("forget purged", extra={"entry": report.entry, "files": swept})
    report.purged = True
    report.status = "purged"
    report.files_gone_by = _now().isoformat()
    report.versions["purge"] = {"files_deleted": swept}
    _append_audit(audit or open_audit(settings), report, "purged")


def _commit_time(table: DeltaTable, version: int) -> float:
    for commit in table.history(max(1, table.version() - version + 1)):
        if commit.get("version") == version:
            return commit["timestamp"] / 1000
    return time.time()


def _wait_for_kpi(settings: Settings, version: int, wait_s: float, fold_kpi: FoldKpi | None) -> dict[str, int]:
    """Step 7a: waits until the KPI stage has folded events `version` — folding here, holding the KPI role, when
    no KPI stage runs — and returns each KPI table's version at that moment.

    Folded means: every KPI table's txn is at `version` or above; or one is (the stage got there) and no KPI
    table changed over a `kpi_interval_s` (its fold is over: a table whose MERGE had nothing to add makes no
    commit, so its txn may stay behind)."""
    deadline = time.monotonic() + wait_s
    previous: dict[str, tuple[int, int]] | None = None
    while True:
        seen = kpi_versions(settings)
        folded = [txn for _, txn in seen.values()]
        if folded and (min(folded) >= version or (max(folded) >= version and seen == previous)):
            return {name: table_version for name, (table_version, _) in seen.items()}
        if fold_kpi is None:
            ownership = None
        else:
            ownership = open_roles(settings)
        try:
            if ownership is not None and ownership.claim(KPI_ROLE):  # no KPI stage runs: fold here
                fold_kpi(settings)  # type: ignore[misc]  (that fold is over when it returns)
                return {name: table_version for name, (table_version, _) in kpi_versions(settings).items()}
        finally:
            if ownership is not None:
                ownership.close()
        if time.monotonic() > deadline:
            raise PurgeNotPossible(f"the KPI stage has not folded events version {version} within {wait_s:g} s; "
                                   "the rows are deleted, run `gamestream forget --purge` again later")
        previous = seen
        time.sleep(max(settings.kpi_interval_s, 0.2))


