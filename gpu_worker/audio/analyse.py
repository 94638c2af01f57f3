"""Measurements on decoded audio: BS.1770 loudness (whole or streamed), sample peak, waveform overview peaks."""

from __future__ import annotations

import math
import warnings

import numpy as np

from .info import CHANNELS, SAMPLE_RATE, as_2d


def integrated_loudness(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float | None:
    """ITU-R BS.1770-4 integrated loudness in LUFS (pyloudnorm), or None.

    Channels get BS.1770 weights for L/R/C (1.0); a ``(1, n)`` or ``(n,)`` input is measured as
    mono, so a 0 dBFS 997 Hz sine reads -3.01 LUFS in mono and about 0.0 LUFS in both stereo
    channels. None for digital silence, for audio entirely below the -70 LUFS absolute gate,
    and for input shorter than one 400 ms gating block (padding would bias the result).
    At most 5 channels (pyloudnorm's limit).
    """
    x = as_2d(wav)
    if x.shape[0] > 5:
        raise ValueError(f"integrated_loudness takes at most 5 channels, got {x.shape[0]}")
    if x.shape[1] < math.ceil(0.4 * sample_rate) or not np.any(x):
        return None
    import pyloudnorm  # lazy: it loads scipy.signal, ~0.8 s that importing the worker need not pay

    data = x[0].astype(np.float64) if x.shape[0] == 1 else x.T.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = pyloudnorm.Meter(sample_rate).integrated_loudness(data)
    return float(value) if np.isfinite(value) else None


def sample_peak(wav: np.ndarray) -> float:
    """Largest absolute sample value (linear; 1.0 = full scale). 0.0 for empty input."""
    x = np.asarray(wav)
    return float(np.max(np.abs(x))) if x.size else 0.0


def peak_dbfs(wav: np.ndarray) -> float | None:
    """Sample peak in dBFS (``20 log10 peak``), None for digital silence."""
    peak = sample_peak(wav)
    return 20.0 * math.log10(peak) if peak > 0 else None


def waveform_peaks(wav: np.ndarray, n: int = 800) -> np.ndarray:
    """``(n, 2)`` float32 (min, max) of the mono mix over ``n`` equal time bins.

    Always ``n`` rows: with fewer than ``n`` frames a bin holds the one sample at its position;
    empty input gives zeros.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    x = as_2d(wav)
    length = x.shape[1]
    if length == 0:
        return np.zeros((n, 2), np.float32)
    mono = x.mean(axis=0, dtype=np.float64).astype(np.float32) if x.shape[0] > 1 else x[0].astype(np.float32)
    starts = (np.arange(n, dtype=np.int64) * length) // n
    lo = np.minimum.reduceat(mono, starts)
    hi = np.maximum.reduceat(mono, starts)
    return np.stack([lo, hi], axis=1).astype(np.float32)


class StreamingLoudness:
    """ITU-R BS.1770-4 integrated loudness of a stream of known length, equal to
    :func:`integrated_loudness` (pyloudnorm's K-weighting, 400 ms blocks every 100 ms, absolute
    and relative gates) on the concatenated stream. The filters run block by block with their
    state carried over; each gating block's energy is the sum of the sub-intervals between
    block edges it spans."""

    T_G = 0.4
    STEP = 0.25  # 1 - overlap 0.75

    def __init__(self, length: int, rate: int = SAMPLE_RATE, channels: int = CHANNELS):
        import pyloudnorm  # lazy, as in integrated_loudness (scipy)
        from scipy.signal import lfilter

        self._lfilter = lfilter
        self.rate = rate
        self.length = length
        self.enabled = channels <= 5 and length >= math.ceil(self.T_G * rate)
        if not self.enabled:
            return
        meter = pyloudnorm.Meter(rate)
        self.stages = []
        for f in meter._filters.values():
            b, a = f.generate_coefficients()
            self.stages.append(
                (
                    np.asarray(b, np.float64),
                    np.asarray(a, np.float64),
                    float(f.passband_gain),
                    [np.zeros(max(len(a), len(b)) - 1) for _ in range(channels)],
                )
            )
        # Block edges exactly as pyloudnorm computes them (float64 products, truncated).
        total_s = length / rate
        nblocks = int(np.round((total_s - self.T_G) / (self.T_G * self.STEP))) + 1
        j = np.arange(0, nblocks)
        lo = np.minimum((self.T_G * (j * self.STEP) * rate).astype(np.int64), length)
        hi = np.minimum((self.T_G * (j * self.STEP + 1) * rate).astype(np.int64), length)
        self.edges = np.unique(np.concatenate([lo, hi, [0, length]]))
        self.sums = np.zeros(len(self.edges) - 1)
        self.lo = np.searchsorted(self.edges, lo)
        self.hi = np.searchsorted(self.edges, hi)
        self.pos = 0

    def add(self, block: np.ndarray) -> None:
        if not self.enabled or not block.shape[1]:
            return
        sq = None
        for ch in range(block.shape[0]):  # one channel at a time: fewer float64 temporaries
            x = block[ch].astype(np.float64)
            for b, a, gain, state in self.stages:
                y, state[ch] = self._lfilter(b, a, x, zi=state[ch])
                x = gain * y
            x *= x
            sq = x if sq is None else sq + x  # channel gains are 1.0 for L and R
        p0, n = self.pos, sq.shape[0]
        first = int(np.searchsorted(self.edges, p0, side="right")) - 1  # interval holding p0
        last = int(np.searchsorted(self.edges, p0 + n, side="left"))
        cuts = self.edges[first + 1 : last] - p0  # edges strictly inside the block
        starts = np.concatenate([[0], cuts]).astype(np.int64)
        parts = np.add.reduceat(sq, starts)
        k = min(len(parts), len(self.sums) - first)
        self.sums[first : first + k] += parts[:k]
        self.pos += n

    def integrated(self) -> float | None:
        if not self.enabled:
            return None
        z = np.zeros(len(self.lo))
        for k in range(int((self.hi - self.lo).max(initial=0))):
            idx = self.lo + k
            inside = idx < self.hi
            z[inside] += self.sums[idx[inside]]
        z *= 1.0 / (self.T_G * self.rate)
        with np.errstate(divide="ignore"):
            block_lufs = -0.691 + 10.0 * np.log10(z)
        gated = block_lufs >= -70.0
        if not gated.any():
            return None
        relative = -0.691 + 10.0 * np.log10(z[gated].mean()) - 10.0
        gated = (block_lufs > relative) & (block_lufs > -70.0)
        if not gated.any():
            return None
        value = -0.691 + 10.0 * np.log10(z[gated].mean())
        return float(value) if np.isfinite(value) else None
