"""What every audio module shares: the engine's sample format, limits, and what a probe reports.

Audio is float32 shaped ``(channels, frames)`` throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 44100
CHANNELS = 2
OUTPUT_FORMATS = ("wav", "flac", "opus", "m4a")
MAX_CHANNELS = 32
MIN_RATE, MAX_RATE = 1000, 768000  # sample rates read or written


class AudioWarning(UserWarning):
    """Something was odd about an input but it could still be decoded (e.g. a truncated WAV)."""


@dataclass(frozen=True)
class AudioInfo:
    """What :func:`probe_audio` found. JSON-safe through :func:`dataclasses.asdict`."""

    container: str  # short name: "wav", "flac", "ogg", "mp3", "m4a", "mp4", "webm", "mkv", ...
    codec: str  # "pcm_s16le", "pcm_s24le", "pcm_f32le", "flac", "mp3", "vorbis", "opus", "aac", ...
    sample_rate: int
    channels: int
    duration_s: float
    frames: int  # exact number of frames at ``sample_rate``
    bit_depth: int | None  # None for lossy codecs


def as_2d(wav: np.ndarray) -> np.ndarray:
    """``(n,)`` -> ``(1, n)``; ``(channels, n)`` unchanged."""
    x = np.asarray(wav)
    if x.ndim == 1:
        return x[None, :]
    if x.ndim != 2:
        raise ValueError(f"expected audio shaped (channels, frames), got shape {x.shape}")
    return x
