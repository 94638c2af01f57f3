"""The fault-injection suite (issue 14, deliver 9): the separator process SIGKILLed, and the S3
server stopped, at set points of a job (before and after separating, mid-upload, mid-publish, at
the commit); repeated re-uploads and same-name sequences; inputs cut at many points.

Every case asserts: nothing lost (the set a reader finds is complete: the old one before the
commit point, the new one after), nothing half-written visible (the state rule reads ``current``,
never ``broken``; staging is no fact), a retry succeeds, and staging is empty afterwards. Real
processes, a real folder and a real SeaweedFS server (its own, so stopping it disturbs no other
test); no mocks. docs/reliability.md tabulates what this suite tries.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gpu_worker.errors import AudioError
from gpu_worker.job import SeparationJob, StorageRef
from gpu_worker.models import model_identity
from gpu_worker.stores.base import ObjectStore
from gpu_worker.stores.local import LocalObjectStore
from gpu_worker.stores.s3 import S3ObjectStore
from gpu_worker.strategy import fingerprint, parse_strategy
from gpu_worker.worker import run_job
from stemset_assets.core.set_facts import collect_states
from stemset_assets.core.state import CURRENT, Target
from tests.audio_fixtures import music_like, write_audio
from tests.conftest import SeaweedServer, _start, _stop, _weed_binary
from tests.model_fixtures import make_model_repo
from tests.remote_fixtures import aws_env

ROOT = Path(__file__).resolve().parents[2]
PK, STRATEGY = "h4n/take", "htdemucs"
PREFIX = f"outputs/{PK}/{STRATEGY}"
INPUT = "inputs/h4n/take.wav"
TREE = {"_": "htdemucs", "drums": "drums", "bass": "bass", "other": "other", "vocals": "vocals"}
KILL_POINTS = (
    "download:after:1",  # before separating
    "upload:before:1",  # after separating, before the first stem is staged
    "upload:after:2",  # mid-upload
    "publish:after:1",  # mid-publish: one stem in its set folder
    "publish:after:3",  # mid-publish: three of four
    "manifest:before:1",  # every stem in place, not committed
    "manifest:after:1",  # committed, the old set and staging not yet removed
)
S3_KILL_POINTS = ("upload:after:2", "publish:after:2", "manifest:after:1")
S3_DOWN_POINTS = ("upload:before:2", "publish:before:2", "manifest:before:1")
COMMITTED = {"manifest:after:1"}

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_model_repo(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def fault_s3(tmp_path_factory) -> Iterator[SeaweedServer]:
    """A SeaweedFS of this module's own: the suite stops and restarts it."""
    weed = _weed_binary()
    if weed is None or os.environ.get("STEMSET_SKIP_S3") == "1":
        pytest.skip("no SeaweedFS (weed) binary")
    server = _start(
        weed, tmp_path_factory.mktemp("fault-s3"), "FAULTKEY" + os.urandom(4).hex().upper(), "x" * 30, "auto"
    )
    yield server
    _stop(server.process)


def restart(server: SeaweedServer) -> None:
    """Start the stopped server again on the same data folder and ports; wait until it answers."""
    with open(server.log_path, "ab") as log:
        server.process = subprocess.Popen(
            server.command,
            cwd=server.data_dir.parent,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            start_new_session=True,
        )
    client = server.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            # Up means serving reads, not only metadata: the volume server comes back after the
            # master, so read one object of every bucket.
            for bucket in client.list_buckets()["Buckets"]:
                listed = client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=1).get("Contents", [])
                for obj in listed:
                    client.get_object(Bucket=bucket["Name"], Key=obj["Key"])["Body"].read()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    raise RuntimeError(f"SeaweedFS did not come back:\n{server.log_tail()}")


def s3_store(server: SeaweedServer, bucket: str) -> S3ObjectStore:
    return S3ObjectStore.from_settings(
        server.endpoint_url,
        bucket,
        access_key_id=server.access_key_id,
        secret_access_key=server.secret_access_key,
        connect_timeout=1,
        read_timeout=10,
        max_attempts=2,
    )


def make_job(store: ObjectStore, repo: Path, job_id: str, seed: int = 1) -> SeparationJob:
    parsed = parse_strategy(STRATEGY, TREE)
    if isinstance(store, LocalObjectStore):
        ref = StorageRef("local", root=str(store.root))
    else:
        ref = StorageRef("s3", bucket=store.bucket, endpoint_url=store.endpoint_url)
    return SeparationJob(
        job_id=job_id,
        input_key=INPUT,
        output_prefix=PREFIX,
        strategy_name=STRATEGY,
        strategy=parsed.to_tree(),
        fingerprint=fingerprint(parsed, {m: model_identity(m, str(repo)) for m in parsed.models}),
        storage=ref,
        output_format="flac",
        bitrate_kbps=None,
        model_repo=str(repo),
        device="cpu",
        seed=seed,
    )


def put_input(store: ObjectStore, tmp: Path, seed: int) -> str:
    path = tmp / f"in{seed}.wav"
    write_audio(path, music_like(1.0, seed=seed), 44100)
    store.upload(path, INPUT)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(store: ObjectStore, sha: str) -> None:
    """recording.json as the recording asset writes it (the state rule reads it)."""
    doc = {"source_sha256": sha, "input_etag": store.head(INPUT).etag, "original_key": INPUT, "duration_s": 1.0}
    store.put_bytes(f"recordings/{PK}/recording.json", json.dumps(doc).encode())


def reader_view(store: ObjectStore, job: SeparationJob) -> dict:
    """What a reader finds: the manifest, every stem it lists (complete, right size), and the one state rule."""
    doc = json.loads(store.get_bytes(f"{PREFIX}/manifest.json"))  # a manifest is always there
    for name, stem in doc["stems"].items():
        info = store.head(stem["key"])
        assert info is not None and info.size == stem["bytes"], f"{name}: {stem['key']} missing or short"
    (row,) = collect_states(
        store, [PK], [STRATEGY], {("h4n", STRATEGY): Target(job.fingerprint, "flac")}, {"h4n": frozenset({STRATEGY})}
    )
    assert row.state.state == CURRENT, row.state  # never broken, never missing
    return doc


def leftovers(store: ObjectStore) -> list[str]:
    """Objects under the set's prefix beyond the manifest and the stems it lists."""
    doc = json.loads(store.get_bytes(f"{PREFIX}/manifest.json"))
    keep = {f"{PREFIX}/manifest.json", *(s["key"] for s in doc["stems"].values())}
    return sorted(i.key for i in store.list(PREFIX + "/") if i.key not in keep)


def run_driver(job: SeparationJob, point: str, tmp: Path, env: dict[str, str], mode: str = "kill") -> subprocess.Popen:
    path = tmp / f"{job.job_id}.json"
    path.write_text(job.to_json())
    full = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "PYTHONPATH": str(ROOT),
        "STEMSET_FAULT": mode,
        "STEMSET_FAULT_MARK": str(tmp / "mark"),
        "STEMSET_FAULT_GO": str(tmp / "go"),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.faults.driver", str(path), point],
        cwd=ROOT,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def old_set(store: ObjectStore, repo: Path, tmp: Path) -> tuple[SeparationJob, dict]:
    """The set that is there before the faulty job: made by job 'old' from the same input."""
    sha = put_input(store, tmp, seed=1)
    record(store, sha)
    old = make_job(store, repo, "old", seed=7)
    run_job(old, store=store)
    return old, reader_view(store, old)


def check_after_fault(store, job, before, point, retry_env=None):
    """The reader's view after the fault, then a retry of the same job, then nothing left over."""
    view = reader_view(store, job)
    expected = "new" if point in COMMITTED else "old"
    assert view["job_id"] == expected, (point, view["job_id"])
    if expected == "old":
        assert view == before  # nothing lost: the old set, byte for byte the same manifest
    run_job(job, store=store)  # the retry: the same job id, as a worker's caller resubmits it
    after = reader_view(store, job)
    assert after["job_id"] == "new"
    assert leftovers(store) == [], point  # staging empty, old set and interrupted attempts gone


@pytest.mark.parametrize("point", KILL_POINTS)
def test_separator_killed_at_each_point_on_a_folder(tmp_path, repo, point):
    store = LocalObjectStore(tmp_path / "media")
    _, before = old_set(store, repo, tmp_path)
    job = make_job(store, repo, "new", seed=8)
    proc = run_driver(job, point, tmp_path, {})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err[-2000:]
    check_after_fault(store, job, before, point)


@pytest.mark.s3
@pytest.mark.parametrize("point", S3_KILL_POINTS)
def test_separator_killed_at_each_point_on_s3(tmp_path, repo, fault_s3, point):
    store = s3_store(fault_s3, fault_s3.make_bucket())
    _, before = old_set(store, repo, tmp_path)
    job = make_job(store, repo, "new", seed=8)
    proc = run_driver(job, point, tmp_path, aws_env(fault_s3))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err[-2000:]
    check_after_fault(store, job, before, point)


@pytest.mark.s3
@pytest.mark.parametrize("point", S3_DOWN_POINTS)
def test_s3_server_stopped_mid_job(tmp_path, repo, fault_s3, point):
    store = s3_store(fault_s3, fault_s3.make_bucket())
    _, before = old_set(store, repo, tmp_path)
    job = make_job(store, repo, "new", seed=8)
    proc = run_driver(job, point, tmp_path, aws_env(fault_s3), mode="pause")
    deadline = time.monotonic() + 300
    while not (tmp_path / "mark").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _stop(fault_s3.process)  # the S3 server goes away at the point
    (tmp_path / "go").write_text("go")
    _, err = proc.communicate(timeout=300)
    restart(fault_s3)
    assert proc.returncode == 1, err[-2000:]
    tail = err.strip().splitlines()[-1]
    assert "Could not reach the S3 endpoint" in tail, tail  # says what happened...
    if point.startswith("upload"):
        assert "Nothing was published" in tail, tail
    else:
        assert "previously published set is still the one its manifest lists" in tail, tail
    check_after_fault(store, job, before, point)  # ...and it is true; the retry succeeds


def test_repeated_reuploads_and_same_name_sequences(tmp_path, repo):
    """Five re-uploads of new content under one name, each separated; and the same name sent
    five times with five contents at once and in a row: every set complete, nothing left over."""
    from dagster import instance_for_test

    from stemset_assets.defs.intake import ingest_file

    store = LocalObjectStore(tmp_path / "media")
    for i in range(5):
        sha = put_input(store, tmp_path, seed=10 + i)
        record(store, sha)
        job = make_job(store, repo, f"re{i}", seed=1)
        result = run_job(job, store=store)
        doc = reader_view(store, job)
        assert doc["input_sha256"] == result.input_sha256 == sha and leftovers(store) == []

    files = []
    for i in range(5):
        path = tmp_path / f"same{i}.wav"
        write_audio(path, music_like(0.5, seed=20 + i), 44100)
        files.append(path)
    with instance_for_test() as instance:
        with ThreadPoolExecutor(5) as pool:
            at_once = list(pool.map(lambda p: ingest_file(store, instance, "h4n", p, "same  name.wav"), files))
        in_a_row = [ingest_file(store, instance, "h4n", p, "same name.wav") for p in files]
    assert len({i.partition for i in at_once}) == 5 and [i.partition for i in in_a_row] == [
        i.partition for i in at_once
    ]
    for ingested, path in zip(at_once, files, strict=True):
        assert store.get_bytes(ingested.object_key) == path.read_bytes()  # nothing lost or swapped


CUT_FORMATS = ("wav", "flac", "mp3", "ogg", "m4a")
STATES_LENGTH = {"wav", "flac", "m4a"}  # headers that promise a length; raw MP3 frames and Ogg do not


@pytest.mark.parametrize("fmt", CUT_FORMATS)
def test_inputs_cut_at_many_points(tmp_path, fmt):
    """Each file cut at 20 points: it fails with an AudioError naming it, or (only where its
    header promises no length, or >= 99% of the promise is there) decodes; never another
    exception, never a silently short decode of a file whose header promised more."""
    import warnings

    from gpu_worker.audio.decode import decode_audio

    full = write_audio(tmp_path / f"full.{fmt}", music_like(2.0, seed=3), 44100, fmt)
    data = full.read_bytes()
    expect = decode_audio(full)[0].shape[1]
    refused = 0
    for i in range(1, 21):
        cut = tmp_path / f"cut{i}.{fmt}"
        cut.write_bytes(data[: len(data) * i // 21])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wav, _ = decode_audio(cut)
        except AudioError as err:
            assert cut.name in str(err), str(err)
            refused += 1
            continue
        if fmt in STATES_LENGTH:  # within 1%, or (MP4's edit list) within the 0.1 s container tolerance
            assert wav.shape[1] >= min(0.99 * expect, expect - 4410), (fmt, i, wav.shape[1], expect)
    if fmt in ("wav", "flac"):
        assert refused == 20  # every cut of these loses more than 1%: all refused
