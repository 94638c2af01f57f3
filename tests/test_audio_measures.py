"""gpu_worker.audio: loudness (BS.1770, against pyloudnorm), peaks, waveform, finiteness.

All fixtures are synthesised here and written to tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import math

import numpy as np
import pyloudnorm
import pytest

from gpu_worker.audio.analyse import BLOCK, integrated_loudness, peak_dbfs, residual_db, sample_peak, waveform_peaks
from gpu_worker.audio.info import SAMPLE_RATE

try:
    from tests.audio_fixtures import music_like, tone
except ImportError:  # tests/ is on sys.path instead of the repo root
    from audio_fixtures import music_like, tone

# A healthy file must decode without AudioWarning; tests that expect one use pytest.warns.
pytestmark = pytest.mark.filterwarnings("error::gpu_worker.audio.info.AudioWarning")

SR = SAMPLE_RATE


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


def _whole_residual_db(mix: np.ndarray, stems: list[np.ndarray]) -> float:
    """The definition, on whole float64 copies (what the blocked measure replaced)."""
    total = sum(np.nan_to_num(stem.astype(np.float64)) for stem in stems)
    energy = float(np.sum((mix.astype(np.float64) - total) ** 2))
    return 10 * math.log10(max(energy, 1e-30) / float(np.sum(mix.astype(np.float64) ** 2)))


def test_residual_db_blocked_equals_whole_array_definition():
    rng = np.random.default_rng(3)
    n = 3 * BLOCK + 1234  # several blocks and a ragged last one
    mix = rng.standard_normal((2, n)).astype(np.float32) * 0.3
    stems = [mix * np.float32(w) for w in (0.5, 0.3, 0.15)]
    stems.append((mix * np.float32(0.05) + rng.standard_normal((2, n)).astype(np.float32) * 1e-3).astype(np.float32))
    stems[1][0, BLOCK + 7] = np.nan  # counted as a zero, as the stem is written
    got = residual_db(mix, stems)
    assert got == pytest.approx(_whole_residual_db(mix, stems), abs=0.005)
    assert -60 < got < -20  # a near-perfect split: far below the mix, far above silence
    assert residual_db(mix, [mix]) < -300  # exact: the residual energy is floored at 1e-30
    assert residual_db(mix, []) == 0.0  # nothing separated: the residual is the mix
    assert residual_db(np.zeros((2, 100), np.float32), [mix[:, :100]]) is None  # silent mix
