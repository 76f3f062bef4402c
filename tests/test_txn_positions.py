"""Log offsets beyond a Delta txn version (Kinesis sequence numbers, up to 56 digits): the txn version counts a
partition's commits and the offset rides in the same commit's commitInfo (`lake.TxnPositions`)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from gamestream.tables import lake

SEQUENCE = 49_590_338_271_490_256_608_559_692_538_361_571_095_921_575_989_136_588_898  # 56 digits, as Kinesis


def _commit(table, positions: lake.TxnPositions, offsets: dict[str, int]) -> int | None:
    def build(versions: dict[str, int]) -> lake.Batch | None:
        todo = {a: o for a, o in offsets.items() if o > positions.offset_at(table, a, versions[a])}
        if not todo:
            return None
        txn, metadata = positions.stamp(versions, todo)
        return lake.Batch(pa.table({"n": [len(todo)]}), txn, metadata)

    return lake.commit_exactly_once(table, list(offsets), build, partition_by=None, retries=3)


def test_long_offsets_round_trip_through_a_fresh_reader_and_skip_what_is_committed(tmp_path: Path) -> None:
    uri = str(tmp_path / "t")
    table = lake.open_or_create(uri, pa.schema([("n", pa.int64())]), None)
    writer = lake.TxnPositions(counted=True)
    assert _commit(table, writer, {"a": SEQUENCE, "b": 7}) is not None
    assert _commit(table, writer, {"a": SEQUENCE + 10}) is not None
    assert lake.committed_versions(table, ["a", "b"]) == {"a": 2, "b": 1}  # counters, not offsets

    reader = lake.TxnPositions(counted=True)  # a restarted processor: nothing in memory, the table's history
    again = lake.open_table(uri)
    assert reader.offsets(again, ["a", "b", "c"]) == {"a": SEQUENCE + 10, "b": 7, "c": 0}
    # a replay of what is committed writes nothing; a later offset commits once
    version = again.version()
    assert _commit(again, reader, {"a": SEQUENCE + 10, "b": 7}) is None and again.version() == version
    assert _commit(again, reader, {"a": SEQUENCE + 11}) is not None
    assert lake.TxnPositions(counted=True).offsets(lake.open_table(uri), ["a"]) == {"a": SEQUENCE + 11}


def test_plain_positions_refuse_an_offset_that_does_not_fit_a_txn_version() -> None:
    with pytest.raises(ValueError, match="does not fit a Delta txn version"):
        lake.TxnPositions(counted=False).stamp({"a": 0}, {"a": SEQUENCE})
    assert lake.TxnPositions(counted=False).stamp({"a": 3}, {"a": 9}) == ({"a": 9}, {})


def test_a_counter_whose_commit_left_the_history_is_reported_not_guessed(tmp_path: Path) -> None:
    uri = str(tmp_path / "t")
    table = lake.open_or_create(uri, pa.schema([("n", pa.int64())]), None)
    # a txn set by a commit without positions (as if its commit file was cleaned up)
    lake.commit_exactly_once(table, ["a"], lambda v: lake.Batch(pa.table({"n": [1]}), {"a": 1}),
                             partition_by=None, retries=1)
    with pytest.raises(RuntimeError, match="no commit in the table's history records its log position"):
        lake.TxnPositions(counted=True).offsets(lake.open_table(uri), ["a"])


def test_commit_infos_reads_the_versions_asked_where_a_stale_snapshots_history_misnumbers_them(tmp_path) -> None:
    """deltalake 1.6.3: `history()` of a snapshot another writer has committed past lists the newest commits but
    numbers them from the snapshot's own version. `lake.commit_infos` reads each version's own commit file."""
    import pyarrow as pa
    from deltalake import CommitProperties, DeltaTable, write_deltalake

    from gamestream.tables import lake

    uri = str(tmp_path / "t")
    write_deltalake(uri, pa.table({"a": [0]}), commit_properties=CommitProperties(custom_metadata={"n": "0"}))
    stale = DeltaTable(uri)
    for n in range(1, 4):
        write_deltalake(uri, pa.table({"a": [n]}), mode="append",
                        commit_properties=CommitProperties(custom_metadata={"n": str(n)}))
    misnumbered = {c["version"]: c["n"] for c in stale.history()}
    assert misnumbered[0] == "3"  # what this test guards against: the newest commit, labelled version 0
    infos = lake.commit_infos(uri, [0, 2, 3, 7])
    assert {v: (i or {}).get("n") for v, i in infos.items()} == {0: "0", 2: "2", 3: "3", 7: None}
