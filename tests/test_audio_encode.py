"""gpu_worker.audio: encode (every output format): lengths, quality, bit rates, clipping, and
files that appear complete or not at all.

All fixtures are synthesised here and written to tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpu_worker.audio.analyse import sample_peak
from gpu_worker.audio.decode import decode_audio
from gpu_worker.audio.encode import StemWriter, encode_audio
from gpu_worker.audio.info import OUTPUT_FORMATS, SAMPLE_RATE
from gpu_worker.errors import EncodeError

try:
    from tests.audio_fixtures import music_like, snr_db, tone
except ImportError:  # tests/ is on sys.path instead of the repo root
    from audio_fixtures import music_like, snr_db, tone

# A healthy file must decode without AudioWarning; tests that expect one use pytest.warns.
pytestmark = pytest.mark.filterwarnings("error::gpu_worker.audio.info.AudioWarning")

SR = SAMPLE_RATE


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
