"""The job pipeline: the device separates song k+1 while song k is finished on CPU threads,
outputs equal the serial path's, one song's failure stays its own, and memory is bounded.

No test compares a duration with a wall-clock limit: the overlap is shown by the stages' own
timestamps, with an encoder that waits for an event (never a sleep) to make a song's finish slow.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from gpu_worker.audio.encode import encode_audio
from gpu_worker.errors import EncodeError
from gpu_worker.job import SeparationJob, StorageRef
from gpu_worker.pipeline import JobPipeline
from gpu_worker.stores.local import LocalObjectStore
from gpu_worker.strategy import parse_strategy
from gpu_worker.worker import run_job
from tests.audio_fixtures import music_like
from tests.model_fixtures import make_model_repo

TREE = {"_": "htdemucs", "drums": "drums", "bass": "bass", "other": "other", "vocals": "vocals"}
WAIT_S = 120  # an event that never comes fails the test after this long, it does not pass it


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_model_repo(tmp_path_factory.mktemp("models"))


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    for k in range(5):
        sf.write(str(root / f"song{k}.wav"), music_like(1.5 + 0.25 * k, seed=k).T, 44100, subtype="FLOAT")
    return root


def job(root: Path, repo: Path, k: int, prefix: str = "out", fmt: str = "flac") -> SeparationJob:
    return SeparationJob(
        job_id=f"{prefix}-{k}",
        input_key=f"song{k}.wav",
        output_prefix=f"{prefix}/song{k}",
        strategy_name="s",
        strategy=parse_strategy("s", TREE).to_tree(),
        fingerprint="f" * 16,
        storage=StorageRef("local", root=str(root)),
        output_format=fmt,
        bitrate_kbps=None,
        model_repo=str(repo),
        device="cpu",
        seed=7,
    )


class Marks:
    """Every stage mark the pipeline reports, and events a test can wait on."""

    def __init__(self):
        self.marks: dict[tuple[str, str], float] = {}
        self.events: dict[tuple[str, str], threading.Event] = {}
        self.lock = threading.Lock()

    def event(self, job_id: str, mark: str) -> threading.Event:
        with self.lock:
            return self.events.setdefault((job_id, mark), threading.Event())

    def __call__(self, job_id: str, mark: str, when: float) -> None:
        self.marks[(job_id, mark)] = when
        self.event(job_id, mark).set()


def frames(k: int) -> int:
    """Song k's length in frames (every song has its own, so an encoder can tell them apart)."""
    return round((1.5 + 0.25 * k) * 44100)


def waiting_encoder(song: int, until: threading.Event):
    """The real encoder, except that song ``song``'s stems first wait for ``until``."""

    def encode(wav, path, fmt, bitrate_kbps=None):
        if wav.shape[-1] == frames(song):
            assert until.wait(WAIT_S), "the event the slow encoder waits for never came"
        encode_audio(wav, path, fmt, bitrate_kbps)

    return encode


def test_device_starts_song_2_before_song_1_is_encoded(root, repo):
    marks = Marks()
    encode = waiting_encoder(0, until=marks.event("out-1", "separate_start"))
    with JobPipeline(encode=encode, observer=marks) as pipe:
        results = pipe.run_many([job(root, repo, k) for k in range(2)])
    assert all(not isinstance(r, Exception) for r in results), results
    m = marks.marks
    assert m[("out-1", "separate_start")] < m[("out-0", "encode_end")]
    assert m[("out-0", "separate_end")] <= m[("out-1", "separate_start")]  # one song on the device at a time
    # Billing tiles the device's time: song 1 holds it from its fetch until song 2 starts on it.
    held0 = results[0].timings["held"]
    assert held0 < m[("out-0", "finish_end")] - m[("out-0", "fetch_start")]
    assert results[0].billed_seconds == pytest.approx(held0, abs=1e-3)


def test_pipelined_outputs_equal_serial(root, repo):
    serial = [run_job(job(root, repo, k, "serial")) for k in range(3)]
    with JobPipeline() as pipe:
        piped = pipe.run_many([job(root, repo, k, "piped") for k in range(3)])
    for a, b in zip(serial, piped, strict=True):
        assert not isinstance(b, Exception), b
        assert a.residual_db == b.residual_db and a.segments == b.segments
        assert set(a.timings) == set(b.timings)
        for name, fa in a.stems.items():
            fb = b.stems[name]
            for field in ("lufs", "peak_dbfs", "rms_dbfs", "sample_peak", "duration_s", "nonfinite_samples", "bytes"):
                assert getattr(fa, field) == getattr(fb, field), (name, field)
            x, _ = sf.read(str(root / fa.key))
            y, _ = sf.read(str(root / fb.key))
            np.testing.assert_array_equal(x, y)
        manifest = json.loads((root / b.manifest_key).read_text())
        assert manifest["billed_seconds"] == b.billed_seconds


def test_one_songs_encoder_failure_fails_that_job_alone(root, repo):
    def encode(wav, path, fmt, bitrate_kbps=None):
        if path.name == "bass.flac" and wav.shape[-1] == frames(1):
            raise EncodeError(f"Cannot write '{path}': the disk is full (test).")
        encode_audio(wav, path, fmt, bitrate_kbps)

    with JobPipeline(encode=encode) as pipe:
        results = pipe.run_many([job(root, repo, k) for k in range(3)])
    assert isinstance(results[1], EncodeError) and "disk is full" in str(results[1])
    assert not (root / "out/song1").exists() or not any((root / "out/song1").rglob("*.flac"))
    assert not (root / "out/song1/manifest.json").exists()
    for k in (0, 2):
        assert not isinstance(results[k], Exception), results[k]
        assert (root / f"out/song{k}/manifest.json").exists()
        assert sorted(p.name for p in (root / f"out/song{k}").rglob("*.flac")) == [
            "bass.flac",
            "drums.flac",
            "other.flac",
            "vocals.flac",
        ]


def test_queue_bound_holds(root, repo):
    """With song 0 stuck in its encoder, the device may run ahead only as far as the bounded
    queue lets it: song 3 cannot start on the device before song 0 is published."""
    marks = Marks()
    encode = waiting_encoder(0, until=marks.event("out-2", "separate_end"))
    with JobPipeline(prefetch=1, depth=1, finish_workers=1, encode=encode, observer=marks) as pipe:
        results = pipe.run_many([job(root, repo, k) for k in range(5)])
        assert pipe.max_live <= pipe.bound == 4
    assert all(not isinstance(r, Exception) for r in results), results
    m = marks.marks
    assert m[("out-1", "separate_start")] < m[("out-0", "finish_end")]
    assert m[("out-3", "separate_start")] > m[("out-0", "finish_end")]
    # The shares of device time add up to the backlog's wall time (nothing billed twice).
    total = sum(r.timings["held"] for r in results)
    span = max(m[(f"out-{k}", "finish_end")] for k in range(5)) - m[("out-0", "fetch_start")]
    assert total <= span + 0.01
    assert total == pytest.approx(span, rel=0.05)


def test_serial_run_job_is_billed_its_whole_time(root, repo):
    result = run_job(job(root, repo, 0, "alone"))
    assert result.timings["held"] == pytest.approx(result.timings["total"], abs=1e-3)
    assert result.timings["cpu"] > 0
    assert set(result.timings) >= {"decode", "separate", "analyse", "encode", "write", "held", "cpu"}


def test_local_store_only_sees_the_published_sets(root, repo):
    store = LocalObjectStore(root)
    with JobPipeline() as pipe:
        results = pipe.run_many([job(root, repo, k) for k in range(2)], store=store)
    for r in results:
        assert not isinstance(r, Exception)
        assert store.head(r.manifest_key) is not None


def test_handoff_to_a_cpu_function_equals_finishing_here(root, repo):
    """Option A: the device side writes the float stems and lets go; a CPU function (here: a
    WarmWorker's finish_remote, which the Modal app points at its Finisher) publishes the same
    stems and manifest, billed the device seconds the device side held."""
    from gpu_worker.remote import WarmWorker, finish_handoff_json

    direct = run_job(job(root, repo, 0, "direct"))
    worker = WarmWorker(backend="modal", model_repo=str(repo), preload_models=())
    handed = []

    def finish_remote(doc: str) -> str:
        handed.append(json.loads(doc))
        return finish_handoff_json(doc)

    worker.finish_remote = finish_remote
    result = worker.run(replace(job(root, repo, 0, "handoff"), finish_on="cpu_function"))
    assert len(handed) == 1 and sorted(handed[0]["keys"]) == sorted(direct.stems)
    for name, fa in direct.stems.items():
        fb = result.stems[name]
        assert (fa.lufs, fa.peak_dbfs, fa.rms_dbfs, fa.bytes) == (fb.lufs, fb.peak_dbfs, fb.rms_dbfs, fb.bytes)
        np.testing.assert_array_equal(sf.read(str(root / fa.key))[0], sf.read(str(root / fb.key))[0])
    assert result.residual_db == direct.residual_db
    assert result.billed_seconds == pytest.approx(handed[0]["held_s"], abs=1e-3)
    assert result.timings["cpu"] >= result.timings["cpu_function"] > 0
    assert not any(p.suffix == ".f32" for p in root.rglob("*"))  # the handoff objects are gone
    manifest = json.loads((root / result.manifest_key).read_text())
    assert manifest["backend"] == "modal" and manifest["billed_seconds"] == result.billed_seconds


def test_finish_workers_follow_the_cores_or_the_environment(monkeypatch):
    from gpu_worker.pipeline import default_finish_workers

    monkeypatch.delenv("STEMSET_FINISH_WORKERS", raising=False)
    assert default_finish_workers(2) == 1 and default_finish_workers(48) == 12
    monkeypatch.setenv("STEMSET_FINISH_WORKERS", "3")
    assert default_finish_workers(48) == 3
