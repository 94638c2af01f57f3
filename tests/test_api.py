"""The web API against a real `stemset api serve` on loopback: upload -> job -> stems downloadable,
the catalog, auth, and bad input (too big, not audio, hostile names, unknown profile)."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import httpx
import pytest

from stemset_assets.api.server import check_bind, is_loopback
from stemset_assets.cli.main import main
from stemset_assets.core.uploads import UploadRejected, check_audio_file, safe_filename, sniff_audio
from tests.api_server import api_server, wait_for_job, write_config
from tests.audio_fixtures import music_like, write_audio
from tests.model_fixtures import make_model_repo
from tests.webserver import dagster_webserver

STEMS = {"drums", "bass", "other", "vocals"}


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory) -> Path:
    return make_model_repo(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_repo):
    with api_server(tmp_path_factory.mktemp("api"), model_repo) as srv:
        yield srv


def wav_bytes(seconds: float, seed: int, tmp: Path) -> bytes:
    path = tmp / f"take{seed}.wav"
    write_audio(path, music_like(seconds, seed=seed), 44100)
    return path.read_bytes()


def upload(server, name: str, data: bytes, profile: str = "h4n", headers=None, **fields) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/upload/{profile}",
        files={"file": (name, data, "audio/wav")},
        data=fields or None,
        headers=server.headers() if headers is None else headers,
        timeout=30,
    )


def test_upload_job_stems_and_catalog(server, tmp_path):
    data = wav_bytes(1.2, 1, tmp_path)
    resp = upload(server, "../../etc/Café Take\u0301.wav", data)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    digest = hashlib.sha256(data).hexdigest()[:12]  # uploads are named by content too (issue 14)
    assert body["status"] in ("queued", "running") and body["partition"] == f"h4n/cafe_take-{digest}"
    # the hostile path is gone, the Unicode name kept (NFC)
    assert body["object_key"] == "inputs/h4n/" + unicodedata.normalize("NFC", f"Café Take\u0301-{digest}.wav")
    assert (server.media / body["object_key"]).is_file()
    assert not (server.media.parent / "etc").exists() and not (server.media / "etc").exists()

    job = wait_for_job(server, body["job_id"])
    assert job["status"] == "complete", job
    assert job["error"] is None and job["progress"] == 1.0 and job["run_id"]
    assert set(job["stems"]) == STEMS and job["stem_sets"] == {"htdemucs": job["stems"]}
    assert {s["step"] for s in job["steps"]} >= {"recording"}
    # the run happened in the worker process, not in the API server's own process
    from dagster import DagsterInstance

    instance = DagsterInstance.from_config(str(server.media.parent / "home"))
    pids = {
        r.event_log_entry.dagster_event.pid
        for r in instance.get_records_for_run(job["run_id"]).records
        if r.event_log_entry.dagster_event is not None
    }
    assert pids and server.process.pid not in pids
    # Stem URLs never come from the request's Host header (a client could point them anywhere).
    forged = httpx.get(
        f"{server.url}/api/jobs/{body['job_id']}", headers={**server.headers(), "Host": "evil.example"}, timeout=10
    ).json()
    assert forged["stems"] == job["stems"] and "evil.example" not in json.dumps(forged)
    for name, url in job["stems"].items():
        assert url.startswith(f"/api/media/outputs/h4n/cafe_take-{digest}/htdemucs/"), (
            url
        )  # root-relative: no Host header
        url = server.url + url
        got = httpx.get(url, headers=server.headers(), timeout=10)
        assert got.status_code == 200 and got.content[:4] == b"fLaC", name
        assert got.headers["content-type"] == "audio/flac"
        assert httpx.get(url, timeout=10).status_code == 401  # media needs the token too

    catalog = httpx.get(f"{server.url}/api/recordings", headers=server.headers(), timeout=30).json()
    (rec,) = [r for r in catalog["recordings"] if r["partition"] == body["partition"]]
    assert rec["profile"] == "h4n" and rec["duration_s"] == pytest.approx(1.2, abs=0.01)
    assert rec["strategies"]["htdemucs"]["state"] == "current"
    assert rec["strategies"]["htdemucs"]["stems"] == job["stems"]
    assert catalog["totals"]["current"] >= 1

    config = httpx.get(f"{server.url}/api/config", headers=server.headers(), timeout=10).json()
    assert config["profiles"]["h4n"]["strategies"] == ["htdemucs"] and config["max_upload_mb"] == 1

    page = httpx.get(f"{server.url}/", timeout=10)  # the page itself holds no data: no token needed
    assert page.status_code == 200 and "Stemset" in page.text and "/static/app.js" in page.text
    assert httpx.get(f"{server.url}/static/app.js", timeout=10).status_code == 200


def test_auth_is_required_and_the_token_never_leaks(server, tmp_path):
    for method, path in [
        ("GET", "/api/recordings"),
        ("GET", "/api/config"),
        ("GET", "/api/jobs/abc"),
        ("POST", "/api/upload/h4n"),
        ("GET", "/api/media/outputs/h4n/x/htdemucs/drums.flac"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {server.token}"}):
            resp = httpx.request(method, f"{server.url}{path}", headers=headers, timeout=10)
            assert resp.status_code == 401, (method, path, headers)
            assert resp.json()["error"]["type"] == "AuthError"
            assert server.token not in resp.text
    assert not (server.media / "inputs" / "h4n" / "x.wav").exists()
    assert httpx.get(f"{server.url}/api/jobs/nosuchjob", headers=server.headers(), timeout=10).status_code == 404
    assert server.token not in server.log()


def test_bad_uploads_are_refused_with_clear_errors(server, tmp_path):
    good = wav_bytes(0.5, 2, tmp_path)
    cases = [
        ("too big", upload(server, "big.wav", good[:44] + b"\0" * (1024 * 1024 + 10)), 413, "limit is 1 MB"),
        ("far too big", upload(server, "big.wav", good[:44] + b"\0" * (2 * 1024 * 1024)), 413, "limit is 1 MB"),
        ("text as wav", upload(server, "notes.wav", b"these are lyrics\n" * 50), 415, "is not audio"),
        ("png as wav", upload(server, "cover.wav", b"\x89PNG\r\n\x1a\n" + b"\0" * 200), 415, "is not audio"),
        ("wrong extension", upload(server, "take.txt", good), 415, "audio file extension"),
        ("broken wav", upload(server, "broken.wav", good[:12] + b"garbage!" * 40), 400, "could not be read"),
        ("empty", upload(server, "empty.wav", b""), 400, "is empty"),
        ("unknown profile", upload(server, "take.wav", good, profile="nope"), 404, "No profile named 'nope'"),
        ("unknown strategy", upload(server, "take.wav", good, strategy="nope"), 400, "No strategy named 'nope'"),
        (
            "no file",
            httpx.post(f"{server.url}/api/upload/h4n", data={"x": "1"}, headers=server.headers(), timeout=10),
            400,
            "no file field",
        ),
    ]
    for what, resp, status, text in cases:
        assert resp.status_code == status, (what, resp.status_code, resp.text)
        assert text in resp.json()["error"]["message"], (what, resp.text)
        assert str(server.media) not in resp.text and "/tmp" not in resp.text, what  # no server paths
    assert not (server.media / "inputs" / "h4n" / "notes.wav").exists()
    assert not any(
        p.name in ("big.wav", "cover.wav", "broken.wav", "empty.wav", "take.wav")
        for p in (server.media / "inputs").rglob("*")
    )


def test_safe_filenames():
    assert safe_filename("../../etc/passwd.wav") == "passwd.wav"
    assert safe_filename("..\\..\\windows\\system.ini.wav") == "system.ini.wav"
    assert safe_filename("a\x00b\x1f\x7fc.WAV") == "abc.wav"
    assert safe_filename("...hidden.wav") == "hidden.wav"
    assert safe_filename("..") == "upload" and safe_filename("") == "upload" and safe_filename(".wav") == "wav"
    long = safe_filename("ä" * 300 + ".flac")
    assert long.endswith(".flac") and len(long.encode()) <= 120 and long.startswith("ää")
    assert safe_filename("Café \u2615 | take <1>?.m4a") == "Café \u2615 take 1.m4a"
    assert sniff_audio(b"RIFF\0\0\0\0WAVEfmt ") == "wav" and sniff_audio(b"fLaC") == "flac"
    assert sniff_audio(b"\0\0\0\x20ftypM4A ") == "mp4" and sniff_audio(b"<html>") is None


def test_check_audio_file_names_only_the_upload(tmp_path):
    path = tmp_path / "secret-server-path.bin"
    path.write_bytes(b"RIFF\x10\0\0\0WAVE" + b"junk" * 10)
    with pytest.raises(UploadRejected) as err:
        check_audio_file(path, "take.wav")
    assert err.value.status == 400 and "take.wav" in str(err.value) and str(path) not in str(err.value)


def test_serve_refuses_unsafe_binds(tmp_path, model_repo, monkeypatch, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    check_bind("0.0.0.0", "tok", True)  # a token makes a public bind fine
    monkeypatch.delenv("STEMSET_API_TOKEN", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    cfg = write_config(tmp_path / "on", model_repo, auth=True)
    assert main(["--config", str(cfg), "api", "serve", "--port", "1"]) == 1
    assert "api.auth is true but api.token is empty" in capsys.readouterr().err
    cfg = write_config(tmp_path / "off", model_repo, auth=False)
    assert main(["--config", str(cfg), "api", "serve", "--host", "0.0.0.0", "--port", "1"]) == 1
    assert "Refusing to serve the web API on 0.0.0.0 without a token" in capsys.readouterr().err


def test_jobs_go_through_the_webserver_when_one_is_configured(tmp_path, model_repo):
    from dagster import DagsterInstance

    folder = tmp_path / "api"
    with (
        dagster_webserver(folder / "home", write_config(folder, model_repo)) as client,
        api_server(folder, model_repo, sections=f"dagster:\n  webserver_url: {client.url}\n") as server,
    ):
        body = upload(server, "Through the webserver.wav", wav_bytes(1.0, 4, tmp_path)).json()
        job = wait_for_job(server, body["job_id"])
    assert job["status"] == "complete" and job["via"] == "webserver", job
    assert set(job["stems"]) == STEMS
    run = DagsterInstance.from_config(str(folder / "home")).get_run_by_id(job["run_id"])
    assert run.tags["stemset/job_id"] == body["job_id"] and run.tags["dagster/partition"] == body["partition"]
