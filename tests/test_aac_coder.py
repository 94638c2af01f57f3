"""The AAC coder option (``output.aac_coder``, ``--aac-coder``, ``SeparationJob.aac_coder``) reaches
FFmpeg's encoder: fast and twoloop write different files that both decode to the input's length
and rate; the default is fast, twoloop is byte-identical to FFmpeg's own default (the encoder before
the option); bad values are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from gpu_worker.audio.decode import decode_audio
from gpu_worker.audio.encode import AAC_CODERS, StemWriter, _FFmpegSink, encode_audio
from gpu_worker.errors import ConfigError, EncodeError, JobError
from gpu_worker.job import SeparationJob, StorageRef
from stemset_assets.cli.main import main
from stemset_assets.config import AAC_CODERS as CONFIG_AAC_CODERS
from stemset_assets.config.loading import load_config
from tests.audio_fixtures import music_like, write_audio
from tests.model_fixtures import make_model_repo

ROOT = Path(__file__).resolve().parent.parent
SR = 44100


def snr_db(x: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((y - x).astype(np.float64) ** 2)))


def test_coder_reaches_the_encoder(tmp_path):
    x = music_like(2.0, seed=3)[:, : 2 * SR - 7]
    files = {}
    for coder in (None, *AAC_CODERS):
        files[coder] = path = tmp_path / f"{coder}.m4a"
        encode_audio(x, path, "m4a", 192, aac_coder=coder)
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            assert (stream.codec_context.name, stream.codec_context.sample_rate) == ("aac", SR)
        y, _ = decode_audio(path)
        assert y.shape == x.shape, coder
        assert snr_db(x, y) > 18, coder
    assert files[None].read_bytes() == files["fast"].read_bytes()  # Stemset's default
    assert files["fast"].read_bytes() != files["twoloop"].read_bytes()
    # twoloop is what the encoder wrote before the option: FFmpeg's AAC encoder with no options
    old = tmp_path / "old.m4a"
    sink = _FFmpegSink(old, "m4a", 192, SR, 2)
    sink.write(np.ascontiguousarray(x.T))
    sink.close()
    assert old.read_bytes() == files["twoloop"].read_bytes()


def test_unknown_coder_is_an_encode_error(tmp_path):
    with pytest.raises(EncodeError, match="anmr") as info:
        StemWriter(tmp_path / "x.m4a", "m4a", aac_coder="anmr")
    assert "twoloop, fast" in (info.value.hint or "")
    assert not list(tmp_path.iterdir())


def test_config_reads_the_coder_and_rejects_others(tmp_path):
    assert CONFIG_AAC_CODERS == AAC_CODERS
    base = "strategies:\n  s: {_: htdemucs, vocals: vocals}\nprofiles:\n  h4n: {strategies: [s], output: %s}\n"
    path = tmp_path / "config.yaml"
    path.write_text(base % "{format: m4a}")
    assert load_config(path, env={}).profiles["h4n"].output.aac_coder == "fast"
    path.write_text(base % "{format: m4a, aac_coder: twoloop}")
    assert load_config(path, env={}).profiles["h4n"].output.aac_coder == "twoloop"
    path.write_text(base % "{format: m4a, aac_coder: anmr}")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert "profiles.h4n.output.aac_coder" in message and "twoloop, fast" in message and "anmr" in message


def job(**kw) -> SeparationJob:
    return SeparationJob(
        job_id="j",
        input_key="in.wav",
        output_prefix="out",
        strategy_name="s",
        strategy={"_": "htdemucs", "vocals": "vocals"},
        fingerprint="f" * 16,
        storage=StorageRef("local", root="/tmp"),
        **kw,
    )


def test_job_carries_the_coder_and_leaves_it_out_when_unset():
    assert "aac_coder" not in json.loads(job().to_json())  # a worker deployed before the field reads it
    fast = job(aac_coder="fast")
    assert SeparationJob.from_json(fast.to_json()) == fast


def test_job_with_an_unknown_coder_fails_before_separating(tmp_path):
    from gpu_worker.stages import fetch

    with pytest.raises(JobError, match="anmr"):
        fetch(job(aac_coder="anmr"))


def test_cli_flag_reaches_the_stems(tmp_path, monkeypatch):
    monkeypatch.setenv("STEMSET_MODEL_REPO", str(make_model_repo(tmp_path / "models")))
    monkeypatch.setenv("STEMSET_CONFIG", str(ROOT / "config.yaml"))
    src = tmp_path / "take.wav"
    write_audio(src, music_like(1.3, seed=5), SR)
    for coder in ("twoloop", "fast"):
        argv = ["separate", str(src), "-s", "htdemucs", "-o", str(tmp_path / coder), "-f", "m4a", "-q"]
        assert main([*argv, "--aac-coder", coder]) == 0
    for stem in ("drums", "bass", "other", "vocals"):
        a, b = (tmp_path / c / "take" / f"{stem}.m4a" for c in ("twoloop", "fast"))
        assert a.read_bytes() != b.read_bytes(), stem
        assert decode_audio(a)[0].shape == decode_audio(b)[0].shape == (2, round(1.3 * SR))
