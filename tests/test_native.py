"""gamestream_native (native/, Rust): the identity keys and payload fingerprints of deduplication by eventId,
checked against plain Python references (python-xxhash for XXH3) on every column type the schema has, with
nulls, sliced arrays and several record batches."""

from __future__ import annotations

import datetime as dt
import random
import uuid

import numpy as np
import pyarrow as pa
import pytest
import xxhash

import gamestream_native as native
from gamestream.process import identity

UTC = dt.timezone.utc
PARAMS = pa.struct([
    pa.field("platform", pa.string()), pa.field("level", pa.int32()), pa.field("coins", pa.int64()),
    pa.field("amount", pa.float64()), pa.field("ratio", pa.float32()), pa.field("tutorial", pa.bool_()),
    pa.field("client_event_time", pa.timestamp("us", tz="UTC")), pa.field("installed", pa.date32()),
])


def _reference_fingerprint(row: dict) -> int:
    """The spec of `gamestream_native.fingerprints`, written out: h = 0; for each payload value in order (a
    struct's fields by name), where not null, h = XXH3-64(value bytes, seed = h ^ XXH3-64(name))."""
    values = [("eventName", row["eventName"])]
    params = dict(row["eventParams"] or {})
    if params.get("client_event_time") is None:
        params["client_event_time"] = row["eventTime"]
    values += [(f"eventParams.{name}", params.get(name)) for name in sorted(PARAMS.names)]
    values += [("eventParams_extra", row["eventParams_extra"]), ("event_extra", row["event_extra"])]
    h = 0
    for name, value in values:
        if value is None:
            continue
        if isinstance(value, str):
            data = value.encode()
        elif isinstance(value, bool):
            data = int(value).to_bytes(8, "little")
        elif isinstance(value, int):
            data = value.to_bytes(8, "little", signed=True)
        elif isinstance(value, float):
            data = np.float64(value).tobytes()
        elif isinstance(value, dt.datetime):
            data = ((value - dt.datetime(1970, 1, 1, tzinfo=UTC)) // dt.timedelta(microseconds=1)).to_bytes(
                8, "little", signed=True)
        else:  # a date
            data = (value - dt.date(1970, 1, 1)).days.to_bytes(8, "little", signed=True)
        h = xxhash.xxh3_64_intdigest(data, seed=h ^ xxhash.xxh3_64_intdigest(name.encode()))
    return h


def _random_rows(rng: random.Random, n: int) -> list[dict]:
    def maybe(value):
        return None if rng.random() < 0.2 else value

    at = dt.datetime(2026, 12, 1, tzinfo=UTC)
    rows = []
    for i in range(n):
        params = None if rng.random() < 0.05 else {
            "platform": maybe(rng.choice(["android", "ios", "", "ünïcode ✓"])),
            "level": maybe(rng.randint(-2**31, 2**31 - 1)), "coins": maybe(rng.randint(-2**63, 2**63 - 1)),
            "amount": maybe(rng.uniform(-1e6, 1e6)), "ratio": maybe(float(np.float32(rng.random()))),
            "tutorial": maybe(rng.random() < 0.5),
            "client_event_time": maybe(at + dt.timedelta(microseconds=rng.randint(0, 10**12))),
            "installed": maybe(dt.date(2026, 1, 1) + dt.timedelta(days=rng.randint(0, 300)))}
        rows.append({"eventId": maybe(str(uuid.UUID(int=rng.getrandbits(128), version=4))),
                     "eventName": rng.choice(["sessionStart", "purchase", "x" * rng.randint(0, 300)]),
                     "eventTime": at + dt.timedelta(seconds=i), "eventParams": params,
                     "eventParams_extra": maybe('{"k":' + str(i) + "}"), "event_extra": maybe("{}")})
    return rows


SCHEMA = pa.schema([("eventId", pa.string()), ("eventName", pa.string()),
                    ("eventTime", pa.timestamp("us", tz="UTC")), ("eventParams", PARAMS),
                    ("eventParams_extra", pa.string()), ("event_extra", pa.string())])


def test_fingerprints_follow_their_spec_for_every_column_type_with_nulls_slices_and_several_batches() -> None:
    rows = _random_rows(random.Random(5), 3000)
    whole = pa.Table.from_pylist(rows, schema=SCHEMA)
    expected = np.array([_reference_fingerprint(r) for r in rows], dtype=np.uint64).view(np.int64)
    batches = pa.Table.from_batches([*whole.slice(0, 1000).to_batches(), *whole.slice(1000).to_batches()])
    assert batches["eventName"].num_chunks == 2
    assert (identity.identity_keys(batches)[1] == expected).all()
    sliced = whole.slice(7)  # one chunk that starts inside its buffers: handed over as it is
    assert sliced.combine_chunks()["eventParams"].chunk(0).field(0).offset == 7
    assert (identity.identity_keys(sliced)[1] == expected[7:]).all()


def test_a_field_added_to_the_schema_leaves_the_fingerprints_of_events_without_it_as_they_were() -> None:
    rows = _random_rows(random.Random(6), 200)
    before = identity.identity_keys(pa.Table.from_pylist(rows, schema=SCHEMA))[1]
    wider = pa.schema([*SCHEMA.remove(3).insert(3, pa.field("eventParams", pa.struct(
        [*PARAMS, pa.field("newParam", pa.string())])))])
    after = identity.identity_keys(pa.Table.from_pylist(rows, schema=wider))[1]
    assert (before == after).all()
    rows[0]["eventParams"] = {**(rows[0]["eventParams"] or {}), "newParam": "set"}
    assert identity.identity_keys(pa.Table.from_pylist(rows, schema=wider))[1][0] != before[0]


@pytest.mark.parametrize("text, is_uuid", [
    ("0190a5e1-7c2b-7def-8a12-3456789abcde", True),  # a v7, as the collector assigns
    ("0190A5E1-7C2B-7DEF-8A12-3456789ABCDE", True),  # upper case
    ("0190a5e1-7c2b-7def-8a12-3456789abcdg", False),  # not hex
    ("0190a5e1-7c2b-7def-8a1223456789abcde", False),  # a dash missing
    ("0190a5e1-7c2b-7def-8a12-3456789abcd", False),  # 35 characters
    ("0190a5e17c2b7def8a123456789abcde", False),  # no dashes
    ("evt-000001", False),
    ("0190a5e1-7c2b-7def-8a12-3456789abcd\u00e9", False),  # 36 bytes only with a 2-byte character: 37 bytes
])
def test_uuid_keys_are_a_uuids_own_lower_64_bits_and_anything_else_is_not_a_uuid(text: str, is_uuid: bool) -> None:
    ids = pa.array(["x", text, None, text.upper()]).slice(1)  # an offset, a null
    offsets, data = identity._string_buffers(ids)
    keys, flags = np.zeros(3, dtype=np.uint64), np.zeros(3, dtype=np.uint8)
    native.uuid_keys(offsets, data, keys.view(np.uint8), flags)
    assert flags.tolist() == [is_uuid, False, is_uuid]
    if is_uuid:
        expected = int(text.replace("-", "")[16:], 16)
        assert keys.tolist() == [expected, 0, expected]
    table = pa.table({"eventId": pa.array([text, text.upper(), None])})
    table = table.append_column("eventTime", pa.array([None] * 3, pa.timestamp("us", tz="UTC")))
    for name in ["eventName", "eventParams_extra", "event_extra"]:
        table = table.append_column(name, pa.array([None] * 3, pa.string()))
    table = table.append_column("eventParams", pa.array([None] * 3, PARAMS))
    keys_of, _, has_id = identity.identity_keys(table)
    assert has_id.tolist() == [True, True, False]
    if is_uuid:
        assert keys_of[0] == keys_of[1] == np.uint64(expected).view(np.int64)


def test_buffers_shorter_than_the_rows_are_refused_not_read_past() -> None:
    ids = pa.array(["0190a5e1-7c2b-7def-8a12-3456789abcde"] * 4)
    offsets, data = identity._string_buffers(ids)
    with pytest.raises(ValueError, match="outputs must hold"):
        native.uuid_keys(offsets, data, np.zeros(8, np.uint8), np.zeros(2, np.uint8))
    out = np.zeros(5, dtype=np.uint64)  # five rows asked of a four-row column
    with pytest.raises(ValueError, match="fewer rows"):
        native.fingerprints([("eventId", 0, None, 0, offsets, data)], out.view(np.uint8))
    with pytest.raises(ValueError, match="fewer rows"):
        native.fingerprints([("n", 1, None, 0, None, np.zeros(32, np.uint8))], out.view(np.uint8))


@pytest.mark.parametrize("shape", ["random", "uuid-variant", "one-bucket", "extremes", "empty"])
def test_runs_merge_and_lookups_agree_with_numpy(shape: str) -> None:
    """`merge_runs`, `bucket_starts` and `find_in_run` (the deduplication state's runs) against numpy: random
    keys; UUID keys (their top two bits fixed by the variant, so a quarter of the buckets hold them all); a
    crafted set that fills one bucket (a binary search inside it, not a scan); the int64 extremes; empty runs.
    Lookups for keys held and not held, in sorted and in random order."""
    rng = np.random.default_rng(11)
    if shape == "random":
        a, b = (rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64) for n in (5000, 3000))
    elif shape == "uuid-variant":
        a, b = ((rng.integers(0, 2**62, size=n, dtype=np.int64) | np.int64(-(2**63))) for n in (5000, 3000))
    elif shape == "one-bucket":
        a, b = ((np.int64(2**40) + rng.integers(0, 2**20, size=n, dtype=np.int64)) for n in (5000, 3000))
    elif shape == "extremes":
        a = np.array([-(2**63), -1, 0, 1, 2**63 - 1], dtype=np.int64)
        b = np.array([-(2**63) + 1, 2**62, 2**63 - 2], dtype=np.int64)
    else:
        a, b = np.empty(0, np.int64), rng.integers(-(2**63), 2**63 - 1, size=100, dtype=np.int64)
    a, b = np.unique(a), np.setdiff1d(np.unique(b), a)
    runs = [identity._run(keys, keys ^ 7, np.arange(len(keys), dtype=np.int32)) for keys in (a, b)]
    merged = identity._merged(*runs)
    order = np.argsort(np.concatenate([a, b]), kind="stable")
    assert np.array_equal(merged[0], np.concatenate([a, b])[order])
    assert np.array_equal(merged[1], merged[0] ^ 7)  # each key kept its fingerprint
    assert np.array_equal(merged[2], np.concatenate([np.arange(len(a)), np.arange(len(b))])[order])
    starts, bits = merged[4], merged[3]
    buckets = ((merged[0] >> np.int64(64 - bits)) + (1 << (bits - 1))).astype(np.int64)
    assert np.array_equal(starts, np.searchsorted(buckets, np.arange((1 << bits) + 1)))
    assert merged[5] == int(np.diff(starts).max())
    if shape == "one-bucket":
        assert merged[5] == len(merged[0])  # every key in one bucket
    missing = rng.integers(-(2**63), 2**63 - 1, size=2000, dtype=np.int64)
    for keys in (np.sort(np.concatenate([merged[0][::3], missing])), np.concatenate([missing, merged[0][::2]])):
        at, hit = identity._search(merged, keys)
        assert np.array_equal(at, np.searchsorted(merged[0], keys))
        assert np.array_equal(hit, np.isin(keys, merged[0]))


def test_crc32_partitions_are_log_partition_for() -> None:
    """`crc32_partitions` (the whole-batch validator's routing) against `log.partition_for` (zlib's CRC-32 of the
    device id modulo the partitions): empty, ASCII and multi-byte ids, a sliced array, 1 and 7 partitions."""
    from gamestream.log import partition_for

    ids = pa.array(["", "d", "device-1", "é水🎮", *(str(uuid.UUID(int=random.Random(1).getrandbits(128)))
                                                    for _ in range(50))]).slice(1)
    _, offsets, data = ids.buffers()
    for partitions in (1, 7):
        out = np.empty(len(ids), dtype=np.int32)
        native.crc32_partitions(np.frombuffer(offsets, dtype=np.int32)[ids.offset:ids.offset + len(ids) + 1]
                                .view(np.uint8), np.frombuffer(data, dtype=np.uint8), partitions, out.view(np.uint8))
        assert out.tolist() == [partition_for(d, partitions) for d in ids.to_pylist()]
