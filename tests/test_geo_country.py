"""geo_country (issue 27, item 1): the country of the client's address, without keeping the address.

Through a real `gamestream serve`: the direct peer's country (a server and clients in a network namespace of their
own, whose loopback holds public addresses); X-Forwarded-For believed from a trusted proxy only, walked from the
right; a malformed header falls back on the peer; the whole-batch (Arrow) path, the native kernel and the vendor
routes stamp the same; an operator's MaxMind DB file (built here with a real writer) instead of the bundled data,
and a clear one-line error when it cannot be opened. The Lambda handler takes the request context's source IP.
After each run the addresses are searched for in every file of the data directory (Parquet decoded), in the
server's stderr and in /metrics: they are nowhere.

Countries are those of the pinned data (iptocc 3.3.170, the RIRs' delegations): 81.2.69.160 GB, 1.0.16.1 JP,
2001:4860:4860::8888 US.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collector_server import ServeProcess
from conftest import gamestream, table_rows, write_ndjson
from gamestream import schema
from gamestream.ingest import batch, geo, native_validate
from gamestream.settings import Settings

GB, JP, US6 = "81.2.69.160", "1.0.16.1", "2001:4860:4860::8888"
SPOOFED = "203.0.113.9"  # what a client writes into its own X-Forwarded-For
ADDRESSES = (GB, JP, US6, SPOOFED)
UTC = dt.timezone.utc


def event(device: str, **extra) -> dict:
    return {"eventName": "levelStart", "eventParams": {"device_id": device}, **extra}


def ndjson(*events: dict) -> bytes:
    return b"\n".join(json.dumps(e).encode() for e in events)


def countries(data_dir: Path) -> dict[str, set]:
    """geo_country values per device in the events table."""
    found: dict[str, set] = {}
    for row in table_rows(data_dir / "tables" / "events", ["eventParams", "geo_country"]):
        found.setdefault(row["eventParams"]["device_id"], set()).add(row["geo_country"])
    return found


def assert_nowhere(addresses: tuple[str, ...], data_dir: Path, *texts: str) -> None:
    """No address in any file under `data_dir` (raw bytes, and every Parquet file decoded: pages are
    compressed) nor in `texts` (a server's stderr, /metrics)."""
    files = [path for path in data_dir.rglob("*") if path.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any(p.parent.name == "log" for p in files)
    for path in files:
        raw = path.read_bytes()
        for address in addresses:
            assert address.encode() not in raw, f"{address} in {path}"
        if path.suffix == ".parquet":
            decoded = json.dumps(pq.read_table(path).to_pylist(), default=str)
            for address in addresses:
                assert address not in decoded, f"{address} in {path} (decoded)"
    for text in texts:
        for address in addresses:
            assert address not in text, f"{address} in the output:\n{text}"


def stop(server: ServeProcess) -> str:
    """Stops the server and returns what it wrote to stderr after its start line."""
    server.process.terminate()
    rest = server.process.stderr.read()
    assert server.process.wait(timeout=30) == 0, rest
    server.process.stderr.close()
    return rest


def write_config(data_dir: Path, text: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "gamestream.toml").write_text(text)


def build_mmdb(path: Path, networks: dict[str, dict], database_type: str = "GeoLite2-Country") -> Path:
    """A MaxMind DB file written by mmdb-writer (IPv6 tree with IPv4 inside it, as MaxMind's own files)."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type=database_type)
    for network, record in networks.items():
        writer.insert_network(IPSet([network]), record)
    writer.to_db_file(str(path))
    return path


# ------------------------------------------------------------------------------------------ who the client is
@pytest.mark.parametrize(("peer", "forwarded_for", "client"), [
    (GB, None, GB),
    (GB, JP, GB),  # an untrusted peer's header is not read
    ("10.0.0.5", JP, JP),
    ("10.0.0.5", f"{SPOOFED}, {JP}", JP),  # what the client wrote itself, left of the proxy's, is ignored
    ("10.0.0.5", f"{SPOOFED}, {JP}, 10.9.9.9, 127.0.0.1", JP),  # trusted hops skipped from the right
    ("10.0.0.5", f"{JP}:5555", JP),
    ("10.0.0.5", f"[{US6}]:443", US6),
    ("10.0.0.5", US6, US6),
    ("10.0.0.5", " 10.1.1.1 ,10.2.2.2", "10.1.1.1"),  # every hop trusted: the leftmost
    ("10.0.0.5", f"{JP}, unknown", "10.0.0.5"),  # an unreadable hop: the peer
    ("10.0.0.5", f"{JP}, not an address", "10.0.0.5"),
    ("10.0.0.5", f"[{US6}", "10.0.0.5"),
    ("10.0.0.5", f"{JP}:port", "10.0.0.5"),
    ("10.0.0.5", "", "10.0.0.5"),
    ("10.0.0.5", ",".join(["10.1.1.1"] * (geo.MAX_FORWARDED_HOPS + 1)), "10.0.0.5"),  # too many hops
    ("::ffff:10.0.0.5", JP, JP),  # an IPv4-mapped peer, as a dual-stack socket reports it
    ("not an address", JP, None),
    (None, JP, None),
])
def test_the_client_is_the_peer_or_the_rightmost_untrusted_hop_a_trusted_proxy_names(peer, forwarded_for,
                                                                                      client) -> None:
    trusted = geo.trusted_proxies(("10.0.0.0/8", "127.0.0.1"))
    found = geo.client_address(peer, forwarded_for, trusted)
    assert (str(found) if found is not None else None) == client


@pytest.mark.parametrize(("peer", "forwarded", "client"), [
    ("10.0.0.5", f"for={JP}", JP),
    ("10.0.0.5", f"For={SPOOFED};proto=https, for={JP};by=10.0.0.5", JP),  # the client's own, left, ignored
    ("10.0.0.5", f'for="{JP}:4711", for=10.9.9.9', JP),  # quoted with a port; a trusted hop skipped
    ("10.0.0.5", f'for="[{US6}]:443";proto=https', US6),
    ("10.0.0.5", f'for="\\[{US6}\\]"', US6),  # backslash escapes removed
    ("10.0.0.5", f"for={JP}, for=unknown", "10.0.0.5"),  # an unreadable hop: the peer
    ("10.0.0.5", f"for={JP}, for=_hidden", "10.0.0.5"),  # an obfuscated node
    ("10.0.0.5", f"for={JP}, proto=https", "10.0.0.5"),  # an element without `for`
    ("10.0.0.5", f"for={JP};for=", "10.0.0.5"),
    ("10.0.0.5", f"{JP}", "10.0.0.5"),  # an X-Forwarded-For value is no `Forwarded` element
    (GB, f"for={JP}", GB),  # an untrusted peer's header is not read
])
def test_the_forwarded_header_of_rfc_7239_names_the_client_when_configured(peer, forwarded, client) -> None:
    trusted = geo.trusted_proxies(("10.0.0.0/8", "127.0.0.1"))
    found = geo.client_address(peer, forwarded, trusted, "forwarded")
    assert (str(found) if found is not None else None) == client
    if "for=" in forwarded.lower():  # a `Forwarded` header read as X-Forwarded-For is not understood: the peer
        assert str(geo.client_address(peer, forwarded, trusted)) == peer


def test_the_lambda_handler_reads_the_configured_forwarding_header_from_a_trusted_source_ip() -> None:
    from gamestream.integrations import aws

    def proxy_event(headers: dict) -> dict:  # API Gateway HTTP API, payload 2.0
        return {"version": "2.0", "headers": headers, "requestContext": {"http": {"sourceIp": "10.0.0.5"}}}

    both = proxy_event({"forwarded": f"for={JP}", "x-forwarded-for": GB})
    forwarded = Settings(geo_trusted_proxies=("10.0.0.0/8",), geo_forwarded_header="Forwarded")
    assert forwarded.geo_forwarded_header == "forwarded"  # names are not case-sensitive
    assert aws.request_country(both, forwarded) == "JP"
    assert aws.request_country(both, Settings(geo_trusted_proxies=("10.0.0.0/8",))) == "GB"
    with pytest.raises(ValueError, match="forwarded_header must be 'x-forwarded-for' or 'forwarded'"):
        Settings(geo_forwarded_header="x-real-ip")


def test_countries_of_public_private_and_mapped_addresses() -> None:
    resolver = geo.resolver_for(Settings())
    assert resolver is not None and not resolver.trusted
    assert [resolver.country(a) for a in (GB, JP, US6, f"::ffff:{GB}")] == ["GB", "JP", "US", "GB"]
    for private in ("127.0.0.1", "10.1.2.3", "192.168.1.1", "100.64.0.1", "169.254.1.1", "::1", "fe80::1",
                    "fc00::1", "2001:db8::1", SPOOFED):
        assert resolver.country(private) is None, private
    assert geo.resolver_for(Settings(geo_country=False)) is None


# ----------------------------------------------------------------------------------------- the three validators
def test_the_native_kernel_the_python_validator_and_the_batch_path_stamp_the_same_country() -> None:
    received = dt.datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
    python = schema.EventValidator(event_time="server")
    events = [json.dumps(event(f"d{i}", eventId=f"e{i}", **extra)).encode()
              for i, extra in enumerate([{}, {"geo_country": "FR"}, {"geo_country": None}])]
    assert native_validate.native_validator() is not None, "rebuild native/ (./dev does)"
    for country in ("DE", None):
        proven = native_validate.validate_native(events, received, None, 4, max_event_bytes=4096, country=country)
        assert proven is not None and all(p is not None for p in proven)
        for raw, (line, _) in zip(events, proven):
            mine = python.validate(raw, received, None, country)
            assert json.loads(line) == json.loads(mine.line)
            assert json.loads(line).get("geo_country") == country
    # a given value must be two characters, as a given receivedAt must be a time; the kernel hands it back
    bad = json.dumps(event("d", eventId="x", geo_country="FRA")).encode()
    assert native_validate.validate_native([bad], received, None, 4, max_event_bytes=4096, country="DE") == [None]
    assert str(python.validate(bad, received, None, "DE")) == "geo_country: expected str of length <= 2"

    many = [json.dumps(event(f"b{i}", eventId=f"b{i}", **({"geo_country": "FR"} if i % 2 else {}))).encode()
            for i in range(batch.MIN_BATCH_EVENTS)]
    tables = batch.validate_batch(many, now=received, mode="server", partitions=1, max_event_bytes=4096,
                                  country="DE")
    assert tables is not None and tables[0].column("geo_country").to_pylist() == ["DE"] * len(many)
    kept = batch.validate_batch(many, now=received, mode="input", partitions=1, max_event_bytes=4096, country="DE")
    assert kept is not None and kept[0].column("geo_country").to_pylist() == [None, "FR"] * (len(many) // 2)
    lower = many[:-1] + [json.dumps(event("z", geo_country="fr")).encode()]
    assert batch.validate_batch(lower, now=received, mode="input", partitions=1, max_event_bytes=4096) is None
    assert str(schema.EventValidator(event_time="input").validate(lower[-1], received)) == \
        "geo_country: expected an ISO 3166-1 alpha-2 country code in capitals, such as US"


# ------------------------------------------------------------------------------------------ a real collector
def test_x_forwarded_for_from_a_trusted_proxy_gives_the_clients_country_and_the_addresses_are_kept_nowhere(
        tmp_path: Path) -> None:
    """Loopback is the trusted proxy: its X-Forwarded-For names the client, through /v1/events (per event, and
    a 1000-event request on the whole-batch path) and a vendor route; a header that cannot be read, or none,
    leaves the loopback peer (no country) and never a 5xx."""
    data = tmp_path / "data"
    write_config(data, '[geo]\ntrusted_proxies = ["127.0.0.1", "10.0.0.0/8"]\n')
    server = ServeProcess(data, env={"GAMESTREAM_MAX_EVENTS_PER_REQUEST": "1000"})
    url = server.url
    sent = {
        "xff-jp": JP,
        "xff-gb": f"{SPOOFED}, {GB}, 10.1.2.3",
        "xff-us6": f"[{US6}]:443",
        "xff-malformed": f"{GB}, not-an-address",
        "xff-unknown": "unknown",
    }
    for device, header in sent.items():
        answer = httpx.post(url + "/v1/events", content=ndjson(event(device), event(device, geo_country="FR")),
                            headers={"Content-Type": "application/x-ndjson", "X-Forwarded-For": header})
        assert answer.status_code == 200 and answer.json()["accepted"] == 2, answer.text
    two_lines = httpx.post(url + "/v1/events", json=event("xff-two-lines"),
                           headers=[("X-Forwarded-For", GB), ("X-Forwarded-For", JP)])
    assert two_lines.json()["accepted"] == 1
    assert httpx.post(url + "/v1/events", json=event("no-xff")).json()["accepted"] == 1
    many = [event(f"batch-{i % 7}") for i in range(1000)]  # batch.MIN_BATCH_EVENTS: the Arrow path
    answer = httpx.post(url + "/v1/events", content=ndjson(*many),
                        headers={"Content-Type": "application/x-ndjson", "X-Forwarded-For": GB})
    assert answer.status_code == 200 and answer.json()["accepted"] == 1000
    amplitude = httpx.post(url + "/2/httpapi", json={"api_key": "k", "events": [
        {"event_type": "levelStart", "device_id": "amplitude-jp", "ip": "$remote"}]},
        headers={"X-Forwarded-For": JP})
    assert amplitude.status_code == 200, amplitude.text
    metrics = httpx.get(url + "/metrics").text
    stderr = stop(server)

    processed = gamestream("process", "--until-idle", data_dir=data)
    assert countries(data) == {
        "xff-jp": {"JP"}, "xff-gb": {"GB"}, "xff-us6": {"US"},  # the client's own "FR" replaced
        "xff-malformed": {None}, "xff-unknown": {None}, "xff-two-lines": {"JP"}, "no-xff": {None},
        **{f"batch-{i}": {"GB"} for i in range(7)}, "amplitude-jp": {"JP"},
    }
    assert_nowhere(ADDRESSES, data, stderr, metrics, processed.stdout + processed.stderr)


def test_a_forwarded_header_from_a_trusted_proxy_gives_the_clients_country_and_x_forwarded_for_is_then_ignored(
        tmp_path: Path) -> None:
    """`forwarded_header = "forwarded"`: RFC 7239's header names the client; an X-Forwarded-For beside it (the
    client may have written it, a proxy appending to `Forwarded` passes it through) is not read."""
    data = tmp_path / "data"
    write_config(data, '[geo]\ntrusted_proxies = ["127.0.0.1"]\nforwarded_header = "forwarded"\n')
    server = ServeProcess(data)
    sent = {
        "fwd-jp": {"Forwarded": f"for={JP};proto=https"},
        "fwd-gb": {"Forwarded": f'for={SPOOFED}, for="{GB}:5555"'},
        "fwd-us6": {"Forwarded": f'for="[{US6}]"'},
        "fwd-and-xff": {"Forwarded": f"for={JP}", "X-Forwarded-For": GB},
        "xff-only": {"X-Forwarded-For": GB},
        "fwd-unknown": {"Forwarded": "for=unknown"},
    }
    for device, headers in sent.items():
        answer = httpx.post(server.url + "/v1/events", json=event(device), headers=headers)
        assert answer.status_code == 200 and answer.json()["accepted"] == 1, answer.text
    stderr = stop(server)
    assert "Forwarded trusted from 127.0.0.1" in stderr
    gamestream("process", "--until-idle", data_dir=data)
    assert countries(data) == {"fwd-jp": {"JP"}, "fwd-gb": {"GB"}, "fwd-us6": {"US"}, "fwd-and-xff": {"JP"},
                               "xff-only": {None}, "fwd-unknown": {None}}
    assert_nowhere(ADDRESSES, data, stderr)


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServeProcess(data, env={"GAMESTREAM_GEO_TRUSTED_PROXIES": "10.0.0.0/8"})  # loopback is not one
    for device, header in (("spoofed-gb", GB), ("spoofed-chain", f"{JP}, 10.0.0.1")):
        answer = httpx.post(server.url + "/v1/events", json=event(device), headers={"X-Forwarded-For": header})
        assert answer.json()["accepted"] == 1
    stderr = stop(server)
    gamestream("process", "--until-idle", data_dir=data)
    assert countries(data) == {"spoofed-gb": {None}, "spoofed-chain": {None}}
    assert_nowhere((GB, JP), data, stderr)


# The server and its clients in a network namespace of their own, whose loopback also holds two public
# addresses: a client bound to one of them connects from it, so the server's direct peer is a public address.
NETNS_SETUP = (f'ip link set lo up && ip addr add {GB}/32 dev lo && ip addr add {JP}/32 dev lo && exec "$@"')
CLIENT = """
import json, sys, httpx
url, source, body, headers = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as client:
    answer = client.post(url, content=body, headers={"Content-Type": "application/x-ndjson", **headers})
print(answer.status_code, answer.text)
"""


def _no_namespaces() -> str | None:
    """Why a network namespace cannot be made here, or None."""
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    tried = subprocess.run(["unshare", "--net", "sh", "-c", NETNS_SETUP, "sh", "true"], capture_output=True,
                           text=True, check=False)
    return None if tried.returncode == 0 else f"cannot make a network namespace: {tried.stderr.strip()}"


def test_the_direct_peers_country_is_stamped_and_its_address_is_kept_nowhere(tmp_path: Path) -> None:
    if (reason := _no_namespaces()) is not None:
        pytest.skip(reason)
    data = tmp_path / "data"
    server = ServeProcess(data, prefix=("unshare", "--net", "sh", "-c", NETNS_SETUP, "sh"))

    def post(source: str, body: bytes, headers: dict | None = None) -> None:
        sent = subprocess.run(["nsenter", f"--net=/proc/{server.process.pid}/ns/net", sys.executable, "-c", CLIENT,
                               server.url + "/v1/events", source, body, json.dumps(headers or {})],
                              capture_output=True, text=True, timeout=60, check=False)
        assert sent.returncode == 0 and sent.stdout.startswith("200 "), sent.stdout + sent.stderr

    post(GB, ndjson(event("peer-gb"), event("peer-gb", geo_country="FR")))  # the client's own word is replaced
    post(JP, ndjson(event("peer-jp")))
    post(GB, ndjson(event("peer-gb-says-jp")), {"X-Forwarded-For": JP})  # no proxy is trusted: the peer counts
    post("127.0.0.1", ndjson(event("peer-loopback")))
    stderr = stop(server)
    processed = gamestream("process", "--until-idle", data_dir=data)
    assert countries(data) == {"peer-gb": {"GB"}, "peer-jp": {"JP"}, "peer-gb-says-jp": {"GB"},
                               "peer-loopback": {None}}
    assert_nowhere((GB, JP), data, stderr, processed.stdout + processed.stderr)


# ----------------------------------------------------------------------------------------- an operator's file
def test_an_operators_maxmind_db_gives_the_countries_instead_of_the_bundled_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    # deliberately not the RIRs' answers: SE for GB's block, and only a registered country for US6's
    build_mmdb(data / "countries.mmdb", {"81.2.69.0/24": {"country": {"iso_code": "SE", "names": {"en": "Sweden"}}},
                                         "2001:4860::/32": {"registered_country": {"iso_code": "CH"}}})
    write_config(data, '[geo]\nmmdb = "countries.mmdb"\ntrusted_proxies = ["127.0.0.1"]\n')
    server = ServeProcess(data)
    for device, client in (("mmdb-se", GB), ("mmdb-ch", US6), ("mmdb-none", JP)):
        answer = httpx.post(server.url + "/v1/events", json=event(device), headers={"X-Forwarded-For": client})
        assert answer.json()["accepted"] == 1
    stderr = stop(server)
    gamestream("process", "--until-idle", data_dir=data)
    # JP's block is not in the file: no country (the bundled data is not asked)
    assert countries(data) == {"mmdb-se": {"SE"}, "mmdb-ch": {"CH"}, "mmdb-none": {None}}
    assert_nowhere((GB, JP, US6), data, stderr)


def test_a_replaced_maxmind_db_file_is_opened_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """geoipupdate replaces the file in place; a running collector picks the new data up."""
    monkeypatch.setattr(geo, "RELOAD_CHECK_S", 0.0)
    path = build_mmdb(tmp_path / "geo.mmdb", {"81.2.69.0/24": {"country": {"iso_code": "SE"}}})
    lookup = geo.MmdbLookup(path)
    address = geo.parse_address(GB)
    assert lookup.country(address) == "SE"
    build_mmdb(tmp_path / "new.mmdb", {"81.2.69.0/24": {"country": {"iso_code": "NO"}}})
    os.replace(tmp_path / "new.mmdb", path)
    assert lookup.country(address) == "NO"
    (tmp_path / "broken.mmdb").write_bytes(b"not a database")
    os.replace(tmp_path / "broken.mmdb", path)
    assert lookup.country(address) == "NO"  # a broken replacement: the data opened before goes on


@pytest.mark.parametrize("case", ["missing", "not-a-database", "asn-database", "bad-proxy", "unknown-key",
                                  "bad-header"])
def test_geo_settings_that_cannot_work_stop_serve_at_start_in_one_line(tmp_path: Path, case: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "text.mmdb").write_text("hello")
    build_mmdb(data / "asn.mmdb", {"81.2.69.0/24": {"autonomous_system_number": 20712}}, "GeoLite2-ASN")
    config, expected = {
        "missing": ('[geo]\nmmdb = "nowhere.mmdb"\n', "nowhere.mmdb ([geo] mmdb, GAMESTREAM_GEO_MMDB) does not exist"),
        "not-a-database": ('[geo]\nmmdb = "text.mmdb"\n', "is not a MaxMind DB file"),
        "asn-database": ('[geo]\nmmdb = "asn.mmdb"\n', "is a GeoLite2-ASN database, which holds no countries"),
        "bad-proxy": ('[geo]\ntrusted_proxies = ["10.0.0.0/33"]\n', "'10.0.0.0/33' is not an IP address or network"),
        "unknown-key": ('[geo]\nmmbd = "x.mmdb"\n', "unknown key geo.mmbd"),
        "bad-header": ('[geo]\nforwarded_header = "x-real-ip"\n',
                       "geo.forwarded_header must be 'x-forwarded-for' or 'forwarded'"),
    }[case]
    write_config(data, config)
    ran = gamestream("serve", "--port", "0", data_dir=data, check=False, timeout=60)
    output = ran.stdout + ran.stderr
    assert ran.returncode == 2, output
    assert expected in " ".join(output.split()), output  # rich may wrap the line
    assert "Traceback" not in output


# -------------------------------------------------------------------------------------------- gamestream load
def test_load_keeps_a_files_own_country_code_and_rejects_one_that_is_not(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = write_ndjson(tmp_path / "events.ndjson", [event("load-fr", geo_country="FR"), event("load-none"),
                                                     event("load-lower", geo_country="fr")])
    loaded = gamestream("load", str(path), data_dir=data)
    assert "geo_country: expected an ISO 3166-1 alpha-2 country code in capitals" in loaded.stdout + loaded.stderr
    gamestream("process", "--until-idle", data_dir=data)
    assert countries(data) == {"load-fr": {"FR"}, "load-none": {None}}


def test_an_events_table_from_before_the_column_gains_it(tmp_path: Path) -> None:
    """A table written by an older gamestream (no geo_country) is evolved by the processor: old rows read
    null, new rows carry the code."""
    from deltalake import DeltaTable, write_deltalake

    from gamestream.tables import lake

    data = tmp_path / "data"
    old_schema = pa.schema([f for f in schema.arrow_schema() if f.name != schema.GEO_COUNTRY])
    row = {"eventId": "old-1", "eventName": "levelStart", "eventTime": dt.datetime(2026, 12, 1, tzinfo=UTC),
           "eventParams": {"device_id": "old"}, "receivedAt": dt.datetime(2026, 12, 1, tzinfo=UTC),
           "eventDate": dt.date(2026, 12, 1)}
    write_deltalake(str(data / "tables" / "events"), pa.Table.from_pylist([row], schema=old_schema),
                    partition_by=[schema.PARTITION_COLUMN], configuration=lake.EVENTS_TABLE_CONFIGURATION)
    gamestream("load", str(write_ndjson(tmp_path / "new.ndjson", [event("new", geo_country="JP")])), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    assert countries(data) == {"old": {None}, "new": {"JP"}}
    evolved = pa.schema(DeltaTable(str(data / "tables" / "events")).schema().to_arrow())
    assert evolved.field(schema.GEO_COUNTRY).type == pa.string()


# ------------------------------------------------------------------------------------------- the Lambda handler
@pytest.fixture(scope="module")
def kinesis_stream():
    from s3_store import MotoServer
    from test_aws_lambda import create_stream, kinesis

    server = MotoServer()
    client = kinesis(server)
    yield client, create_stream(client, "gamestream-geo")
    server.stop()


def test_the_lambda_handler_takes_the_country_from_the_request_contexts_source_ip(kinesis_stream) -> None:
    from gamestream.integrations import aws
    from test_aws_lambda import stream_records
    from test_envelope import v1_event, v2_event

    client, name = kinesis_stream

    def call(make, device: str, source: str, headers: dict | None = None, **settings) -> None:
        request = make(json.dumps(event(device, geo_country="FR")), headers)
        context = request["requestContext"]
        (context["identity"] if "identity" in context else context["http"])["sourceIp"] = source
        result = aws.handle(request, client=client, stream=name, settings=Settings(**settings))
        assert result["statusCode"] == 200, result

    call(v1_event, "lambda-v1-gb", GB)  # REST API, payload 1.0: requestContext.identity.sourceIp
    call(v2_event, "lambda-v2-jp", JP)  # HTTP API, payload 2.0: requestContext.http.sourceIp
    call(v2_event, "lambda-v2-us6", US6)
    call(v1_event, "lambda-untrusted", "10.0.0.1", {"X-Forwarded-For": GB})
    call(v1_event, "lambda-trusted", "10.0.0.1", {"X-Forwarded-For": f"{SPOOFED}, {JP}"},
         geo_trusted_proxies=("10.0.0.0/8",))
    call(v2_event, "lambda-off", GB, geo_country=False)
    found = {}
    for record in stream_records(client, name):
        assert not any(address.encode() in record["data"] for address in ADDRESSES)
        for line in record["data"].split(b"\n"):
            stored = json.loads(line)
            found[stored["eventParams"]["device_id"]] = stored.get("geo_country")
    assert found == {"lambda-v1-gb": "GB", "lambda-v2-jp": "JP", "lambda-v2-us6": "US", "lambda-untrusted": None,
                     "lambda-trusted": "JP", "lambda-off": None}
