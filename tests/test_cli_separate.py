"""`stemset separate`: real files in, every stem out at the input's length; clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from gpu_worker.audio.decode import decode_audio
from gpu_worker.audio.resample import resampled_length
from stemset_assets.cli.main import main
from tests.audio_fixtures import music_like, write_audio
from tests.model_fixtures import make_model_repo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory):
    return make_model_repo(tmp_path_factory.mktemp("models"))


@pytest.fixture
def env(model_repo, monkeypatch, tmp_path):
    monkeypatch.setenv("STEMSET_MODEL_REPO", str(model_repo))
    monkeypatch.setenv("STEMSET_CONFIG", str(ROOT / "config.yaml"))
    return tmp_path


def expected_frames(path: Path) -> int:
    info = sf.info(str(path))
    return resampled_length(info.frames, info.samplerate, 44100)


def test_separates_48k_mono_flac_and_24bit_wav(env, capsys):
    flac = env / "mono take.flac"
    write_audio(flac, music_like(2.3, sr=48000, channels=1, seed=1), 48000, fmt="flac")
    wav = env / "take2.wav"
    write_audio(wav, music_like(1.7, sr=44100, channels=2, seed=2), 44100, subtype="PCM_24")
    assert sf.info(str(wav)).subtype == "PCM_24"
    out = env / "out"
    rc = main(
        ["separate", str(flac), str(wav), "--strategy", "htdemucs_6s", "--out", str(out), "--format", "flac", "-q"]
    )
    assert rc == 0
    for src in (flac, wav):
        folder = out / src.stem
        manifest = json.loads((folder / "manifest.json").read_text())
        assert sorted(manifest["stems"]) == sorted(["drums", "bass", "other", "vocals", "guitar", "piano"])
        for stem in manifest["stems"]:
            data, sr = sf.read(str(folder / f"{stem}.flac"), always_2d=True)
            assert sr == 44100 and data.shape[1] == 2
            assert data.shape[0] == expected_frames(src), stem
    assert "6 stems" in capsys.readouterr().out


def test_chained_strategy_and_lossy_format(env):
    src = env / "take.wav"
    write_audio(src, music_like(1.5, seed=3), 44100)
    out = env / "out"
    assert main(["separate", str(src), "-s", "vocals_guitar_piano", "-o", str(out), "-f", "m4a", "-q"]) == 0
    files = sorted(p.name for p in (out / "take").iterdir())
    assert files == sorted(
        ["bass.m4a", "drums.m4a", "guitar.m4a", "manifest.json", "other.m4a", "piano.m4a", "vocals.m4a"]
    )
    decoded, _ = decode_audio(out / "take" / "piano.m4a")
    assert decoded.shape[1] == expected_frames(src)


def run_cli(*args, env_extra=None, timeout=120):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "stemset_assets.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def write_nan_wav(path: Path):
    data = music_like(1.0, seed=4).T.copy()
    data[1000:1010] = np.nan
    sf.write(str(path), data, 44100, subtype="FLOAT")


@pytest.mark.parametrize("case", ["not_audio", "empty", "truncated", "nan"])
def test_bad_input_gives_one_paragraph_error(env, case, capsys):
    path = env / f"{case}.{'flac' if case == 'truncated' else 'wav'}"
    if case == "not_audio":
        path.write_text("these are my lyrics, not a recording\n" * 50)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        full = env / "full.flac"
        write_audio(full, music_like(3.0, seed=5), 44100, fmt="flac")
        blob = full.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    else:
        write_nan_wav(path)
    rc = main(["separate", str(path), "-o", str(env / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: ") and "Traceback" not in err
    assert path.name in err
    assert len(err.strip().splitlines()) == 1  # one paragraph
    assert not (env / "out" / path.stem / "manifest.json").exists()


def test_unknown_strategy_lists_known_ones(env, capsys):
    src = env / "take.wav"
    write_audio(src, music_like(0.5), 44100)
    assert main(["separate", str(src), "-s", "karaoke", "-q"]) == 1
    err = capsys.readouterr().err
    assert "karaoke" in err and "htdemucs_ft" in err


def test_unknown_model_in_repo(env, capsys, tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text((ROOT / "config.yaml").read_text().replace("_: htdemucs_6s", "_: htdemucs_9s"))
    src = env / "take.wav"
    write_audio(src, music_like(0.5), 44100)
    assert main(["separate", str(src), "-s", "htdemucs_6s", "--config", str(cfg), "-q"]) == 1
    err = capsys.readouterr().err
    assert "htdemucs_9s" in err and "not in the model repo" in err


def test_missing_model_offline_says_how_to_set_the_repo(tmp_path):
    src = tmp_path / "take.wav"
    write_audio(src, music_like(0.5), 44100)
    env_extra = {
        "STEMSET_MODEL_REPO": "",
        "STEMSET_CONFIG": str(ROOT / "config.yaml"),
        "HF_HUB_OFFLINE": "1",
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_HOME": str(tmp_path / "hf"),
    }
    proc = run_cli("separate", str(src), "-o", str(tmp_path / "out"), "-q", env_extra=env_extra)
    assert proc.returncode == 1
    assert "models.repo" in proc.stderr and "STEMSET_MODEL_REPO" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_traceback(env):
    path = env / "bad.wav"
    path.write_bytes(b"RIFF0000WAVEjunk")
    proc = run_cli("separate", str(path), "--debug", "-q", env_extra={"STEMSET_MODEL_REPO": str(env)})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_missing_file(env, capsys):
    assert main(["separate", str(env / "nope.wav"), "-q"]) == 1
    assert "nope.wav" in capsys.readouterr().err


def test_common_options_work_before_and_after_nested_subcommands():
    from stemset_assets.cli.main import build_parser

    for argv in (
        ["api", "serve", "--debug", "-q", "--config", "x.yaml"],
        ["--debug", "-q", "--config", "x.yaml", "api", "serve"],
        ["worker", "serve", "--debug", "-q", "--config", "x.yaml"],
    ):
        args = build_parser().parse_args(argv)
        assert (args.debug, args.quiet, args.config) == (True, True, "x.yaml"), argv
