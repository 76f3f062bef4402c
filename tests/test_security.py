"""Safe when exposed: no open server off loopback, keys checked and never shown (docs/security.md)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gamestream.ingest.auth import exposure_problem, is_loopback, key_matches
from gamestream.settings import Settings


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.1.2.3", False), ("192.168.0.10", False),
    ("no-such-host.invalid", False),
])
def test_loopback_means_every_address_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_open_server_is_allowed_only_on_loopback_or_when_asked_for() -> None:
    assert exposure_problem(Settings(host="127.0.0.1")) is None
    problem = exposure_problem(Settings(host="0.0.0.0"))
    assert problem and "--api-key" in problem and "--insecure-no-auth" in problem
    assert exposure_problem(Settings(host="0.0.0.0", insecure_no_auth=True)) is None
    assert exposure_problem(Settings(host="0.0.0.0", api_keys=("w",))) is None
    assert exposure_problem(Settings(host="0.0.0.0", admin_keys=("a",))) is None


def test_key_comparison_takes_only_an_exact_key() -> None:
    keys = [b"alpha-key", b"beta-key"]
    assert key_matches("beta-key", keys)
    assert not key_matches("beta-ke", keys)
    assert not key_matches("beta-keyX", keys)
    assert not key_matches("", keys)
    assert not key_matches(None, keys)
    assert not key_matches("alpha-key", [])


def _serve(data_dir: Path, *args: str, stderr_path: Path, env: dict | None = None) -> subprocess.Popen:
    """`gamestream --log-format json serve … <args>`, its stderr in a file (a pipe nobody reads could fill)."""
    with open(stderr_path, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "gamestream", "--log-format", "json", "serve", "--data-dir", str(data_dir),
             "--port", "0", *args],
            stdout=subprocess.DEVNULL, stderr=stderr, text=True, env={**os.environ, **(env or {})})


def _wait_for_port(stderr_path: Path, process: subprocess.Popen) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = re.search(r"listening on http://[^:]+:(\d+)", stderr_path.read_text())
        if match:
            return int(match[1])
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"serve did not start: {stderr_path.read_text()}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def test_serve_on_all_interfaces_without_keys_refuses_to_start(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    process = _serve(tmp_path / "data", "--host", "0.0.0.0", stderr_path=err,
                     env={"GAMESTREAM_API_KEYS": "", "GAMESTREAM_ADMIN_KEYS": ""})
    code = process.wait(timeout=60)
    text = err.read_text()
    assert code != 0
    assert "refusing to listen on 0.0.0.0 with no keys" in text
    assert "--api-key" in text and "--admin-key" in text and "--insecure-no-auth" in text
    assert "Traceback" not in text and "listening on" not in text


def test_serve_on_all_interfaces_with_insecure_no_auth_starts_and_warns(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    process = _serve(tmp_path / "data", "--host", "0.0.0.0", "--insecure-no-auth", stderr_path=err)
    try:
        port = _wait_for_port(err, process)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    finally:
        _stop(process)
    text = err.read_text()
    assert "warning" in text.lower() and "without keys" in text and "0.0.0.0" in text


def test_keys_never_appear_in_answers_metrics_or_logs(tmp_path: Path) -> None:
    write_key, admin_key = "w-SECRET-4b1d0c3e", "a-SECRET-9f8e7d6c"
    err = tmp_path / "stderr"
    process = _serve(tmp_path / "data", "--host", "0.0.0.0", "--api-key", write_key, "--admin-key", admin_key,
                     stderr_path=err)
    answers: list[str] = []
    try:
        port = _wait_for_port(err, process)
        base = f"http://127.0.0.1:{port}"
        event = b'{"eventName":"levelStart","eventParams":{"device_id":"d1"}}'
        near_misses = [write_key[:-1], write_key + "x", admin_key.upper(), "Bearer " + write_key, "none"]
        with httpx.Client(base_url=base, timeout=10) as client:
            for wrong in near_misses:
                for header in ("X-API-Key", "Authorization"):
                    value = f"Bearer {wrong}" if header == "Authorization" else wrong
                    response = client.post("/v1/events", content=event, headers={header: value})
                    assert response.status_code == 401
                    answers.append(response.text + str(response.headers))
                    for path in ("/v1/dashboard", "/"):
                        response = client.get(path, headers={header: value})
                        assert response.status_code == 401
                        answers.append(response.text + str(response.headers))
                    response = client.post("/v1/sql", json={"query": "select 1"}, headers={header: value})
                    assert response.status_code == 401
                    answers.append(response.text + str(response.headers))
            # the write key is not an admin key, and the admin key is not a write key
            response = client.post("/v1/sql", json={"query": "select 1"}, headers={"X-API-Key": write_key})
            assert response.status_code == 401
            answers.append(response.text)
            response = client.post("/v1/events", content=event, headers={"X-API-Key": admin_key})
            assert response.status_code == 401
            answers.append(response.text)
            # the right keys work, and what they return does not echo them
            response = client.post("/v1/events", content=event, headers={"Authorization": f"Bearer {write_key}"})
            assert response.status_code == 200, response.text
            answers.append(response.text + str(response.headers))
            response = client.get("/v1/dashboard", params={"key": admin_key})
            assert response.status_code == 200
            answers.append(response.text)
            response = client.post("/v1/sql", json={"query": "select 1 as one"}, headers={"X-API-Key": admin_key})
            assert response.status_code == 200 and response.json()["rows"] == [[1]]
            answers.append(response.text)
            metrics = client.get("/metrics").text
            assert 'status="401"' in metrics  # the refusals were counted…
    finally:
        _stop(process)
    logs = err.read_text()
    for secret in (write_key, admin_key, write_key[:-1]):
        for answer in answers:
            assert secret not in answer
        assert secret not in metrics  # …without the keys
        assert secret not in logs


def test_sql_body_is_bounded_like_an_ingest_body(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    process = _serve(tmp_path / "data", stderr_path=err, env={"GAMESTREAM_MAX_BODY_BYTES": "4096"})
    try:
        port = _wait_for_port(err, process)
        query = "select 1 as one -- " + "x" * 8000
        response = httpx.post(f"http://127.0.0.1:{port}/v1/sql", json={"query": query}, timeout=10)
        assert response.status_code == 413 and "4,096-byte limit" in response.json()["error"]
        response = httpx.post(f"http://127.0.0.1:{port}/v1/sql", json={"query": "select 1 as one"}, timeout=10)
        assert response.status_code == 200 and response.json()["rows"] == [[1]]
    finally:
        _stop(process)
