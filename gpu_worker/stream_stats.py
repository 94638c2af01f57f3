"""What streaming separation accumulates block by block: the mix's normalisation statistics
(pass 1) and each stem's report (frames, NaN/Inf, peak, RMS, loudness), without holding the audio."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .audio.analyse import StreamingLoudness, level_db
from .audio.decode import decode_source
from .audio.info import CHANNELS, SAMPLE_RATE, AudioInfo
from .audio.source import open_source


@dataclass
class MixStats:
    """Length, mean and M2 of the mono mix ``wav.mean(0)``, and ``sum(wav**2)``; float64 throughout."""

    frames: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    energy: float = 0.0

    def add(self, block: np.ndarray) -> None:
        n = int(block.shape[-1])
        if not n:
            return
        ref = block.mean(axis=0, dtype=np.float32).astype(np.float64)  # as torch's float32 wav.mean(0)
        block_mean = float(ref.mean())
        block_m2 = float(np.square(ref - block_mean).sum())
        total = self.frames + n
        delta = block_mean - self.mean
        self.mean += delta * n / total
        self.m2 += block_m2 + delta * delta * self.frames * n / total
        self.frames = total
        self.energy += sum(float(np.square(row, dtype=np.float64).sum()) for row in block)

    def normalisation(self) -> tuple[np.float32, np.float32]:
        """``(mean, std + 1e-8)`` in float32, as ``separate`` computes them (std unbiased)."""
        mean = np.float32(self.mean)
        std = np.float32(math.sqrt(self.m2 / (self.frames - 1))) if self.frames > 1 else np.float32("nan")
        return mean, np.float32(std + np.float32(1e-8))


def scan_file(path, block_frames: int = SAMPLE_RATE * 30) -> tuple[MixStats, AudioInfo]:
    """Pass 1 over a file: its :class:`MixStats` and the ``AudioInfo`` ``decode_audio`` would give.

    Decodes in bounded memory; raises ``AudioError`` exactly where ``decode_audio`` would.
    """
    src = open_source(path)
    counter = [0]
    stats = MixStats()
    for block in decode_source(src, block_frames, SAMPLE_RATE, CHANNELS, counter):
        stats.add(block)
    n = counter[0]
    return stats, replace(src.info, frames=n, duration_s=n / src.info.sample_rate)


@dataclass
class StreamStats:
    """What the worker reports about one stem, accumulated block by block (NaN/Inf written as 0)."""

    length: int  # frames the stem will have
    frames: int = 0
    nonfinite: int = 0
    peak: float = 0.0
    sum_squares: float = 0.0
    values: int = 0  # samples (channels x frames) in sum_squares
    lufs: float | None = None  # set when the stream is complete
    _loudness: StreamingLoudness | None = field(default=None, repr=False)

    def __post_init__(self):
        if self._loudness is None:
            self._loudness = StreamingLoudness(self.length)

    def clean(self, block: np.ndarray) -> np.ndarray:
        """Count NaN/Inf in ``block``, zero them, update the statistics; returns the cleaned block."""
        finite = np.isfinite(block)
        bad = int(block.size - np.count_nonzero(finite))
        if bad:
            self.nonfinite += bad
            block = np.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)
        self.frames += block.shape[1]
        if block.size:
            self.peak = max(self.peak, float(np.max(np.abs(block))))
        self.sum_squares += sum(float(np.square(row, dtype=np.float64).sum()) for row in block)
        self.values += block.size
        self._loudness.add(block)
        return block

    def finish(self) -> None:
        self.lufs = self._loudness.integrated() if self.peak > 0 else None

    @property
    def rms(self) -> float:
        return math.sqrt(self.sum_squares / self.values) if self.values else 0.0


@dataclass
class StreamResult:
    stems: dict[str, StreamStats]  # final stems, in strategy order
    length: int
    mix_energy: float
    residual_energy: float
    timings: dict[str, float]  # "separate" (model work, decoding, bookkeeping) and "encode"

    @property
    def residual_db(self) -> float | None:
        """As :func:`gpu_worker.audio.analyse.residual_db`: mix minus the sum of the stems, in dB re the mix."""
        return level_db(self.residual_energy, self.mix_energy)


def tensor_blocks(wav: np.ndarray | torch.Tensor, frames: int) -> Iterator[np.ndarray]:
    """A ``(2, n)`` array as a stream of blocks (for tests and in-memory callers)."""
    x = wav.numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    for i in range(0, x.shape[1], frames):
        yield np.ascontiguousarray(x[:, i : i + frames], dtype=np.float32)


def mix_stats_of(wav: np.ndarray | torch.Tensor, frames: int = SAMPLE_RATE * 30) -> MixStats:
    stats = MixStats()
    for block in tensor_blocks(wav, frames):
        stats.add(block)
    return stats
