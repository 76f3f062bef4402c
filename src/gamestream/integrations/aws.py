"""The seed's front half on AWS: an API Gateway → Lambda handler that writes events to a Kinesis stream with the
collector's contract (docs/aws.md deploys it).

`lambda_handler(event, context)` takes REST API (payload 1.0) and HTTP API (payload 2.0) proxy events and answers
as the collector does (`gamestream.api.routes.events`), using the same body rules (`gamestream.log.envelope`) and the one
schema: one object, a JSON array or NDJSON; base64 (`isBase64Encoded`) and gzip (`Content-Encoding`) bodies; a
200 with per-index errors; 400/413/415 with the collector's words; eventTime stamped on arrival; an eventId
(UUIDv7) for an event without one; geo_country from the request context's source IP (`requestContext.identity
.sourceIp` in payload 1.0, `requestContext.http.sourceIp` in 2.0; X-Forwarded-For only when that address is a
configured trusted proxy), looked up once per request as the collector does (`gamestream.ingest.geo`) — the
address itself is not written to the stream or logged.

What goes on the stream is what gamestream's own collector writes to its log: canonical NDJSON lines, **one
Kinesis record per device per request** (split only when a device's lines pass a record's 1 MiB), with the
device id as the partition key. So the processor (`gamestream process --log kinesis://STREAM`) reads them with no
envelope, a device's events stay on one shard and in order, and a request of 100 events from 20 devices costs 20
records rather than 100 (a shard takes 1,000 records/s; PUT payload units are billed per 25 KB of a record).
NDJSON rather than Arrow keeps pyarrow out of the handler's own code.

An answer of 200 is given only once every record has a SequenceNumber. Records Kinesis refuses (throttling,
internal failure) are retried alone, with exponential backoff (`stamina`); past the retries the answer is 503
with Retry-After, and records already written stay written (a client's retry may then store their events again;
its own eventIds make such duplicates recognisable).

`Idempotency-Key` is **not honoured** across invocations: Kinesis has no deduplication and the handler keeps no
state, so a retried request is stored again. Answers to a request that carries the key say so with
``Idempotency-Honoured: false``.

Configuration: `GAMESTREAM_KINESIS_STREAM` (the stream's name or ARN), the collector's limits from the usual
GAMESTREAM_* variables (`max_body_bytes`, `max_events_per_request`, `max_event_bytes`, `retry_after_s`,
`api_keys`; the country lookup's `GAMESTREAM_GEO_COUNTRY`, `GAMESTREAM_GEO_MMDB` — a file in the deployment
package or a layer —, `GAMESTREAM_GEO_TRUSTED_PROXIES`), and boto3's own AWS environment (region, credentials, `AWS_ENDPOINT_URL`). boto3 is the Lambda
runtime's; it is imported on first use.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import stamina

from gamestream import schema
from gamestream.ingest import geo
from gamestream.ingest.auth import key_matches
from gamestream.log import envelope
from gamestream.settings import Settings

if TYPE_CHECKING:
    from pathlib import Path

STREAM_ENV = "GAMESTREAM_KINESIS_STREAM"
MAX_RECORD_BYTES = 1024 * 1024
"""A Kinesis record's data plus its partition key (the long-standing limit; newer streams may take more)."""
MAX_CALL_RECORDS = 500
MAX_CALL_BYTES = 5 * 1024 * 1024
"""One PutRecords call: at most this many records, and this many bytes of data plus partition keys."""
MAX_PARTITION_KEY = 256
"""Unicode characters; a longer device id is hashed to a key (`partition_key`)."""
RETRY_ATTEMPTS = 6
RETRY_TIMEOUT_S = 8.0
"""Retries of refused records: at most this many attempts within this many seconds (keep the function's timeout
above it; API Gateway gives up after 29 s)."""
RETRYABLE_CODES = frozenset({"ProvisionedThroughputExceededException", "InternalFailure",
                             "KMSThrottlingException", "LimitExceededException", "ServiceUnavailable",
                             "ThrottlingException"})

logger = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode
_VALIDATOR = schema.EventValidator(event_time="server")


class _Answer(Exception):
    """An early answer: status, {"error": message} and headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status, self.message, self.headers = status, message, headers or {}


class Throttled(Exception):
    """Kinesis kept refusing some records past the retries."""

    def __init__(self, message: str, written: int, total: int) -> None:
        super().__init__(message)
        self.written, self.total = written, total


class _Refused(Exception):
    """Some records were refused with a code worth retrying (caught by stamina)."""


@dataclass(frozen=True)
class Entry:
    """One Kinesis record to put: canonical NDJSON lines of one device."""

    partition_key: str
    data: bytes
    events: int

    @property
    def size(self) -> int:
        return len(self.data) + len(self.partition_key.encode())


# ----------------------------------------------------------------------------------------------------- the handler
_client: Any = None
_settings: Settings | None = None


def lambda_handler(event: dict, context: Any) -> dict:
    """The Lambda entry point (handler setting: `gamestream.integrations.aws.lambda_handler`)."""
    global _client, _settings
    stream = os.environ.get(STREAM_ENV, "").strip()
    if not stream:
        raise RuntimeError(f"{STREAM_ENV} is not set: give the Kinesis stream's name or ARN")
    if _settings is None:
        settings = Settings.from_env()
        geo.resolver_for(settings)  # a MaxMind DB file that cannot be opened fails the cold start, with the path
        _settings = settings
    if _client is None:
        _client = kinesis_client()
    return handle(event, client=_client, stream=stream, settings=_settings)


def kinesis_client() -> Any:
    import boto3
    from botocore.config import Config

    # botocore retries a whole call that fails (throttled, a connection reset) a few times itself; records a
    # successful call refuses one by one are retried by `put_entries`.
    return boto3.client("kinesis", config=Config(retries={"mode": "standard", "max_attempts": 3},
                                                 connect_timeout=2, read_timeout=5))


def handle(event: dict, *, client: Any, stream: str, settings: Settings,
           received: dt.datetime | None = None) -> dict:
    """One API Gateway proxy event in, its proxy answer out; events written to `stream` with `client`."""
    received = received or dt.datetime.now(dt.timezone.utc)
    extra: dict[str, str] = {}
    try:
        if settings.api_keys and not _authorised(event, [key.encode() for key in settings.api_keys]):
            raise _Answer(401, "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key'",
                          {"WWW-Authenticate": "Bearer"})
        idempotency_key = envelope.header(event, "idempotency-key")
        if idempotency_key is not None:
            extra["Idempotency-Honoured"] = "false"
            if not 0 < len(idempotency_key) <= envelope.MAX_IDEMPOTENCY_KEY:
                raise _Answer(400, f"Idempotency-Key must be 1 to {envelope.MAX_IDEMPOTENCY_KEY} characters")
        sent_at = envelope.header(event, "sent-at")
        try:
            sent = schema.parse_timestamp(sent_at, "Sent-At") if sent_at is not None else None
        except ValueError as error:
            raise _Answer(400, str(error)) from None
        events = _events(event, settings)
        answer, entries = _validate(events, received, settings, sent, request_country(event, settings))
        if answer["accepted"] == 0:
            message = "no events in the body" if not events else "no valid event in the body"
            return _answer(400, _encode({"error": message, **answer}), extra)
        try:
            put_entries(client, stream, entries)
        except Throttled as throttled:
            raise _Answer(503, f"{throttled}; {throttled.written} of {throttled.total} records were stored "
                               "(a retry may store their events again), retry later",
                          {"Retry-After": str(settings.retry_after_s)}) from None
        return _answer(200, _encode(answer), extra)
    except _Answer as early:
        # the collector's refusals are starlette JSONResponses: compact JSON, UTF-8
        body = json.dumps({"error": early.message}, ensure_ascii=False, allow_nan=False, indent=None,
                          separators=(",", ":")).encode()
        return _answer(early.status, body, {**early.headers, **extra})


def _answer(status: int, body: bytes, headers: dict[str, str]) -> dict:
    return {"statusCode": status, "headers": {"Content-Type": "application/json", **headers},
            "body": body.decode(), "isBase64Encoded": False}


def _authorised(event: dict, keys: list[bytes]) -> bool:
    given = envelope.header(event, "x-api-key")
    if given is None:
        scheme, _, token = (envelope.header(event, "authorization") or "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    return key_matches(given, keys)


def _events(event: dict, settings: Settings) -> list[bytes | str]:
    """The request's events as the collector splits them (same checks, same order, same reasons)."""
    limit = settings.max_body_bytes
    try:
        kind = envelope.body_kind(envelope.header(event, "content-type"))
        encoding = envelope.content_encoding(envelope.header(event, "content-encoding"))
        body = envelope.raw_body(event)
        if len(body) > limit:
            raise _Answer(413, f"body of {len(body):,} bytes is over the {limit:,}-byte limit")
        if encoding == "gzip":
            body = envelope.gunzip(body, limit)
        events = envelope.split(body, kind)
    except envelope.BodyError as error:
        raise _Answer(error.status, error.message) from None
    if len(events) > settings.max_events_per_request:
        raise _Answer(413, f"{len(events)} events in one request; the limit is {settings.max_events_per_request}")
    return events


def source_ip(event: dict) -> str | None:
    """The address API Gateway saw the request come from: `requestContext.identity.sourceIp` (REST API, payload
    1.0) or `requestContext.http.sourceIp` (HTTP API, payload 2.0); None when the event has neither."""
    context = event.get("requestContext")
    if not isinstance(context, dict):
        return None
    for part in ("http", "identity"):
        value = context.get(part)
        if isinstance(value, dict) and isinstance(value.get("sourceIp"), str):
            return value["sourceIp"]
    return None


def request_country(event: dict, settings: Settings) -> str | None:
    """The client's country for a proxy event, as the collector finds it for a connection (`geo`): the source
    IP, or from a trusted proxy its X-Forwarded-For (or `Forwarded`, `geo_forwarded_header`); None when the lookup
    is off or places no country."""
    resolver = geo.resolver_for(settings)
    if resolver is None:
        return None
    peer = source_ip(event)
    forwarded_for = envelope.header(event, resolver.header) if resolver.trusted and peer else None
    return resolver.country(peer, forwarded_for)


def _validate(events: list[bytes | str], received: dt.datetime, settings: Settings,
              sent_at: dt.datetime | None = None,
              country: str | None = None) -> tuple[dict[str, Any], list[Entry]]:
    """The collector's per-event path: the answer's counts and errors, and the records of the valid events."""
    errors: list[dict[str, Any]] = []
    by_device: dict[str, list[bytes]] = {}
    for index, raw in enumerate(events):
        if isinstance(raw, str):  # already known bad (an NDJSON line that is not JSON is one event)
            errors.append({"index": index, "error": raw})
            continue
        if len(raw) > settings.max_event_bytes:
            errors.append({"index": index, "error": f"event is {len(raw)} bytes, over the "
                                                    f"{settings.max_event_bytes}-byte limit"})
            continue
        result = _VALIDATOR.validate(raw, received, sent_at, country)
        if isinstance(result, schema.Rejection):
            errors.append({"index": index, "error": str(result)})
            continue
        key = partition_key(result.device_id)
        if len(result.line) + len(key.encode()) > MAX_RECORD_BYTES:  # only with max_event_bytes over 1 MiB
            errors.append({"index": index, "error": f"event is {len(result.line)} bytes once stamped, over a "
                                                    f"Kinesis record's {MAX_RECORD_BYTES}-byte limit"})
            continue
        by_device.setdefault(key, []).append(result.line)
    accepted = len(events) - len(errors)
    answer = {"accepted": accepted, "rejected": len(errors), "errors": errors}
    return answer, [entry for key, lines in by_device.items() for entry in device_entries(key, lines)]


def partition_key(device_id: str) -> str:
    """The record's partition key: the device id, so a device's events land on one shard in order (the seed
    used a random key). One over Kinesis' 256 characters is replaced by a digest of it, still one per device."""
    if len(device_id) <= MAX_PARTITION_KEY:
        return device_id
    return "sha256:" + hashlib.sha256(device_id.encode()).hexdigest()


def device_entries(key: str, lines: list[bytes]) -> list[Entry]:
    """A device's canonical lines as records: one, unless they pass a record's size limit together."""
    budget = MAX_RECORD_BYTES - len(key.encode())
    entries: list[Entry] = []
    run: list[bytes] = []
    size = 0
    for line in lines:
        added = len(line) + (1 if run else 0)
        if run and size + added > budget:
            entries.append(Entry(key, b"\n".join(run), len(run)))
            run, size, added = [], 0, len(line)
        run.append(line)
        size += added
    if run:
        entries.append(Entry(key, b"\n".join(run), len(run)))
    return entries


def calls(entries: list[Entry]) -> list[list[int]]:
    """Indices of `entries` grouped into PutRecords calls (≤ 500 records, ≤ 5 MiB each), in order."""
    groups: list[list[int]] = []
    group: list[int] = []
    size = 0
    for i, entry in enumerate(entries):
        if group and (len(group) == MAX_CALL_RECORDS or size + entry.size > MAX_CALL_BYTES):
            groups.append(group)
            group, size = [], 0
        group.append(i)
        size += entry.size
    if group:
        groups.append(group)
    return groups


def _retryable(error: Exception) -> bool:
    """Refused records, a throttled or failing call (by its AWS error code), or a connection that failed."""
    if isinstance(error, _Refused):
        return True
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code") in RETRYABLE_CODES
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover - boto3 is always there in the Lambda runtime
        return False
    return isinstance(error, (BotoConnectionError, HTTPClientError))


def put_entries(client: Any, stream: str, entries: list[Entry]) -> list[str]:
    """Puts every entry and returns their sequence numbers (same order). Refused records are put again alone,
    with backoff; `Throttled` when some are still refused past `RETRY_ATTEMPTS` / `RETRY_TIMEOUT_S`."""
    stream_arg = {"StreamARN": stream} if stream.startswith("arn:") else {"StreamName": stream}
    sequence: list[str | None] = [None] * len(entries)
    last_codes: set[str] = set()
    try:
        for attempt in stamina.retry_context(on=_retryable, attempts=RETRY_ATTEMPTS, timeout=RETRY_TIMEOUT_S,
                                             wait_initial=0.05, wait_max=1.0, wait_jitter=0.1):
            with attempt:
                pending = [i for i, s in enumerate(sequence) if s is None]
                for call in calls([entries[i] for i in pending]):
                    indices = [pending[j] for j in call]
                    response = client.put_records(**stream_arg, Records=[
                        {"Data": entries[i].data, "PartitionKey": entries[i].partition_key} for i in indices])
                    for i, result in zip(indices, response["Records"]):
                        if result.get("SequenceNumber") and not result.get("ErrorCode"):
                            sequence[i] = result["SequenceNumber"]
                        else:
                            code = result.get("ErrorCode") or "no SequenceNumber"
                            if code not in RETRYABLE_CODES:
                                raise RuntimeError(f"Kinesis refused a record: {code}: {result.get('ErrorMessage')}")
                            last_codes.add(code)
                left = sum(s is None for s in sequence)
                if left:
                    logger.warning("Kinesis refused %d of %d records (%s); retrying them", left, len(entries),
                                   ", ".join(sorted(last_codes)))
                    raise _Refused(", ".join(sorted(last_codes)))
    except Exception as error:
        if not _retryable(error):
            raise
        written = sum(s is not None for s in sequence)
        reason = str(error) if isinstance(error, _Refused) else f"{type(error).__name__}: {error}"
        raise Throttled(f"Kinesis did not take every record after {RETRY_ATTEMPTS} attempts ({reason})",
                        written, len(entries)) from error
    return [s for s in sequence if s is not None]


# ------------------------------------------------------------------------------------------- the deployment zip
LAMBDA_PLATFORM = "manylinux2014_x86_64"
LAMBDA_PYTHON = "3.11"
RUNTIME_PROVIDED = frozenset({"boto3", "botocore", "s3transfer", "jmespath", "python-dateutil", "six", "urllib3"})
"""Distributions the Lambda Python runtime already has: not packaged."""

_IMPORTS_PROBE = """
import json, sys
from importlib import metadata
before = set(sys.modules)
import gamestream.integrations.aws
loaded = set(sys.modules) - before
ours = sorted(name for name in loaded if name.split(".")[0] == "gamestream")
tops = {name.split(".")[0] for name in loaded} - set(sys.stdlib_module_names) - {"gamestream"}
owners = metadata.packages_distributions()
dists = {dist: metadata.version(dist) for top in sorted(tops) for dist in owners.get(top, [])}
print(json.dumps({"files": {name: sys.modules[name].__file__ for name in ours}, "dists": dists}))
"""


@dataclass(frozen=True)
class LambdaPackage:
    path: str
    bytes: int
    modules: list[str]
    distributions: dict[str, str]


def package_lambda(out: str | os.PathLike, *, python_version: str = LAMBDA_PYTHON,
                   platform: str = LAMBDA_PLATFORM) -> LambdaPackage:
    """Builds a deployment zip for the Lambda Python runtime at `out`: the gamestream modules `import
    gamestream.integrations.aws` loads, and wheels for `platform` / `python_version` of the distributions they import (the
    versions installed here where the platform has them, so the zip runs what the tests ran), without those the
    runtime provides (boto3). pyarrow is among them only because `gamestream.schema` imports it at the top (for
    the table schema, which the handler never uses).
    Which modules and distributions: found by importing the handler in a fresh interpreter, so a module that
    stops importing pyarrow, say, drops it from the zip by itself."""
    import tempfile
    from pathlib import Path

    found = _probe_imports()
    dists = {name: version for name, version in found["dists"].items()
             if _normalise(name) not in {_normalise(p) for p in RUNTIME_PROVIDED}}
    root = Path(found["files"]["gamestream"]).parent
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="gamestream-lambda-") as work:
        build = Path(work)
        if dists:
            _install_wheels(build, dists, platform=platform, python_version=python_version)
        _copy_modules(build, found["files"], root)
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_zip(build, out)
        installed = dict(p.name.removesuffix(".dist-info").rsplit("-", 1) for p in build.glob("*.dist-info"))
    return LambdaPackage(str(out), out.stat().st_size, sorted(found["files"]), dict(sorted(installed.items())))


def _probe_imports() -> dict[str, Any]:
    """What `import gamestream.integrations.aws` loads in a fresh interpreter (`_IMPORTS_PROBE`): `files`, each
    gamestream module's file; `dists`, the distributions of the other modules, with their versions."""
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", _IMPORTS_PROBE], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise RuntimeError(f"cannot import gamestream.integrations.aws here: {probe.stderr.strip()[-2000:]}")
    return json.loads(probe.stdout)


def _install_wheels(build: Path, dists: dict[str, str], *, platform: str, python_version: str) -> None:
    """pip installs wheels of `dists` for the Lambda platform into `build` (its scripts removed)."""
    import shutil
    import subprocess
    import sys

    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
         "--target", str(build), "--platform", platform, "--implementation", "cp",
         "--python-version", python_version, "--only-binary=:all:",
         # the version tested here, or the newest older one with a wheel for the platform (pyarrow's
         # newest wheels need glibc 2.28; the python3.11 runtime has 2.26)
         *(f"{name}<={version}" for name, version in sorted(dists.items()))],
        capture_output=True, text=True, check=False)
    if pip.returncode != 0:
        raise RuntimeError(f"pip could not fetch the wheels: {(pip.stderr or pip.stdout).strip()[-2000:]}")
    shutil.rmtree(build / "bin", ignore_errors=True)


def _copy_modules(build: Path, files: dict[str, str], root: Path) -> None:
    """The gamestream modules' files (`files`: module → file; `root`: the package's folder) into `build`, at their
    paths in the package."""
    import shutil
    from pathlib import Path

    for file in files.values():
        target = build / Path(file).relative_to(root.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)


def _write_zip(build: Path, out: Path) -> None:
    """`build`'s files (no __pycache__) as a zip at `out`, the same bytes for the same files: sorted, dated
    1980-01-01, modes 755 for executables and 644 for the rest."""
    import zipfile

    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in sorted(build.rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts:
                continue
            info = zipfile.ZipInfo(path.relative_to(build).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if os.access(path, os.X_OK) else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
