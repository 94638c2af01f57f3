"""Sample-rate conversion with an exact output length (soxr, streaming)."""

from __future__ import annotations

import numpy as np
import soxr

_RESAMPLE_QUALITY = "HQ"


def resampled_length(frames: int, source_rate: int, target_rate: int) -> int:
    """The exact number of frames :func:`decode_audio` returns for ``frames`` source frames."""
    if source_rate == target_rate:
        return int(frames)
    return int(round(frames * target_rate / source_rate))


class Resampler:
    """``soxr.ResampleStream`` with an exact total length of ``resampled_length(n_in, ...)``.

    Input and output are ``(frames, channels)`` float32. A few output frames are held back so
    the end can be trimmed or zero-padded to the exact length when :meth:`finish` is called.
    """

    _HOLD = 64

    def __init__(self, in_rate: int, out_rate: int, channels: int):
        self.in_rate, self.out_rate, self.channels = int(in_rate), int(out_rate), int(channels)
        self.identity = self.in_rate == self.out_rate
        self._stream = (
            None
            if self.identity
            else soxr.ResampleStream(
                self.in_rate, self.out_rate, self.channels, dtype="float32", quality=_RESAMPLE_QUALITY
            )
        )
        self._held = np.zeros((0, self.channels), np.float32)
        self.n_in = 0
        self.n_out = 0

    def push(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.n_in += x.shape[0]
        if self.identity:
            self.n_out += x.shape[0]
            return x
        y = self._stream.resample_chunk(x, last=False)
        if self._held.shape[0]:
            y = np.concatenate([self._held, y])
        cut = max(0, y.shape[0] - self._HOLD)
        self._held = y[cut:]
        self.n_out += cut
        return y[:cut]

    def finish(self) -> np.ndarray:
        if self.identity:
            return np.zeros((0, self.channels), np.float32)
        tail = self._stream.resample_chunk(np.zeros((0, self.channels), np.float32), last=True)
        y = np.concatenate([self._held, tail]) if self._held.shape[0] else tail
        self._held = np.zeros((0, self.channels), np.float32)
        want = resampled_length(self.n_in, self.in_rate, self.out_rate) - self.n_out
        if want <= y.shape[0]:
            y = y[: max(want, 0)]
        else:
            y = np.concatenate([y, np.zeros((want - y.shape[0], self.channels), np.float32)])
        self.n_out += y.shape[0]
        return y
