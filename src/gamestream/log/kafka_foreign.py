"""Messages another producer wrote to a Kafka topic, made into records the processor reads like gamestream's own.

gamestream's producers mark their records with the `gs-events` header (`kafka.EVENTS_HEADER`); a message without
it is a foreign producer's, and is read by what it holds, never by gamestream's payload format:

- **one JSON event** (the reference pipeline's schema: `eventName`, `eventTime`, `eventParams`, …) → one NDJSON
  line;
- **a JSON array of events** → one line per element (an element that is not an event is quarantined on its own
  by the processor's validator, as a bad line of a batch is; the others land);
- **NDJSON** (several JSON values, one per line) → those lines;
- **an API Gateway proxy event** (REST 1.0 / HTTP 2.0, the seed's Lambda form: `envelope.is_envelope`) → kept as
  it is: the processor's decoder unwraps it (`envelope.unwrap`), as it does on every log;
- **gamestream's Arrow payload** without the header → kept as it is;
- **anything else** — an empty message, bytes that are not UTF-8, text that is not JSON, a JSON scalar, an empty
  array — is `refused`: the processor quarantines the whole message with the reason, which names the topic,
  the partition and the Kafka offset (`events_quarantine.reason`; `logPartition` and `logOffset` = Kafka offset
  + 1 are the row's columns as on every log).

An event without `eventId` gets ``kafka-<topic>-<partition>-<kafka offset>`` (``-<index>`` within an array or
NDJSON message): derived from where the message sits in the topic, so reading it again after a crash or a replay
gives the same id, and the processor's eventId check lands it once. An event without `eventTime` gets the
message's Kafka timestamp (a producer's CreateTime, or the broker's LogAppendTime), as an API Gateway event gets
its request time; an explicit `"eventTime": null` is kept, and quarantined (the seed's `eventTime.isNotNull()`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import msgspec

from gamestream.log import payload as payload_format
from gamestream.log.envelope import is_envelope
from gamestream.log.kinesis.events import events_in

_ANY = msgspec.json.Decoder()
_ENCODE = msgspec.json.Encoder().encode
_SHOWN = 60  # characters of a parse error kept in a reason


@dataclass(frozen=True)
class Foreign:
    """What a foreign message becomes: the payload the processor decodes, its event count, and (when nothing in
    it can be an event) why it is quarantined whole."""

    payload: bytes
    events: int
    refused: str | None = None


def where(topic: str, partition: int, kafka_offset: int) -> str:
    """How a quarantine reason names a message's place: topic, partition, Kafka offset (what Kafka's own tools
    show; gamestream's `logOffset` column is this + 1)."""
    return f"kafka topic {topic} partition {partition} offset {kafka_offset}"


def read_foreign(value: bytes | None, *, topic: str, partition: int, kafka_offset: int,
                 timestamp_ms: int | None) -> Foreign:
    """A foreign message as the processor reads it (see the module docstring)."""
    data = value or b""
    place = where(topic, partition, kafka_offset)
    if not data.strip():
        return Foreign(data, 1, f"an empty message ({place})")
    if payload_format.is_arrow(data):
        return Foreign(data, events_in(data))
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return Foreign(data, 1, f"not UTF-8 text: byte {error.start} of {len(data)} ({place})")
    try:
        values = [_ANY.decode(data)]
        several = False
    except (msgspec.DecodeError, RecursionError) as error:
        lines = [line for line in data.split(b"\n") if line.strip()]
        if len(lines) < 2 or not any(isinstance(_decoded_or_none(line), dict) for line in lines):
            return Foreign(data, 1, f"not JSON ({_short(error)}) ({place})")
        values = list(lines)  # NDJSON: each line stays bytes; one that is not JSON is quarantined on its own
        several = True
    if len(values) == 1 and isinstance(values[0], list):
        values = values[0]
        several = True
        if not values:
            return Foreign(data, 1, f"an empty JSON array: no events ({place})")
    elif len(values) == 1 and is_envelope(values[0]):
        return Foreign(data, 1)  # the processor's decoder unwraps it (envelope.unwrap)
    elif len(values) == 1 and not isinstance(values[0], dict):
        kind = "null" if values[0] is None else type(values[0]).__name__
        return Foreign(data, 1, f"a JSON {kind}, not an event, an array of events or an API Gateway event "
                                f"({place})")
    prefix = f"kafka-{topic}-{partition}-{kafka_offset}"
    stamp = _rfc3339(timestamp_ms)
    lines_out = []
    for index, event in enumerate(values):
        if isinstance(event, dict):
            if "eventId" not in event:
                event = {**event, "eventId": f"{prefix}-{index}" if several else prefix}
            if "eventTime" not in event and stamp is not None:
                event = {**event, "eventTime": stamp}
            lines_out.append(_ENCODE(event))
        elif isinstance(event, bytes):
            lines_out.append(_stamped_line(event, f"{prefix}-{index}", stamp))
        else:
            lines_out.append(_ENCODE(event))  # not an object: the validator words why, for this element only
    return Foreign(b"\n".join(lines_out), len(lines_out))


def _stamped_line(line: bytes, event_id: str, stamp: str | None) -> bytes:
    """An NDJSON line with eventId and eventTime filled in when it is an object lacking them; else as it is."""
    try:
        event = _ANY.decode(line)
    except (msgspec.DecodeError, RecursionError):
        return line.strip()
    if not isinstance(event, dict):
        return line.strip()
    if "eventId" not in event:
        event["eventId"] = event_id
    if "eventTime" not in event and stamp is not None:
        event["eventTime"] = stamp
    return _ENCODE(event)


def _decoded_or_none(line: bytes) -> object:
    try:
        return _ANY.decode(line)
    except (msgspec.DecodeError, RecursionError):
        return None


def _rfc3339(timestamp_ms: int | None) -> str | None:
    if timestamp_ms is None or timestamp_ms <= 0:
        return None
    moment = dt.datetime.fromtimestamp(timestamp_ms / 1000, dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"
