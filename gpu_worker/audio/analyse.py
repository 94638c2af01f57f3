"""Measurements on decoded audio: BS.1770 loudness (whole or streamed), sample peak, waveform
overview peaks, and :func:`analyse_stem`, all of them in one pass over a stem in memory."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .info import CHANNELS, SAMPLE_RATE, as_2d
from .loudness import MAX_CHANNELS, Bs1770Meter

BLOCK = 1 << 16  # frames per block of a one-pass measurement (1.5 s: its temporaries stay in cache)


def integrated_loudness(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float | None:
    """ITU-R BS.1770-4 integrated loudness in LUFS, or None (:mod:`gpu_worker.audio.loudness`).

    Channels get BS.1770 weights (1.0 for L/R/C, 1.41 for surrounds); a ``(1, n)`` or ``(n,)``
    input is measured as mono, so a 0 dBFS 997 Hz sine reads -3.01 LUFS in mono and about 0.0
    LUFS in both stereo channels. None for digital silence, for audio entirely below the -70
    LUFS absolute gate, and for input shorter than one 400 ms gating block (padding would bias
    the result). At most 5 channels. Equal to pyloudnorm's meter (the tests compare them).
    """
    x = as_2d(wav)
    if x.shape[0] > MAX_CHANNELS:
        raise ValueError(f"integrated_loudness takes at most {MAX_CHANNELS} channels, got {x.shape[0]}")
    if x.shape[1] < math.ceil(0.4 * sample_rate) or not np.any(x):
        return None
    meter = Bs1770Meter(x.shape[1], sample_rate, x.shape[0])
    for i in range(0, x.shape[1], BLOCK):  # cache-sized blocks: ~4x faster than one whole pass
        meter.add(x[:, i : i + BLOCK])
    return meter.integrated()


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


class StreamingLoudness(Bs1770Meter):
    """BS.1770 integrated loudness of a stream of known length fed block by block, equal to
    :func:`integrated_loudness` on the concatenated stream (see :class:`Bs1770Meter`)."""

    def __init__(self, length: int, rate: int = SAMPLE_RATE, channels: int = CHANNELS):
        super().__init__(length, rate, channels)


@dataclass
class StemAnalysis:
    """What one pass over a stem measures (see :func:`analyse_stem`)."""

    frames: int
    lufs: float | None
    sample_peak: float
    sum_squares: float
    nonfinite: int
    waveform: np.ndarray | None = None  # (bins, 2) min/max of the mono mix, when asked for

    @property
    def rms(self) -> float:
        return math.sqrt(self.sum_squares / (self.frames * self.channels)) if self.frames else 0.0

    channels: int = CHANNELS


def analyse_stem(wav: np.ndarray, sample_rate: int = SAMPLE_RATE, waveform_bins: int = 0) -> StemAnalysis:
    """Loudness, sample peak, sum of squares, NaN/Inf count (and waveform peaks when
    ``waveform_bins`` > 0) of ``wav`` (``(channels, n)`` float) in one pass of cache-sized blocks.

    Non-finite samples are counted and measured as zeros (the stem is written with zeros there).
    """
    x = as_2d(wav)
    channels, n = x.shape
    meter = Bs1770Meter(n, sample_rate, channels) if channels <= MAX_CHANNELS else None
    peak, sumsq, nonfinite = 0.0, 0.0, 0
    lo = hi = starts = None
    if waveform_bins > 0 and n >= waveform_bins:
        starts = (np.arange(waveform_bins, dtype=np.int64) * n) // waveform_bins
        lo = np.full(waveform_bins, np.inf, np.float32)
        hi = np.full(waveform_bins, -np.inf, np.float32)
    for i in range(0, n, BLOCK):
        block = x[:, i : i + BLOCK]
        finite = np.isfinite(block)
        if not finite.all():
            nonfinite += int(block.size - np.count_nonzero(finite))
            block = np.where(finite, block, 0.0).astype(np.float32)
        peak = max(peak, float(block.max()), -float(block.min()))
        sumsq += sum(float(np.dot(row, row)) for row in block)  # float32 BLAS per block, float64 across
        if meter is not None and meter.enabled:
            meter.add(block)
        if starts is not None:
            _waveform_block(block, i, starts, lo, hi)
    waveform = None
    if waveform_bins > 0:
        waveform = np.stack([lo, hi], axis=1) if starts is not None else waveform_peaks(x, waveform_bins)
    lufs = meter.integrated() if meter is not None and peak > 0 else None
    return StemAnalysis(
        frames=n,
        lufs=lufs,
        sample_peak=peak,
        sum_squares=sumsq,
        nonfinite=nonfinite,
        waveform=waveform,
        channels=channels,
    )


def residual_db(mix: np.ndarray, stems: list[np.ndarray]) -> float | None:
    """Level of ``mix - sum(stems)`` relative to the mix, in dB (lower is better); None for a
    silent mix. float64 in cache-sized blocks rather than whole-song float64 copies: on a 4-minute
    song 0.2 s and 4 MB of temporaries instead of 0.6-2.0 s and 585 MB. Non-finite stem samples
    count as zeros, as they are written."""
    x = as_2d(mix)
    parts = [as_2d(stem) for stem in stems]
    mix_energy = residual = 0.0
    for i in range(0, x.shape[1], BLOCK):
        block = x[:, i : i + BLOCK].astype(np.float64)
        mix_energy += float(np.vdot(block, block))
        for part in parts:
            block -= np.nan_to_num(part[:, i : i + BLOCK].astype(np.float64))
        residual += float(np.vdot(block, block))
    return level_db(residual, mix_energy)


def level_db(energy: float, reference: float) -> float | None:
    """``energy`` relative to ``reference`` in dB, rounded to 0.01 (None when the reference is 0)."""
    if reference == 0:
        return None
    return round(10 * math.log10(max(energy, 1e-30) / reference), 2)


def _waveform_block(block: np.ndarray, offset: int, starts: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    """Fold one block into the per-bin min/max of the mono mix (bins start at ``starts``)."""
    mono = block.sum(axis=0) * np.float32(1.0 / block.shape[0]) if block.shape[0] > 1 else block[0]
    end = offset + mono.shape[0]
    first = int(np.searchsorted(starts, offset, side="right")) - 1
    last = int(np.searchsorted(starts, end, side="left"))
    local = np.concatenate([[0], starts[first + 1 : last] - offset]).astype(np.int64)
    bins = np.arange(first, first + len(local))
    np.minimum.at(lo, bins, np.minimum.reduceat(mono, local))
    np.maximum.at(hi, bins, np.maximum.reduceat(mono, local))
