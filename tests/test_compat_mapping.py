"""The mapping every vendor protocol shares (`gamestream.compat`): `[compat.<vendor>]` of gamestream.toml, checked
with readable errors, and a vendor event turned into a gamestream event."""

from __future__ import annotations

from pathlib import Path

import pytest

from gamestream import compat
from gamestream.settings import Settings


def test_the_configuration_file_sets_a_vendors_mapping_over_its_defaults(tmp_path: Path) -> None:
    (tmp_path / "gamestream.toml").write_text(
        '[schema.params]\nlevel = "int"\n\n[compat.segment]\nplayer = "user"\npurchases = ["Checkout"]\n'
        'rename = { lvl = "level" }\n')
    settings = Settings.from_env(data_dir=tmp_path)
    segment = compat.mapping(settings.compat, "segment")
    assert segment.player == "user" and segment.purchases == {"Checkout"} and segment.rename == {"lvl": "level"}
    assert segment.amount == tuple(compat.DEFAULTS["segment"]["amount"])  # not named: the default
    amplitude = compat.mapping(settings.compat, "amplitude")
    assert amplitude.player == "device" and "revenue_amount" in amplitude.purchases


@pytest.mark.parametrize("text, message", [
    ("[compat.mixpanel]\nplayer = \"user\"\n", "unknown vendor [compat.mixpanel]"),
    ("[compat.posthog]\nplayers = \"user\"\n", "[compat.posthog]: unknown key players"),
    ("[compat.posthog]\nplayer = \"account\"\n", "player must be \"device\" or \"user\""),
    ("[compat.amplitude]\npurchases = \"buy\"\n", "purchases must be a list of names"),
    ("[compat.snowplow]\nrename = { a = 1 }\n", "rename must be a table"),
])
def test_a_wrong_compat_table_is_refused_with_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "gamestream.toml").write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Settings.from_env(data_dir=tmp_path)


def test_a_vendor_event_becomes_a_gamestream_event_purchases_with_their_amount() -> None:
    mapping = compat.mapping((("amplitude", (("player", "user"), ("rename", (("lvl", "level"),)))),), "amplitude")
    event = compat.gamestream_event(
        mapping, name="purchase", event_id="e-1", device_id="d-1", user_id="u-1",
        client_time=compat.epoch_ms(1764892800000), sent_at="2025-12-05T00:00:01Z",
        properties={"revenue": "2.50", "lvl": 3}, fields={"platform": "android", "app_version": None},
        extra={"vendor": "amplitude"})
    assert event == {"eventName": "purchaseEvent", "eventId": "e-1", "sentAt": "2025-12-05T00:00:01Z",
                     "vendor": "amplitude",
                     "eventParams": {"revenue": "2.50", "level": 3, "platform": "android", "device_id": "u-1",
                                     "client_event_time": "2025-12-05T00:00:00Z", "vendor_event": "purchase",
                                     "amount": 2.5}}
    # the player falls back to the other id; an event with neither, or no name, is rejected with the reason
    assert compat.gamestream_event(mapping, name="x", device_id="d-1")["eventParams"]["device_id"] == "d-1"
    with pytest.raises(compat.Reject, match="neither a device id nor a user id"):
        compat.gamestream_event(mapping, name="x", user_id="")
    with pytest.raises(compat.Reject, match="no name"):
        compat.gamestream_event(mapping, name=None, user_id="u")
    assert compat.epoch_ms("not a time") is None and compat.epoch_ms(float("inf")) is None
