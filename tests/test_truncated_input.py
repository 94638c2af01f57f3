"""Issue 14, deliver 6: a file cut short fails (naming the user's file, not a temporary copy)
unless it holds at least STEMSET_MIN_DECODED_FRACTION (default 0.99) of what its header
promises; the option accepts it knowingly. Files are cut at many points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpu_worker.audio.decode import decode_audio, probe_audio
from gpu_worker.audio.info import AudioWarning
from gpu_worker.errors import AudioError
from stemset_assets.core.uploads import UploadRejected, check_audio_file
from tests.audio_fixtures import music_like, write_audio
from tests.model_fixtures import make_model_repo

ROOT = Path(__file__).resolve().parent.parent
SR = 44100
# The fractions of a WAV's data kept: the 1%, then up to just below and above 99%.
CUTS = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98, 0.985)


def cut_wav(folder: Path, keep: float, seconds: float = 2.0, name: str = "take.wav") -> Path:
    full = write_audio(folder / f"full_{name}", music_like(seconds), SR, "wav", "PCM_16")
    data = full.read_bytes()
    header = 44
    cut = folder / name
    cut.write_bytes(data[: header + int((len(data) - header) * keep) // 4 * 4])
    return cut


@pytest.mark.parametrize("keep", CUTS)
def test_wav_cut_below_the_fraction_is_an_error(tmp_path, keep):
    cut = cut_wav(tmp_path, keep)
    for call in (lambda: decode_audio(cut), lambda: probe_audio(cut)):
        with pytest.raises(AudioError) as err:
            call()
        text = str(err.value)
        assert str(cut) in text and "truncated" in text and f"{keep:.1%}" in text, text
        assert "STEMSET_MIN_DECODED_FRACTION=0" in text  # says how to accept it knowingly


def test_wav_cut_above_the_fraction_decodes_with_a_warning(tmp_path):
    cut = cut_wav(tmp_path, 0.995)
    with pytest.warns(AudioWarning, match="truncated"):
        wav, _ = decode_audio(cut)
    assert 0.99 * 2 * SR < wav.shape[1] < 2 * SR


@pytest.mark.parametrize(("fraction", "keep", "ok"), [("0.4", 0.5, True), ("0.6", 0.5, False), ("0", 0.01, True)])
def test_the_fraction_is_configurable(tmp_path, monkeypatch, fraction, keep, ok):
    monkeypatch.setenv("STEMSET_MIN_DECODED_FRACTION", fraction)
    cut = cut_wav(tmp_path, keep)
    if ok:
        with pytest.warns(AudioWarning):
            wav, _ = decode_audio(cut)
        assert wav.shape[1] > 0
    else:
        with pytest.raises(AudioError, match="below the 60%"):
            decode_audio(cut)


def test_a_bad_fraction_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("STEMSET_MIN_DECODED_FRACTION", "lots")
    with pytest.raises(AudioError, match="STEMSET_MIN_DECODED_FRACTION='lots' must be a fraction"):
        decode_audio(cut_wav(tmp_path, 0.5))


def test_upload_check_names_the_upload_not_the_spool_file(tmp_path):
    cut = cut_wav(tmp_path, 0.01)
    spooled = tmp_path / "upload"
    spooled.write_bytes(cut.read_bytes())
    with pytest.raises(UploadRejected) as err:
        check_audio_file(spooled, "take 3.wav")
    assert err.value.status == 400
    assert "'take 3.wav'" in str(err.value) and str(spooled) not in str(err.value)


def _separate(tmp_path: Path, repo: Path, path: Path, *extra: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"models: {{repo: {repo}}}\nstrategies:\n  htdemucs: {{_: htdemucs, vocals: vocals, drums: drums}}\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "STEMSET_CONFIG": str(cfg)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "stemset_assets.cli",
            "separate",
            str(path),
            "--out",
            str(tmp_path / "out"),
            "-q",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )


def test_separate_fails_naming_the_users_file_and_publishes_nothing(tmp_path):
    repo = make_model_repo(tmp_path / "repo")
    cut = cut_wav(tmp_path, 0.01, name="cut take.wav")
    out = _separate(tmp_path, repo, cut)
    assert out.returncode == 1, out.stderr
    assert str(cut) in out.stderr and "truncated" in out.stderr, out.stderr
    assert "stemset-job-" not in out.stderr  # not the worker's temporary copy
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.wav"))

    accepted = _separate(tmp_path, repo, cut, "--accept-truncated")
    assert accepted.returncode == 0, accepted.stderr
    assert str(cut) in accepted.stderr and "stemset-job-" not in accepted.stderr  # the warning too
    assert (tmp_path / "out" / "cut take" / "manifest.json").is_file()
