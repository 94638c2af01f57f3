"""Scratch files of a streaming separation with chained strategy nodes: a child node's input
(spilled while its parent runs) and the partial residual ``mix - sum(stems)`` across passes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .audio.info import CHANNELS
from .stream_stats import MixStats


class Spill:
    """A chained node's input: raw float32 interleaved frames on disk, with its MixStats."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 - kept open across update() calls, closed by close()
        self.stats = MixStats()

    def write(self, block: np.ndarray) -> None:
        self.stats.add(block)
        self.file.write(np.ascontiguousarray(block.T, dtype=np.float32).tobytes())

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        with open(self.path, "rb") as fh:
            while True:
                x = np.fromfile(fh, dtype=np.float32, count=frames * CHANNELS)
                if not x.size:
                    return
                yield x.reshape(-1, CHANNELS).T

    def remove(self) -> None:
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class Residual:
    """sum((mix - sum of final stems)**2) in float64. When some stems come from later passes the
    partial residual is kept in a float64 scratch file, updated in place pass by pass."""

    def __init__(self, path: Path | None):
        self.energy = 0.0
        self.path = path
        self.file = open(path, "w+b") if path is not None else None  # noqa: SIM115 - closed by close()

    def update(self, pos: int, mix: np.ndarray | None, stems: np.ndarray, last: bool) -> None:
        """``stems``: float64 (channels, n) sum of this pass's final stems; ``mix`` on the first pass."""
        if mix is not None:
            stems -= mix  # in place: stems now holds -(residual)
        else:
            self.file.seek(pos * CHANNELS * 8)
            stems -= np.fromfile(self.file, dtype=np.float64, count=stems.size).reshape(-1, CHANNELS).T
        if last:
            self.energy += sum(float(np.dot(row, row)) for row in stems)
        else:
            self.file.seek(pos * CHANNELS * 8)
            self.file.write(np.ascontiguousarray(-stems.T).tobytes())

    def remove(self) -> None:
        if self.file is not None:
            self.file.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
