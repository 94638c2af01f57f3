"""`stemset process`, `stemset catalog` and `stemset dev` end to end: tiny Demucs models, 1-2 s
synthesised takes, a real SQLite Dagster instance, on a local media folder and on SeaweedFS."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from dagster import DagsterInstance

from gpu_worker.stores.local import LocalObjectStore
from gpu_worker.stores.s3 import S3ObjectStore
from stemset_assets.cli.dev import dev_command
from stemset_assets.cli.main import main
from stemset_assets.core.layout import manifest_key
from stemset_assets.defs.partitions import RECORDINGS_PARTITIONS
from tests.audio_fixtures import music_like, write_audio
from tests.configs import tiny_config_yaml
from tests.model_fixtures import make_model_repo
from tests.webserver import dagster_webserver

STEMS = ["drums", "bass", "other", "vocals"]
STORAGE = """\
storage:
  backend: %(backend)s
  local: {root: %(root)s}
  s3:
    endpoint_url: %(endpoint)s
    bucket: %(bucket)s
    region: auto
    access_key_id: ${TEST_S3_KEY:-}
    secret_access_key: ${TEST_S3_SECRET:-}
"""


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory) -> Path:
    return make_model_repo(tmp_path_factory.mktemp("models"))


def write_config(tmp: Path, repo: Path, backend="local", endpoint="http://127.0.0.1:1", bucket="unused") -> Path:
    path = tmp / "config.yaml"
    storage = STORAGE % {"backend": backend, "root": tmp / "media", "endpoint": endpoint, "bucket": bucket}
    path.write_text(tiny_config_yaml(repo, storage=storage, strategies=("vocals_only: {_: htdemucs, vocals: vocals}",)))
    return path


def take(folder: Path, name: str, seconds: float, seed: int) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_audio(path, music_like(seconds, seed=seed), 44100)
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_WEBSERVER_URL", raising=False)
    return tmp_path / "home"


def test_process_catalog_local(tmp_path, model_repo, home, capsys):
    cfg = write_config(tmp_path, model_repo)
    first = take(tmp_path / "takes", "Take One.wav", 1.5, seed=1)
    out = tmp_path / "stems"

    rc = main(["--config", str(cfg), "-q", "process", "h4n", str(first), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    digest = hashlib.sha256(first.read_bytes()).hexdigest()[:12]  # uploads are named by content (issue 14)
    one = f"h4n/take_one-{digest}"
    folder = out / one
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.flac" for s in STEMS)
    assert all((folder / f"{s}.flac").stat().st_size > 1000 for s in STEMS)
    # the summary table: file, strategy, stems, seconds, cost
    header, rule, row = captured.out.strip().splitlines()[:3]
    assert header.split()[:5] == ["file", "strategy", "stems", "seconds", "cost"]
    assert row.startswith("Take One.wav") and "htdemucs" in row and "bass, drums, other, vocals" in row
    assert "$0.0000" in row  # local runs cost nothing
    # the upload, the partition and the run are in the store and the configured instance
    store = LocalObjectStore(tmp_path / "media")
    assert store.exists(f"inputs/h4n/Take One-{digest}.wav") and store.exists(manifest_key(one, "htdemucs"))
    instance = DagsterInstance.from_config(str(home))
    assert instance.get_dynamic_partitions(RECORDINGS_PARTITIONS) == [one]
    assert [r.tags["dagster/partition"] for r in instance.get_runs()] == [one]

    # without files: everything is current, nothing runs
    assert main(["--config", str(cfg), "-q", "process", "h4n"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(instance.get_runs()) == 1

    # a file dropped straight into the inputs, and a second strategy: only what is not current runs
    store.upload(take(tmp_path / "takes", "second.wav", 1.0, seed=2), "inputs/h4n/second.wav")
    rc = main(["--config", str(cfg), "-q", "process", "h4n", "--strategy", "vocals_only", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = [line for line in captured.out.strip().splitlines()[2:] if not line.startswith("done: ")]
    assert sorted(line.split()[0] for line in lines) == ["Take", "second.wav"]  # both lack vocals_only
    assert (out / "h4n" / "second" / "vocals.flac").is_file()
    assert len(instance.get_runs()) == 3

    # the catalog in every format
    assert main(["--config", str(cfg), "catalog", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    states = {(r["partition"], r["strategy"]): r["state"] for r in data["rows"]}
    assert states == {
        (one, "htdemucs"): "current",
        (one, "vocals_only"): "current",
        ("h4n/second", "htdemucs"): "missing",
        ("h4n/second", "vocals_only"): "current",
    }
    assert data["totals"]["recordings"] == 2 and data["totals"]["current"] == 3
    assert main(["--config", str(cfg), "catalog", "--format", "csv"]) == 0
    csv = capsys.readouterr().out.splitlines()
    assert csv[0].startswith("partition,profile,strategy,") and len(csv) == 5
    assert main(["--config", str(cfg), "catalog"]) == 0
    table = capsys.readouterr().out
    assert "h4n/second" in table and "missing" in table and "2 recordings" in table


def test_process_through_the_webserver(tmp_path, model_repo, home, capsys, monkeypatch):
    """With dagster.webserver_url set, `process` launches the runs through the webserver's GraphQL
    (they run in the webserver's subprocesses, not here) and still downloads the stems."""
    cfg = write_config(tmp_path, model_repo)
    good = take(tmp_path / "takes", "Good.wav", 1.0, seed=3)
    bad = tmp_path / "takes" / "notes.wav"
    bad.write_bytes(b"RIFF but not really a wave file" * 20)
    with dagster_webserver(home, cfg) as client:
        monkeypatch.setenv("DAGSTER_WEBSERVER_URL", client.url)
        via = tmp_path / "via-webserver.yaml"
        via.write_text(cfg.read_text() + "dagster:\n  webserver_url: ${DAGSTER_WEBSERVER_URL}\n")
        rc = main(["--config", str(via), "-q", "process", "h4n", str(good), str(bad), "--out", str(tmp_path / "out")])
        captured = capsys.readouterr()
    assert rc == 1 and "notes.wav" in captured.err + captured.out
    good_pk = "h4n/good-" + hashlib.sha256(good.read_bytes()).hexdigest()[:12]
    assert sorted(p.name for p in (tmp_path / "out" / good_pk).iterdir()) == sorted(f"{s}.flac" for s in STEMS)
    runs = DagsterInstance.from_config(str(home)).get_runs()
    # the non-audio file is refused before upload; the good one ran in the webserver's run launcher
    assert {r.tags["dagster/partition"]: r.status.value for r in runs} == {good_pk: "SUCCESS"}
    assert all(r.tags.get("stemset/launched_by") == "stemset process" for r in runs)


def test_process_on_seaweedfs_reports_failures(tmp_path, model_repo, home, seaweed, capsys, monkeypatch):
    bucket = seaweed.make_bucket()
    monkeypatch.setenv("TEST_S3_KEY", seaweed.access_key_id)
    monkeypatch.setenv("TEST_S3_SECRET", seaweed.secret_access_key)
    cfg = write_config(tmp_path, model_repo, backend="s3", endpoint=seaweed.endpoint_url, bucket=bucket)
    good = take(tmp_path / "takes", "Böse Take [1].wav", 1.2, seed=3)
    bad = tmp_path / "takes" / "notes.wav"
    bad.write_text("these are lyrics, not audio\n" * 20)
    out = tmp_path / "stems"

    rc = main(["--config", str(cfg), "-q", "process", "h4n", str(good), str(bad), "--local", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "1 of 2 stem set(s) failed" in captured.err and "notes.wav" in captured.err and "not audio" in captured.err
    assert seaweed.secret_access_key not in captured.out + captured.err
    digest = hashlib.sha256(good.read_bytes()).hexdigest()[:12]
    pk = f"h4n/bose_take_1-{digest}"
    assert sorted(p.name for p in (out / pk).iterdir()) == sorted(f"{s}.flac" for s in STEMS)
    store = S3ObjectStore.from_settings(
        endpoint_url=seaweed.endpoint_url,
        bucket=bucket,
        region="auto",
        access_key_id=seaweed.access_key_id,
        secret_access_key=seaweed.secret_access_key,
    )
    assert store.exists(f"inputs/h4n/Böse Take [1]-{digest}.wav")
    assert not store.exists("inputs/h4n/notes.wav")  # refused before upload
    manifest = json.loads(store.get_bytes(manifest_key(pk, "htdemucs")))
    assert manifest["backend"] == "local" and set(manifest["stems"]) == set(STEMS)
    rows = {line.split()[0]: line for line in captured.out.splitlines() if line.startswith(("Böse", "notes"))}
    assert "FAILED" in rows["notes.wav"] and "FAILED" not in rows["Böse"]


def test_process_errors_before_doing_anything(tmp_path, model_repo, home, capsys):
    cfg = write_config(tmp_path, model_repo)
    wav = take(tmp_path, "a.wav", 0.5, seed=1)
    assert main(["--config", str(cfg), "process", "h4n", str(wav), "--strategy", "nope"]) == 1
    assert "Unknown strategy 'nope'" in capsys.readouterr().err
    assert main(["--config", str(cfg), "process", "nope", str(wav)]) == 1
    assert "no profile named 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "media" / "inputs").exists()


def test_dev_sets_dagster_home_and_runs_the_workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, env = dev_command("cfg.yaml", ["--", "-p", "3001"], {"PATH": os.environ["PATH"]})
    assert (
        argv[1:5] == ["-m", "dagster", "dev", "-w"]
        and argv[5].endswith("workspace.yaml")
        and argv[6:] == ["-p", "3001"]
    )
    assert env["DAGSTER_HOME"] == str(tmp_path / ".dagster_home") and (tmp_path / ".dagster_home").is_dir()
    assert env["STEMSET_CONFIG"] == str(tmp_path / "cfg.yaml")
    _, env = dev_command(None, [], {"DAGSTER_HOME": "/somewhere/else"})
    assert env["DAGSTER_HOME"] == "/somewhere/else" and "STEMSET_CONFIG" not in env


def test_process_output_is_quiet_with_dagster_logs_in_a_file(tmp_path, model_repo, home, capsys):
    """Progress, the table and one result line on the terminal; Dagster's logs (DEBUG lines,
    banners, warnings) in a file whose path is printed; `--verbose` shows them instead."""
    import subprocess
    import sys

    cfg = write_config(tmp_path, model_repo)
    wav = take(tmp_path / "takes", "Quiet take.wav", 1.0, seed=5)
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_WEBSERVER_URL"}
    env.update(DAGSTER_HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from stemset_assets.cli.main import main; sys.exit(main())"]
        + ["--config", str(cfg), "process", "h4n", str(wav), "--out", str(tmp_path / "stems")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for noise in ("DEBUG", "dagster - ", "Traceback", "Welcome to Dagster", "Warning", "STEP_"):
        assert noise not in done.stderr + done.stdout, noise
    (log_line,) = [line for line in done.stderr.splitlines() if line.startswith("Dagster's logs: ")]
    log_path = Path(log_line.removeprefix("Dagster's logs: "))
    assert log_path.parent == home / "logs" and "RUN_SUCCESS" in log_path.read_text()
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 1 stem set(s) in ") and str(tmp_path / "stems") in last and str(log_path) in last
    assert len(done.stdout.strip().splitlines()) == 4  # the table (header, rule, one row) and the result line

    again = take(tmp_path / "takes", "Loud take.wav", 1.0, seed=6)
    rc = main(["--config", str(cfg), "-q", "process", "h4n", str(again), "--verbose", "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert rc == 0 and "dagster - DEBUG" in captured.err and "Dagster's logs" not in captured.err
