"""A day's sessions, kept incrementally as events arrive in any order and batching, equal the sessions computed
from all of the day's events at once: a session ends after 30 minutes without events."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from gamestream.kpi.days import SESSION_GAP_US, DayState

MINUTE = 60_000_000
event = st.tuples(st.sampled_from(["a", "b", "c", None]), st.integers(0, 8 * 60).map(lambda m: m * MINUTE))


def sessions_at_once(events: list[tuple[str | None, int]]) -> tuple[int, int]:
    count = total = 0
    for device in {d for d, _ in events if d is not None}:
        times = sorted(t for d, t in events if d == device)
        start = previous = times[0]
        for t in times[1:]:
            if t - previous >= SESSION_GAP_US:
                count, total, start = count + 1, total + previous - start, t
            previous = t
        count, total = count + 1, total + previous - start
    return count, total


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.lists(event, min_size=1, max_size=15), min_size=1, max_size=8), st.booleans())
def test_sessions_kept_batch_by_batch_equal_the_sessions_of_all_events(batches, one_device_a_pass: bool) -> None:
    """`one_device_a_pass`: the sort keys' limit lowered so that each device is cut into sessions in a pass of
    its own (as a day of more than ~50M devices in one batch would be)."""
    import gamestream.kpi.days as days

    if one_device_a_pass:
        days._KEY_LIMIT = 1  # one device a pass whatever the width
    try:
        _check_batches(batches)
    finally:
        days._KEY_LIMIT = 2**62


def _check_batches(batches) -> None:
    day = DayState()
    for batch in batches:
        day.add(pa.table({"device_id": pa.array([d for d, _ in batch], pa.string()),
                          "t": pa.array([t for _, t in batch], pa.int64()),
                          "purchase": [False] * len(batch), "amount": [0.0] * len(batch)}))
    everything = [e for batch in batches for e in batch]
    assert (day.session_count, day.session_us) == sessions_at_once(everything)
    assert day.devices == {d for d, _ in everything if d is not None}
    assert day.events == len(everything)


def test_an_event_between_two_sessions_joins_them_into_one() -> None:
    day = DayState()
    for times in ([0, 10 * MINUTE], [50 * MINUTE], [30 * MINUTE]):  # 10 → 50 is a 40-minute gap, until 30 arrives
        day.add(pa.table({"device_id": ["d"] * len(times), "t": pa.array(times, pa.int64()),
                          "purchase": [False] * len(times), "amount": [0.0] * len(times)}))
    assert (day.session_count, day.session_us) == (1, 50 * MINUTE)
