"""gpu_worker.audio: probe and decode (every input format, rates, channel counts, layouts),
streaming decode, and the module's contracts.

All fixtures are synthesised here and written to tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tracemalloc
import warnings
from dataclasses import FrozenInstanceError, asdict, replace
from fractions import Fraction

import av
import numpy as np
import pytest

from gpu_worker.audio import decode
from gpu_worker.audio.channels import downmix_matrix
from gpu_worker.audio.decode import decode_audio, iter_decode, probe_audio
from gpu_worker.audio.info import SAMPLE_RATE, AudioInfo
from gpu_worker.audio.resample import resampled_length

try:
    from tests.audio_fixtures import amp_at, music_like, peak_freq, tone, write_audio
except ImportError:  # tests/ is on sys.path instead of the repo root
    from audio_fixtures import amp_at, music_like, peak_freq, tone, write_audio

# A healthy file must decode without AudioWarning; tests that expect one use pytest.warns.
pytestmark = pytest.mark.filterwarnings("error::gpu_worker.audio.info.AudioWarning")

SR = SAMPLE_RATE


# --------------------------------------------------------------------------------------
# Decoding: every input format, several rates and channel counts
# --------------------------------------------------------------------------------------

# (write format, rate, channels, subtype, container, codec, bit depth)
DECODE_CASES = [
    ("wav", 8000, 1, "PCM_16", "wav", "pcm_s16le", 16),
    ("wav", 22050, 2, "PCM_16", "wav", "pcm_s16le", 16),
    ("wav", 44100, 2, "PCM_24", "wav", "pcm_s24le", 24),
    ("wav", 48000, 6, "PCM_16", "wav", "pcm_s16le", 16),
    ("wav", 48000, 1, "PCM_32", "wav", "pcm_s32le", 32),
    ("wav", 96000, 2, "FLOAT", "wav", "pcm_f32le", 32),
    ("wav", 96000, 6, "FLOAT", "wav", "pcm_f32le", 32),
    ("wavex", 48000, 6, "PCM_24", "wav", "pcm_s24le", 24),
    ("aiff", 44100, 2, "PCM_16", "aiff", "pcm_s16be", 16),
    ("flac", 8000, 1, "PCM_16", "flac", "flac", 16),
    ("flac", 44100, 2, "PCM_16", "flac", "flac", 16),
    ("flac", 96000, 6, "PCM_24", "flac", "flac", 24),
    ("mp3", 8000, 1, None, "mp3", "mp3", None),
    ("mp3", 22050, 2, None, "mp3", "mp3", None),
    ("mp3", 44100, 2, None, "mp3", "mp3", None),
    ("mp3", 48000, 2, None, "mp3", "mp3", None),
    ("ogg", 22050, 1, None, "ogg", "vorbis", None),
    ("ogg", 44100, 2, None, "ogg", "vorbis", None),
    ("ogg", 48000, 6, None, "ogg", "vorbis", None),
    ("ogg", 96000, 2, None, "ogg", "vorbis", None),
    ("opus", 48000, 2, None, "ogg", "opus", None),
    ("opus", 16000, 1, None, "ogg", "opus", None),
    ("opus", 48000, 6, None, "ogg", "opus", None),
    ("m4a", 22050, 1, None, "m4a", "aac", None),
    ("m4a", 44100, 2, None, "m4a", "aac", None),
    ("m4a", 48000, 6, None, "m4a", "aac", None),
    ("m4a", 96000, 2, None, "m4a", "aac", None),
    ("webm", 48000, 2, None, "webm", "opus", None),
    ("webm", 48000, 1, None, "webm", "opus", None),
]


@pytest.mark.parametrize(
    "fmt,sr,channels,subtype,container,codec,bits",
    DECODE_CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2]}ch-{c[3] or 'default'}" for c in DECODE_CASES],
)
def test_decode_every_format(tmp_path, fmt, sr, channels, subtype, container, codec, bits):
    n = int(sr * 1.25) + 3  # not a multiple of any codec frame size
    src = tone(997, n / sr, sr, channels, amp=0.5)[:, :n]
    ext = "wav" if fmt == "wavex" else fmt
    path = write_audio(tmp_path / f"in.{ext}", src, sr, fmt, subtype)

    info = probe_audio(path)
    # Opus always decodes at 48 kHz whatever rate was fed to the encoder.
    src_rate = 48000 if codec == "opus" else sr
    assert info == AudioInfo(
        container=container,
        codec=codec,
        sample_rate=src_rate,
        channels=channels,
        duration_s=pytest.approx(info.frames / src_rate),
        frames=resampled_length(n, sr, src_rate),  # every fixture codec gives gapless, exact lengths
        bit_depth=bits,
    )
    assert info.duration_s == pytest.approx(n / sr, abs=1e-4)

    wav, dinfo = decode_audio(path)
    assert dinfo == info
    assert wav.dtype == np.float32
    assert wav.shape == (2, round(info.frames * SR / info.sample_rate))
    # the tone survives the resampler and the codec, at the right level on both sides
    assert peak_freq(wav[0], SR) == pytest.approx(997, abs=2)
    assert peak_freq(wav[1], SR) == pytest.approx(997, abs=2)
    mid = wav[:, SR // 10 : -SR // 10]
    rms = np.sqrt(np.mean(mid.astype(np.float64) ** 2, axis=1))
    lossless = bits is not None
    assert rms == pytest.approx([0.5 / math.sqrt(2)] * 2, rel=0.01 if lossless else 0.08)


@pytest.mark.parametrize("sr", [8000, 11025, 22050, 44100, 48000, 88200, 96000, 192000])
@pytest.mark.parametrize("n", [1, 7, 12345])
def test_exact_output_length(tmp_path, sr, n):
    x = (np.random.default_rng(n).uniform(-0.5, 0.5, (1, n))).astype(np.float32)
    path = write_audio(tmp_path / "x.wav", x, sr, "wav", "FLOAT")
    wav, info = decode_audio(path)
    assert info.frames == n
    assert wav.shape == (2, round(n * SR / sr)) == (2, resampled_length(n, sr, SR))
    blocks = list(iter_decode(path, block_frames=1000))
    assert sum(b.shape[1] for b in blocks) == wav.shape[1]
    # other targets follow the same contract
    w48, _ = decode_audio(path, sample_rate=48000, channels=1)
    assert w48.shape == (1, round(n * 48000 / sr))


def test_output_length_of_a_lossless_input_survives_resampling_exactly(tmp_path):
    x = music_like(1.0, 48000)
    path = write_audio(tmp_path / "x.flac", x, 48000, "flac", "PCM_24")
    wav, info = decode_audio(path, sample_rate=48000)
    assert info.frames == x.shape[1] and wav.shape == x.shape
    assert np.max(np.abs(wav - x)) < 2**-23  # no resampler runs when the rates match


def test_resampler_keeps_tones_and_removes_what_cannot_be_represented(tmp_path):
    sr = 96000
    x = tone(15000, 1.0, sr, 1, 0.4) + tone(30000, 1.0, sr, 1, 0.4)  # 30 kHz > 22.05 kHz Nyquist
    path = write_audio(tmp_path / "hi.wav", x, sr, "wav", "FLOAT")
    wav, _ = decode_audio(path)
    core = wav[0, SR // 10 : SR // 10 + SR // 2]  # 0.5 s: whole cycles of both tones
    assert amp_at(core, 15000, SR) == pytest.approx(0.4, rel=0.01)
    alias = 44100 - 30000  # where 30 kHz would fold to without a proper low-pass
    assert amp_at(core, alias, SR) < 0.4 * 10 ** (-80 / 20)
    # upsampling an 8 kHz file leaves a 1 kHz tone where it was and adds nothing above 4 kHz
    path8 = write_audio(tmp_path / "lo.wav", tone(1000, 1.0, 8000, 1, 0.5), 8000, "wav", "FLOAT")
    up, _ = decode_audio(path8)
    spec = np.abs(np.fft.rfft(up[0, SR // 10 : SR // 10 + SR // 2] * np.hanning(SR // 2)))
    freqs = np.fft.rfftfreq(SR // 2, 1 / SR)
    assert freqs[np.argmax(spec)] == pytest.approx(1000, abs=2)
    assert spec[freqs > 4500].max() < spec.max() * 1e-4


def test_mono_is_duplicated_and_stereo_can_be_mixed_to_mono(tmp_path):
    x = music_like(1.0, 22050, channels=1)
    path = write_audio(tmp_path / "mono.wav", x, 22050, "wav", "FLOAT")
    wav, info = decode_audio(path)
    assert info.channels == 1 and wav.shape[0] == 2
    np.testing.assert_array_equal(wav[0], wav[1])
    assert np.std(wav[0]) > 0.05
    one, _ = decode_audio(path, channels=1)
    np.testing.assert_array_equal(one[0], wav[0])

    st = np.stack([tone(500, 1, SR, 1, 0.4)[0], tone(700, 1, SR, 1, 0.2)[0]])
    path = write_audio(tmp_path / "st.wav", st, SR, "wav", "FLOAT")
    m, _ = decode_audio(path, channels=1)
    np.testing.assert_allclose(m[0], st.mean(axis=0), atol=1e-7)


# Six distinct tones, one per channel; FL FR FC LFE BL BR in SMPTE/WAVEX order.
SIX_FREQS = {"FL": 300, "FR": 500, "FC": 700, "LFE": 60, "BL": 1100, "BR": 1300}
H = 1 / math.sqrt(2)
ITU_NORM = 1 + H + H  # each side: front 1, centre .707, surround .707; LFE dropped


def _six(order, sr=48000, amp=0.3):
    return np.concatenate([tone(SIX_FREQS[name], 1.0, sr, 1, amp) for name in order])


def _side_amps(wav, sr=SR):
    core = wav[:, sr // 10 : sr // 10 + 4 * sr // 5]  # 0.8 s: whole cycles of every tone
    return [{name: amp_at(ch, f, sr) for name, f in SIX_FREQS.items()} for ch in core]


def _expect_itu(amps, amp, rel):
    left, right = amps
    expected_l = {"FL": 1, "FR": 0, "FC": H, "LFE": 0, "BL": H, "BR": 0}
    expected_r = {"FL": 0, "FR": 1, "FC": H, "LFE": 0, "BL": 0, "BR": H}
    for name in SIX_FREQS:
        for got, gains in ((left, expected_l), (right, expected_r)):
            want = amp * gains[name] / ITU_NORM
            assert got[name] == pytest.approx(want, rel=rel, abs=0.004), (name, got, want)


@pytest.mark.parametrize("fmt,subtype", [("wavex", "PCM_24"), ("flac", "PCM_24")])
def test_downmix_six_channels_with_a_layout_is_itu_style(tmp_path, fmt, subtype):
    order = ("FL", "FR", "FC", "LFE", "BL", "BR")  # the WAVEX 5.1 mask and FLAC's own 6-ch order
    path = write_audio(tmp_path / f"six.{'wav' if fmt == 'wavex' else fmt}", _six(order), 48000, fmt, subtype)
    wav, info = decode_audio(path)
    assert info.channels == 6 and wav.shape[0] == 2
    _expect_itu(_side_amps(wav), 0.3, rel=0.01)


def test_downmix_six_channel_vorbis_uses_the_vorbis_channel_order(tmp_path):
    order = ("FL", "FC", "FR", "BL", "BR", "LFE")  # Vorbis I spec, section 4.3.9
    path = write_audio(tmp_path / "six.ogg", _six(order), 48000, "ogg")
    wav, _ = decode_audio(path)
    _expect_itu(_side_amps(wav), 0.3, rel=0.05)


@pytest.mark.parametrize("fmt", ["m4a", "opus"])
def test_downmix_six_channels_from_ffmpeg_layouts(tmp_path, fmt):
    order = ("FL", "FR", "FC", "LFE", "BL", "BR")  # FFmpeg's 5.1, as the fixture writer labels it
    path = write_audio(tmp_path / f"six.{fmt}", _six(order), 48000, fmt, bitrate_kbps=256)
    wav, _ = decode_audio(path)
    _expect_itu(_side_amps(wav), 0.3, rel=0.06)


def test_downmix_six_channels_without_layout_keeps_every_track(tmp_path):
    order = ("FL", "FR", "FC", "LFE", "BL", "BR")
    path = write_audio(tmp_path / "six_plain.wav", _six(order), 48000, "wav", "PCM_24")  # no channel mask
    (left, right) = _side_amps(decode_audio(path)[0])
    for name in ("FL", "FC", "BL"):  # channels 1, 3, 5 -> L
        assert left[name] == pytest.approx(0.1, rel=0.01) and right[name] < 1e-3
    for name in ("FR", "LFE", "BR"):  # channels 2, 4, 6 -> R (nothing dropped)
        assert right[name] == pytest.approx(0.1, rel=0.01) and left[name] < 1e-3


def test_downmix_matrix_never_clips():
    rng = np.random.default_rng(0)
    x = rng.choice([-1.0, 1.0], size=(10000, 6)).astype(np.float32)
    for layout in (("FL", "FR", "FC", "LFE", "BL", "BR"), None):
        m = downmix_matrix(6, layout)
        assert m.shape == (2, 6)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-6)
        assert np.max(np.abs(x @ m.T)) <= 1.0 + 1e-6
    assert downmix_matrix(2, None) is None
    np.testing.assert_array_equal(downmix_matrix(1, None), [[1.0], [1.0]])
    np.testing.assert_allclose(downmix_matrix(2, None, target=1), [[0.5, 0.5]])
    to_mono = downmix_matrix(6, ("FL", "FR", "FC", "LFE", "BL", "BR"), target=1)
    np.testing.assert_allclose(to_mono[0], [0.5, 0.5, H, 0, H / 2, H / 2] / np.float32(ITU_NORM), rtol=1e-6)


def test_decode_audio_survives_a_header_that_understates_the_length(tmp_path, monkeypatch):
    path = write_audio(tmp_path / "m.wav", music_like(3.0, 48000), 48000, "wav", "PCM_24")
    honest, info = decode_audio(path)
    real_open = decode.open_source

    def lying_open(p):  # 2.5% short: the 13th of 14 blocks overflows, the small 14th would fit
        src = real_open(p)
        src.info = replace(src.info, frames=int(src.info.frames * 0.975))
        return src

    monkeypatch.setattr(decode, "open_source", lying_open)
    monkeypatch.setattr(decode, "_DECODE_BLOCK", 10000)
    wav, lied = decode_audio(path)
    np.testing.assert_array_equal(wav, honest)  # every block kept, in order
    assert lied.frames == info.frames  # the count reported is what was decoded


# --------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,sr",
    [("wav", 48000), ("flac", 44100), ("mp3", 32000), ("ogg", 22050), ("m4a", 44100), ("opus", 48000)],
)
def test_iter_decode_equals_decode_audio(tmp_path, fmt, sr):
    path = write_audio(tmp_path / f"m.{fmt}", music_like(2.3, sr), sr, fmt)
    whole, _ = decode_audio(path)
    for block_frames in (SR // 2, 4096, 999):
        blocks = list(iter_decode(path, block_frames=block_frames))
        assert all(b.dtype == np.float32 and b.shape[0] == 2 for b in blocks)
        assert all(b.shape[1] == block_frames for b in blocks[:-1])
        assert 0 < blocks[-1].shape[1] <= block_frames
        cat = np.concatenate(blocks, axis=1)
        assert cat.shape == whole.shape
        np.testing.assert_allclose(cat, whole, rtol=0, atol=1e-6)


def test_iter_decode_memory_is_bounded(tmp_path):
    seconds, sr = 40, 48000
    x = (np.random.default_rng(1).uniform(-0.5, 0.5, (2, seconds * sr))).astype(np.float32)
    path = write_audio(tmp_path / "long.wav", x, sr, "wav", "PCM_16")
    del x
    full_bytes = 2 * seconds * SR * 4  # the whole decoded file as float32: ~14 MB

    tracemalloc.start()
    try:
        frames = 0
        for block in iter_decode(path, block_frames=SR // 2):
            frames += block.shape[1]
        _, streamed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        whole, _ = decode_audio(path)
        _, whole_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frames == whole.shape[1] == seconds * SR
    assert whole_peak >= full_bytes  # the measurement sees a full decode...
    assert streamed_peak < full_bytes / 5  # ...and streaming holds a small fraction of it


def test_iter_decode_is_lazy_and_rejects_bad_arguments(tmp_path):
    path = write_audio(tmp_path / "t.wav", tone(440, 1.0), SR)
    gen = iter_decode(path, block_frames=1000)
    first = next(gen)
    assert first.shape == (2, 1000)
    gen.close()
    with pytest.raises(ValueError):
        next(iter_decode(path, block_frames=0))
    with pytest.raises(ValueError):
        next(iter_decode(path, channels=3))


# --------------------------------------------------------------------------------------
# Contracts
# --------------------------------------------------------------------------------------


def test_audio_info_is_json_safe_and_frozen(tmp_path):
    path = write_audio(tmp_path / "t.flac", tone(440, 0.5, sr=48000), 48000, "flac", "PCM_24")
    info = probe_audio(path)
    data = json.loads(json.dumps(asdict(info)))
    assert data == {
        "container": "flac",
        "codec": "flac",
        "sample_rate": 48000,
        "channels": 2,
        "duration_s": 0.5,
        "frames": 24000,
        "bit_depth": 24,
    }
    with pytest.raises(FrozenInstanceError):
        info.frames = 1  # type: ignore[misc]


def test_ffmpeg_fixture_writer_produces_sample_exact_mp4(tmp_path):
    """Guards the fixture itself: the exact-length assertions above rely on it."""
    path = write_audio(tmp_path / "x.m4a", tone(440, 0.5)[:, :12345], SR, "m4a")
    with av.open(str(path)) as c:
        st = c.streams.audio[0]
        assert Fraction(st.duration) * st.time_base * SR == 12345


def test_gpu_worker_audio_does_not_import_dagster():
    code = (
        "import sys, gpu_worker.audio.decode, gpu_worker.audio.encode, gpu_worker.audio.analyse; "
        "sys.exit(1 if any(m.startswith('dagster') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_no_warning_for_healthy_files(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fmt in ("wav", "flac", "ogg", "opus", "m4a", "webm", "mp3"):
            sr = 48000 if fmt in ("opus", "webm") else SR
            decode_audio(write_audio(tmp_path / f"ok.{fmt}", tone(440, 0.5, sr), sr, fmt))
