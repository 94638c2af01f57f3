"""gpu_worker.audio: probe, decode (every input format), encode (every output format), measures.

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
import pyloudnorm
import pytest
import soundfile as sf

from gpu_worker.audio import decode
from gpu_worker.audio.analyse import integrated_loudness, peak_dbfs, sample_peak, waveform_peaks
from gpu_worker.audio.channels import downmix_matrix
from gpu_worker.audio.decode import decode_audio, iter_decode, probe_audio
from gpu_worker.audio.encode import StemWriter, encode_audio
from gpu_worker.audio.info import OUTPUT_FORMATS, SAMPLE_RATE, AudioInfo, AudioWarning
from gpu_worker.audio.resample import resampled_length
from gpu_worker.errors import AudioError, EncodeError

try:
    from tests.audio_fixtures import music_like, tone, write_audio
except ImportError:  # tests/ is on sys.path instead of the repo root
    from audio_fixtures import music_like, tone, write_audio

# A healthy file must decode without AudioWarning; tests that expect one use pytest.warns.
pytestmark = pytest.mark.filterwarnings("error::gpu_worker.audio.info.AudioWarning")

SR = SAMPLE_RATE


def amp_at(x: np.ndarray, freq: float, sr: int) -> float:
    """Amplitude of the ``freq`` Hz component of a 1-D signal holding whole cycles of it."""
    t = np.arange(x.shape[-1]) / sr
    return float(2 * abs(np.dot(x.astype(np.float64), np.exp(-2j * np.pi * freq * t))) / x.shape[-1])


def peak_freq(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(x.shape[-1])))
    return float(np.argmax(spec) * sr / x.shape[-1])


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    err = test.astype(np.float64) - ref
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum(err**2)))


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
# Encoding
# --------------------------------------------------------------------------------------

N_ODD = int(2.5 * SR) + 17  # not a multiple of AAC's 1024 or Opus' 960-at-48k frames


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_writer_round_trip_has_exact_length(tmp_path, fmt):
    x = music_like(3.0)[:, :N_ODD]
    path = tmp_path / f"stem.{fmt}"
    encode_audio(x, path, fmt)
    y, info = decode_audio(path)
    assert y.shape == x.shape
    expected = {
        "wav": ("wav", "pcm_s24le", SR, 24),
        "flac": ("flac", "flac", SR, 24),
        "opus": ("ogg", "opus", 48000, None),
        "m4a": ("m4a", "aac", SR, None),
    }[fmt]
    assert (info.container, info.codec, info.sample_rate, info.bit_depth) == expected
    if fmt in ("wav", "flac"):
        # 24-bit PCM: within one 24-bit step (16-bit would be 256 times worse)
        assert np.max(np.abs(y - x)) <= 2**-23
    else:
        assert snr_db(x, y) > 18  # a waveform match, not just the right length


@pytest.mark.parametrize(("fmt", "coder", "min_snr"), [("opus", None, 35), ("m4a", "twoloop", 35), ("m4a", "fast", 25)])
def test_lossy_tone_snr_and_bitrate(tmp_path, fmt, coder, min_snr):
    # AAC's fast coder spends well under 192 kbit/s on a pure tone (~55): a lower waveform SNR, its
    # noise still far under the masking estimate (benchmarks/RESULTS.md, "AAC encoder options").
    x = tone(997, 2.0, amp=0.5)[:, : 2 * SR - 5]
    hi, lo = tmp_path / f"hi.{fmt}", tmp_path / f"lo.{fmt}"
    encode_audio(x, hi, fmt, aac_coder=coder)  # default 192 kbps
    encode_audio(x, lo, fmt, bitrate_kbps=64, aac_coder=coder)
    y, _ = decode_audio(hi)
    assert y.shape == x.shape
    assert snr_db(x, y) > min_snr
    y_lo, _ = decode_audio(lo)
    assert y_lo.shape == x.shape
    if coder == "fast":  # a tone needs less than 64 kbit/s to it: the bitrate shows on busier audio
        x = music_like(2.0)
        encode_audio(x, hi, fmt, aac_coder=coder)
        encode_audio(x, lo, fmt, bitrate_kbps=64, aac_coder=coder)
    assert lo.stat().st_size < 0.6 * hi.stat().st_size


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_writer_mono_and_other_rates(tmp_path, fmt):
    sr = 22050
    x = music_like(1.0, sr, channels=1)[:, : sr - 3]
    path = tmp_path / f"mono.{fmt}"
    encode_audio(x, path, fmt, sample_rate=sr)
    y, info = decode_audio(path, sample_rate=sr, channels=1)
    assert info.channels == 1
    assert y.shape == x.shape


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_stem_writer_in_blocks_equals_encode_audio(tmp_path, fmt):
    x = music_like(2.0)[:, : 2 * SR + 11]
    one, streamed = tmp_path / f"one.{fmt}", tmp_path / f"streamed.{fmt}"
    encode_audio(x, one, fmt)
    cuts = [0, 1, 1000, 45100, 45101, x.shape[1]]
    with StemWriter(streamed, fmt) as w:
        for a, b in zip(cuts, cuts[1:], strict=False):
            w.write(x[:, a:b])
    assert w.frames_written == x.shape[1]
    if fmt in ("wav", "flac", "m4a"):
        assert streamed.read_bytes() == one.read_bytes()
    y1, _ = decode_audio(one)
    y2, _ = decode_audio(streamed)
    np.testing.assert_array_equal(y1, y2)  # Ogg serial numbers differ, the audio does not


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_writer_clips_instead_of_wrapping(tmp_path, fmt):
    x = np.array([[0.5, 1.0, 1.5, -1.5, -1.0, 3.0], [0.0, -2.0, 0.25, 0.9, 1.01, -1.0]], np.float32)
    x = np.repeat(x, 100, axis=1)
    path = tmp_path / f"clip.{fmt}"
    with StemWriter(path, fmt) as w:
        w.write(x)
    assert w.clipped_samples == int(np.sum(np.abs(x) > 1.0))
    y, _ = decode_audio(path)
    np.testing.assert_allclose(y, np.clip(x, -1, 1), atol=2**-22)


@pytest.mark.parametrize("fmt", ["opus", "m4a"])
def test_lossy_writer_clips_too(tmp_path, fmt):
    x = tone(997, 1.0, amp=2.0)  # +6 dB over full scale: float codecs would keep it
    path = tmp_path / f"loud.{fmt}"
    with StemWriter(path, fmt) as w:
        w.write(x)
    assert w.clipped_samples == int(np.sum(np.abs(x) > 1.0)) > 0
    y, _ = decode_audio(path)
    assert sample_peak(y) < 1.4  # a clipped sine (plus codec ringing), not the 2.0 input


def test_writer_errors_name_the_file_and_leave_nothing_behind(tmp_path):
    target = tmp_path / "bad_stem.xyz"
    with pytest.raises(EncodeError, match="bad_stem.xyz"):
        StemWriter(target, "mp3")
    with pytest.raises(EncodeError, match="bad_stem.xyz.*kbps"):
        StemWriter(target, "opus", bitrate_kbps=5000)
    with pytest.raises(EncodeError, match="bad_stem.xyz.*Hz"):
        StemWriter(target, "m4a", sample_rate=50000)
    with pytest.raises(EncodeError, match="no_such_dir"):
        StemWriter(tmp_path / "no_such_dir" / "stem.flac", "flac")

    path = tmp_path / "nan_stem.flac"
    w = StemWriter(path, "flac")
    w.write(np.zeros((2, 100), np.float32))
    with pytest.raises(EncodeError, match="nan_stem.flac.*NaN"):
        w.write(np.full((2, 10), np.nan, np.float32))
    with pytest.raises(EncodeError, match=r"shaped \(3, 10\)"), StemWriter(tmp_path / "shape.wav", "wav") as w1:
        w1.write(np.zeros((3, 10), np.float32))

    with pytest.raises(RuntimeError), StemWriter(tmp_path / "aborted.m4a", "m4a") as w2:
        w2.write(np.zeros((2, 5000), np.float32))
        raise RuntimeError("model crashed")
    with pytest.raises(EncodeError, match="empty.wav"), StemWriter(tmp_path / "empty.wav", "wav"):
        pass
    assert list(tmp_path.iterdir()) == []  # no stem and no temporary file left behind


def test_writer_publishes_only_on_close(tmp_path):
    path = tmp_path / "late.opus"
    w = StemWriter(path, "opus")
    w.write(tone(440, 0.5))
    assert not path.exists()
    w.close()
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == ["late.opus"]
    w.close()  # idempotent


# --------------------------------------------------------------------------------------
# Loudness, peaks, waveform, finiteness
# --------------------------------------------------------------------------------------

# BS.1770-4: a 0 dBFS 997 Hz sine in one channel reads -3.01 LKFS; in both stereo channels the
# channel powers add, +3.01 dB, so about 0.0 LKFS.
MONO_FULL_SCALE_LUFS = -3.01


def test_loudness_of_full_scale_sine_matches_bs1770():
    mono = tone(997, 5.0, channels=1, amp=1.0)
    got = integrated_loudness(mono)
    assert got == pytest.approx(MONO_FULL_SCALE_LUFS, abs=0.05)
    reference = pyloudnorm.Meter(SR).integrated_loudness(mono[0].astype(np.float64))
    assert got == pytest.approx(reference, abs=1e-3)  # float32 K-weighting: well inside 0.05 LU
    assert integrated_loudness(mono[0]) == pytest.approx(got, abs=1e-9)  # 1-D is mono too

    stereo = tone(997, 5.0, channels=2, amp=1.0)
    assert integrated_loudness(stereo) == pytest.approx(MONO_FULL_SCALE_LUFS + 10 * math.log10(2), abs=0.05)
    quiet = tone(997, 5.0, channels=2, amp=0.1)  # -20 dB
    assert integrated_loudness(quiet) == pytest.approx(MONO_FULL_SCALE_LUFS + 3.0103 - 20, abs=0.05)
    at48 = tone(997, 5.0, sr=48000, channels=1, amp=1.0)
    assert integrated_loudness(at48, sample_rate=48000) == pytest.approx(MONO_FULL_SCALE_LUFS, abs=0.05)


@pytest.mark.parametrize("kind", ["bass", "noise", "music", "quiet", "surround", "gated"])
def test_numpy_loudness_matches_pyloudnorm(kind):
    """The numpy BS.1770 meter (no pyloudnorm at run time) against pyloudnorm, within 1e-3 LU
    (the issue asks 0.05), on the signals that stress it: 30-60 Hz content near the 38 Hz
    high-pass, broadband noise, quiet passages under the relative gate, five channels."""
    rng = np.random.default_rng(3)
    if kind == "bass":
        x = tone(41.0, 6.0, amp=0.7) + tone(60.0, 6.0, amp=0.2)
    elif kind == "noise":
        x = (0.2 * rng.standard_normal((2, 6 * SR))).astype(np.float32)
    elif kind == "music":
        x = music_like(8.0)
    elif kind == "quiet":
        x = music_like(6.0) * 1e-2  # about -50 LUFS
    elif kind == "surround":
        x = np.concatenate([music_like(5.0, channels=5)])
    else:  # loud then very quiet: the relative gate drops the quiet half
        x = np.concatenate([music_like(4.0), music_like(4.0, seed=2) * 1e-3], axis=1)
    reference = pyloudnorm.Meter(SR).integrated_loudness(x.T.astype(np.float64))
    assert integrated_loudness(x) == pytest.approx(reference, abs=1e-3)
    from gpu_worker.audio.analyse import analyse_stem

    if x.shape[0] == 2:
        a = analyse_stem(x, waveform_bins=100)
        assert a.lufs == pytest.approx(reference, abs=1e-3)
        assert a.sample_peak == sample_peak(x)
        assert a.rms == pytest.approx(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))), rel=1e-5)
        np.testing.assert_allclose(a.waveform, waveform_peaks(x, 100), atol=1e-6)


def test_analyse_stem_counts_and_zeroes_nonfinite():
    from gpu_worker.audio.analyse import analyse_stem

    x = music_like(3.0)
    y = x.copy()
    y[0, 1000:1010] = np.nan
    y[1, 5] = np.inf
    a = analyse_stem(y)
    clean = np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
    assert a.nonfinite == 11
    assert a.sample_peak == sample_peak(clean)
    assert a.lufs == pytest.approx(integrated_loudness(clean), abs=1e-9)


def test_loudness_none_for_silence_short_or_below_gate():
    assert integrated_loudness(np.zeros((2, 5 * SR), np.float32)) is None
    assert integrated_loudness(tone(997, 0.3)) is None  # shorter than one 400 ms block
    assert integrated_loudness(tone(997, 0.5)) is not None
    assert integrated_loudness(tone(997, 3.0, amp=1e-5)) is None  # -100 dBFS: under the -70 LUFS gate


def test_peaks():
    x = tone(997, 1.0, amp=0.5)
    assert sample_peak(x) == pytest.approx(0.5, abs=1e-4)
    assert peak_dbfs(x) == pytest.approx(20 * math.log10(0.5), abs=1e-3)
    y = np.array([[0.1, -0.8], [0.3, 0.2]], np.float32)
    assert sample_peak(y) == pytest.approx(0.8)  # absolute value, negative peak
    assert sample_peak(np.zeros((2, 10))) == 0.0
    assert peak_dbfs(np.zeros((2, 10))) is None
    assert peak_dbfs(np.ones((2, 3))) == 0.0


def test_waveform_peaks_shape_bounds_and_mono_mix():
    x = np.concatenate([np.zeros((2, SR)), tone(440, 1.0, amp=0.5)], axis=1)
    p = waveform_peaks(x)
    assert p.shape == (800, 2) and p.dtype == np.float32
    assert np.all(p[:, 0] <= p[:, 1])
    np.testing.assert_array_equal(p[:400], 0.0)  # first half is silent
    assert np.all(p[400:, 0] == pytest.approx(-0.5, abs=0.01))
    assert np.all(p[400:, 1] == pytest.approx(0.5, abs=0.01))
    assert np.all(np.abs(p) <= 0.5 + 1e-6)

    anti = np.stack([x[0], -x[0]])  # L and R cancel in the mono mix
    np.testing.assert_array_equal(waveform_peaks(anti), 0.0)
    assert waveform_peaks(x, n=100).shape == (100, 2)

    short = np.arange(10, dtype=np.float32)[None] / 10  # fewer frames than bins
    ps = waveform_peaks(short)
    assert ps.shape == (800, 2)
    np.testing.assert_array_equal(ps[:, 0], ps[:, 1])
    assert set(np.round(ps[:, 0], 6)) == set(np.round(short[0], 6))  # every sample shows up
    np.testing.assert_array_equal(waveform_peaks(np.zeros((2, 0))), np.zeros((800, 2)))


# --------------------------------------------------------------------------------------
# Bad input: AudioError naming the file
# --------------------------------------------------------------------------------------


def _png_bytes() -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(8) for _ in range(8))
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _assert_rejected(path, *fragments):
    for call in (lambda: decode_audio(path), lambda: list(iter_decode(path))):
        with pytest.raises(AudioError) as err:
            call()
        msg = str(err.value)
        assert path.name in msg
        for fragment in fragments:
            assert fragment in msg, msg
    return msg


def test_rejects_text_renamed_wav(tmp_path):
    path = tmp_path / "notes_text.wav"
    path.write_text("setlist: intro, verse, chorus\n" * 50)
    _assert_rejected(path, "not an audio file", "text file")
    with pytest.raises(AudioError, match="notes_text.wav"):
        probe_audio(path)


def test_rejects_png_renamed_wav(tmp_path):
    path = tmp_path / "cover_art.wav"
    path.write_bytes(_png_bytes())
    _assert_rejected(path, "PNG image")


def test_rejects_random_bytes_mp3(tmp_path):
    path = tmp_path / "noise_bytes.mp3"
    path.write_bytes(np.random.default_rng(0).bytes(50000))
    _assert_rejected(path, "not an audio file")


def test_rejects_empty_missing_and_folder(tmp_path):
    empty = tmp_path / "empty_take.wav"
    empty.write_bytes(b"")
    _assert_rejected(empty, "empty (0 bytes)")
    _assert_rejected(tmp_path / "never_uploaded.flac", "does not exist")
    folder = tmp_path / "a_folder.wav"
    folder.mkdir()
    _assert_rejected(folder, "not a regular file")


def test_rejects_zero_frames(tmp_path):
    wav = tmp_path / "silent_header.wav"
    sf.write(str(wav), np.zeros((0, 2), np.float32), 44100)
    _assert_rejected(wav, "0 frames")
    with pytest.raises(AudioError, match="silent_header.wav"):
        probe_audio(wav)
    flac = tmp_path / "zero_frames.flac"  # FFmpeg writes a FLAC header with no frames
    with av.open(str(flac), "w", format="flac") as c:
        s = c.add_stream("flac", rate=44100, layout="stereo")
        for packet in s.encode(None):
            c.mux(packet)
    _assert_rejected(flac, "0 frames")


def test_rejects_too_many_channels(tmp_path):
    path = tmp_path / "forty_ch.wav"
    sf.write(str(path), np.zeros((100, 40), np.float32), 44100)
    _assert_rejected(path, "40 audio channels")


def test_rejects_nan_in_float_wav(tmp_path):
    x = tone(440, 2.0, sr=48000)
    x[0, 24000] = np.nan
    x[1, 72000:72003] = -np.inf
    path = tmp_path / "broken_render.wav"
    write_audio(path, x, 48000, "wav", "FLOAT")
    msg = _assert_rejected(path, "4 non-finite", "0.500 s", "1.500 s")
    assert "NaN" in msg
    info = probe_audio(path)  # the header is fine; only decoding sees the samples
    assert info.frames == x.shape[1]


def _truncate(path, keep=0.6):
    data = path.read_bytes()
    cut = path.with_name("cut_" + path.name)
    cut.write_bytes(data[: int(len(data) * keep) + 3])
    return cut


@pytest.mark.parametrize("fmt", ["flac", "mp3", "ogg", "opus", "m4a", "m4a-moov-at-end", "webm"])
def test_rejects_truncated_compressed_files(tmp_path, fmt):
    sr = 48000 if fmt in ("opus", "webm") else 44100
    ext = "m4a" if fmt.startswith("m4a") else fmt
    full = write_audio(tmp_path / f"take.{ext}", music_like(3.0, sr), sr, fmt)
    assert decode_audio(full)[0].shape[1] == 3 * SR  # the complete file is fine
    cut = _truncate(full)
    msg = _assert_rejected(cut, "truncated")
    assert "upload" in msg  # says how to fix it


def test_truncated_wav_decodes_intact_part_with_warning_when_accepted(tmp_path, monkeypatch):
    x = music_like(2.0)
    full = write_audio(tmp_path / "take.wav", x, SR, "wav", "PCM_16")
    cut = _truncate(full, keep=0.5)
    _assert_rejected(cut, "truncated", "50.0%")  # by default a WAV cut in half is an error (issue 14)
    monkeypatch.setenv("STEMSET_MIN_DECODED_FRACTION", "0")  # accepted knowingly
    present = (cut.stat().st_size - 44) // 4  # 44-byte header, 4 bytes per stereo 16-bit frame
    with pytest.warns(AudioWarning, match="cut_take.wav.*truncated"):
        wav, info = decode_audio(cut)
    assert info.frames == present and wav.shape == (2, present)
    np.testing.assert_allclose(wav, x[:, :present], atol=1 / 32768)


def test_ogg_ending_on_a_page_boundary_decodes_with_warning(tmp_path):
    full = write_audio(tmp_path / "take.ogg", music_like(3.0), SR, "ogg")
    data = full.read_bytes()
    cut = tmp_path / "page_cut.ogg"
    cut.write_bytes(data[: data.rfind(b"OggS")])  # drop the final (end-of-stream) page
    with pytest.warns(AudioWarning, match="page_cut.ogg.*end-of-stream"):
        wav, info = decode_audio(cut)
    assert 0 < wav.shape[1] < 3 * SR


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
