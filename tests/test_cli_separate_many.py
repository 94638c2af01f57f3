"""`stemset separate` with several files: the workers' job pipeline (the device separates file 2
while file 1's stems are encoded), outputs equal to one file at a time, one bad file fails alone.

No test compares a duration with a wall-clock limit: the overlap is shown by the stages' own
marks, with an encoder that waits for an event (never a sleep) to make file 1's encoding slow.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import gpu_worker.pipeline as pipeline_module
from gpu_worker.audio.encode import encode_audio
from stemset_assets.cli.main import main
from tests.audio_fixtures import music_like, write_audio
from tests.model_fixtures import make_model_repo

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 120  # an event that never comes fails the test after this long, it does not pass it
SECONDS = (1.2, 1.45, 1.7)  # each file its own length, so an encoder can tell them apart


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory):
    return make_model_repo(tmp_path_factory.mktemp("models"))


@pytest.fixture
def takes(model_repo, monkeypatch, tmp_path) -> list[Path]:
    monkeypatch.setenv("STEMSET_MODEL_REPO", str(model_repo))
    monkeypatch.setenv("STEMSET_CONFIG", str(ROOT / "config.yaml"))
    paths = []
    for k, seconds in enumerate(SECONDS):
        path = tmp_path / "in" / f"take{k}.wav"
        path.parent.mkdir(exist_ok=True)
        write_audio(path, music_like(seconds, seed=k), 44100)
        paths.append(path)
    return paths


def separate(files, out: Path, *extra: str) -> int:
    return main(["separate", *map(str, files), "-s", "htdemucs", "-o", str(out), "-f", "flac", "-q", *extra])


class SpyPipeline(pipeline_module.JobPipeline):
    """The real pipeline, with every stage mark recorded by input file and an encoder that makes
    file 0's stems wait until file 1 has started on the device."""

    marks: dict[tuple[str, str], float] = {}
    instances: list[SpyPipeline] = []

    def __init__(self, **kwargs):
        self.names: dict[str, str] = {}
        self.events: dict[tuple[str, str], threading.Event] = {}
        self.lock = threading.Lock()
        cli_observer = kwargs.pop("observer")

        def observe(job_id: str, mark: str, when: float) -> None:
            key = (self.names[job_id], mark)
            SpyPipeline.marks[key] = when
            self.event(*key).set()
            cli_observer(job_id, mark, when)

        waiting_for = self.event("take1.wav", "separate_start")

        def encode(wav, path, fmt, bitrate_kbps=None):
            if wav.shape[-1] == round(SECONDS[0] * 44100):
                assert waiting_for.wait(WAIT_S), "file 1 never started on the device"
            encode_audio(wav, path, fmt, bitrate_kbps)

        super().__init__(encode=encode, observer=observe, **kwargs)
        SpyPipeline.instances.append(self)

    def event(self, name: str, mark: str) -> threading.Event:
        with self.lock:
            return self.events.setdefault((name, mark), threading.Event())

    def submit(self, job, **kwargs):
        self.names[job.job_id] = job.input_key
        return super().submit(job, **kwargs)


def test_device_separates_file_2_before_file_1_is_encoded(takes, tmp_path, monkeypatch, capsys):
    SpyPipeline.marks, SpyPipeline.instances = {}, []
    monkeypatch.setattr(pipeline_module, "JobPipeline", SpyPipeline)
    assert separate(takes, tmp_path / "out") == 0
    assert len(SpyPipeline.instances) == 1  # the CLI used the workers' pipeline, once for all files
    m = SpyPipeline.marks
    assert m[("take1.wav", "separate_start")] < m[("take0.wav", "encode_end")]
    assert m[("take0.wav", "separate_end")] <= m[("take1.wav", "separate_start")]  # one file on the device at once
    out = capsys.readouterr().out
    for k in range(3):
        assert (tmp_path / "out" / f"take{k}" / "manifest.json").exists()
        assert f"take{k}.wav: 4 stems" in out


def test_one_file_alone_does_not_use_the_pipeline(takes, tmp_path, monkeypatch):
    SpyPipeline.instances = []
    monkeypatch.setattr(pipeline_module, "JobPipeline", SpyPipeline)
    assert separate(takes[:1], tmp_path / "out") == 0
    assert SpyPipeline.instances == []
    assert (tmp_path / "out" / "take0" / "manifest.json").exists()


def test_outputs_equal_one_file_at_a_time(takes, tmp_path):
    for path in takes:
        assert separate([path], tmp_path / "alone") == 0
    assert separate(takes, tmp_path / "together") == 0
    for path in takes:
        a = json.loads((tmp_path / "alone" / path.stem / "manifest.json").read_text())
        b = json.loads((tmp_path / "together" / path.stem / "manifest.json").read_text())
        assert a["residual_db"] == b["residual_db"] and a["input_sha256"] == b["input_sha256"]
        assert sorted(a["stems"]) == sorted(b["stems"]) == ["bass", "drums", "other", "vocals"]
        for name, sa in a["stems"].items():
            sb = b["stems"][name]
            for field in ("lufs", "peak_dbfs", "rms_dbfs", "sample_peak", "duration_s", "bytes"):
                assert sa[field] == sb[field], (path.name, name, field)
            x, _ = sf.read(str(tmp_path / "alone" / path.stem / f"{name}.flac"))
            y, _ = sf.read(str(tmp_path / "together" / path.stem / f"{name}.flac"))
            np.testing.assert_array_equal(x, y)


def test_a_corrupt_file_among_good_ones_fails_alone(takes, tmp_path, capsys):
    bad = takes[0].parent / "broken.wav"
    bad.write_text("these are my lyrics, not a recording\n" * 50)
    out = tmp_path / "out"
    assert separate([takes[0], bad, takes[2]], out) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(bad) in errors[0] and "Traceback" not in captured.err
    assert "1 of 3 file(s) failed" in captured.err
    assert not (out / "broken" / "manifest.json").exists()
    assert not (out / "broken").exists() or not any((out / "broken").glob("*.flac"))
    for path in (takes[0], takes[2]):
        manifest = json.loads((out / path.stem / "manifest.json").read_text())
        assert sorted(manifest["stems"]) == ["bass", "drums", "other", "vocals"]
        assert f"{path.name}: 4 stems" in captured.out


def test_two_files_for_one_folder_are_refused_before_any_work(takes, tmp_path, capsys):
    other = tmp_path / "elsewhere" / "take0.flac"
    other.parent.mkdir()
    write_audio(other, music_like(0.5), 44100, fmt="flac")
    assert separate([takes[0], other], tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "take0" in err and "--out" in err
    assert not (tmp_path / "out").exists()
