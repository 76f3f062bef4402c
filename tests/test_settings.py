from pathlib import Path

import pytest

from gamestream.settings import Settings


def test_options_override_environment_which_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GAMESTREAM_DATA_DIR", "/srv/gs")
    monkeypatch.setenv("GAMESTREAM_BATCH_MAX_WAIT_S", "0.25")
    monkeypatch.setenv("GAMESTREAM_PARTITIONS", "8")
    settings = Settings.from_env(partitions=16, batch_max_events=None)
    assert settings.data_dir == Path("/srv/gs")
    assert settings.batch_max_wait_s == 0.25
    assert settings.partitions == 16
    assert Settings.from_env(partitions=None).partitions == 8 and Settings().partitions is None
    assert settings.batch_max_events == Settings().batch_max_events


def test_table_locations_default_under_the_data_dir_and_unknown_names_are_refused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.table_uri("events") == str(tmp_path / "tables" / "events")
    assert Settings(tables={"events": "s3://bucket/events"}).table_uri("events") == "s3://bucket/events"
    with pytest.raises(KeyError, match="unknown table"):
        settings.table_uri("nope")


def test_log_compression_is_checked_and_named_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    with pytest.raises(ValueError, match="auto, zstd, lz4 or none"):
        Settings(log_compression="gzip")
    run = subprocess.run([sys.executable, "-m", "gamestream", "status", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, env={**__import__("os").environ,
                                                              "GAMESTREAM_LOG_COMPRESSION": "gzip"})
    assert run.returncode == 2 and "log_compression must be auto, zstd, lz4 or none, not 'gzip'" in run.stderr
    assert "Traceback" not in run.stderr


def test_auto_record_compression_is_none_on_the_embedded_log_and_zstd_on_a_remote_one() -> None:
    assert Settings().record_compression == "none"
    assert Settings(log="nats://127.0.0.1:4222").record_compression == "zstd"
    assert Settings(log="kinesis://events").record_compression == "zstd"
    assert Settings(log_compression="lz4").record_compression == "lz4"
