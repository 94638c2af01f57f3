"""Decoding: a source's blocks, downmixed and resampled, as one array or a bounded-memory stream.

Both :func:`decode_audio` and :func:`iter_decode` run the same generator, so they give identical
samples; see the package docstring for the formats and the checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from ..errors import AudioError
from .channels import downmix_matrix
from .info import CHANNELS, SAMPLE_RATE, AudioInfo
from .resample import Resampler, resampled_length
from .source import REUPLOAD_HINT, Source, check_complete, ffmpeg_reason, no_frames_error, open_source

_SOURCE_CHUNK = 1 << 16  # source frames per read; fixed so output never depends on block size
_DECODE_BLOCK = SAMPLE_RATE * 30  # output frames per block inside decode_audio


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.3f} s"


def _decode_failed(path: Path, at_s: float, decoder: str, err: Exception) -> AudioError:
    reason = ffmpeg_reason(err).strip().rstrip(".")
    return AudioError(
        f"'{path}' could not be decoded after {at_s:.2f} s: {decoder} reported \"{reason}\". "
        f"The file is corrupt or truncated.",
        REUPLOAD_HINT,
    )


def _frame_to_array(frame, path: Path) -> np.ndarray:
    """An av.AudioFrame -> float32 ``(frames, channels)``."""
    a = frame.to_ndarray()
    ch = len(frame.layout.channels)
    if frame.format.is_planar:
        a = a.T
    else:
        a = a.reshape(-1, ch)
    kind = a.dtype
    if kind == np.float32:
        return np.ascontiguousarray(a)
    if kind == np.float64:
        return a.astype(np.float32)
    if kind == np.int16:
        return a.astype(np.float32) / 32768.0
    if kind == np.int32:
        return (a / 2147483648.0).astype(np.float32)
    if kind == np.int64:
        return (a / 9223372036854775808.0).astype(np.float32)
    if kind == np.uint8:
        return (a.astype(np.float32) - 128.0) / 128.0
    raise AudioError(
        f"'{path}' decodes to the sample format '{frame.format.name}', which Stemset cannot convert.",
        "Re-export the recording as WAV or FLAC.",
    )


def _sndfile_blocks(src: Source) -> Iterator[np.ndarray]:
    done = 0
    try:
        with sf.SoundFile(str(src.path)) as f:
            while True:
                x = f.read(_SOURCE_CHUNK, dtype="float32", always_2d=True)
                if not x.shape[0]:
                    break
                done += x.shape[0]
                yield x
    except sf.LibsndfileError as err:
        raise _decode_failed(src.path, done / src.info.sample_rate, "libsndfile", err) from err


def _ffmpeg_blocks(src: Source) -> Iterator[np.ndarray]:
    done = 0
    pending: list[np.ndarray] = []
    npending = 0
    limit = src.trim_to
    rate = src.info.sample_rate
    try:
        with av.open(str(src.path), metadata_errors="ignore") as container:
            st = container.streams.audio[0]
            for frame in container.decode(st):
                if frame.sample_rate != rate:
                    raise AudioError(
                        f"'{src.path}' changes sample rate mid-stream ({rate} Hz to {frame.sample_rate} Hz).",
                        "Re-export the recording as a single WAV or FLAC file.",
                    )
                x = _frame_to_array(frame, src.path)
                if limit is not None:
                    x = x[: max(0, limit - done - npending)]
                if not x.shape[0]:
                    continue
                if pending and x.shape[1] != pending[0].shape[1]:  # channel count changed: flush
                    done += npending
                    yield np.concatenate(pending)
                    pending, npending = [], 0
                pending.append(x)
                npending += x.shape[0]
                if npending >= _SOURCE_CHUNK:
                    done += npending
                    yield np.concatenate(pending)
                    pending, npending = [], 0
    except av.error.FFmpegError as err:
        raise _decode_failed(src.path, (done + npending) / rate, "FFmpeg", err) from err
    if pending:
        yield np.concatenate(pending)


def _source_blocks(src: Source, counter: list[int]) -> Iterator[np.ndarray]:
    """Source-rate ``(frames, channels)`` blocks; checks truncation and emptiness at the end."""
    gen = _sndfile_blocks(src) if src.family == "sndfile" else _ffmpeg_blocks(src)
    for x in gen:
        counter[0] += x.shape[0]
        yield x
    n, rate = counter[0], src.info.sample_rate
    if n == 0:
        raise no_frames_error(src.path, src.info.container)
    if src.declared and n < src.declared - src.tolerance:
        check_complete(src.path, src.declared, n, "frames", rate)


def _count_frames(src: Source) -> int:
    counter = [0]
    for _ in _source_blocks(src, counter):
        pass
    return counter[0]


class _NonFinite:
    """Accumulates where NaN/Inf values occur across a stream of ``(frames, channels)`` blocks."""

    def __init__(self):
        self.values = 0
        self.frames = 0
        self.first = None
        self.last = None

    def add(self, x: np.ndarray, offset: int) -> None:
        bad = ~np.isfinite(x)
        rows = np.flatnonzero(bad.any(axis=1))
        if rows.size:
            self.values += int(bad.sum())
            self.frames += int(rows.size)
            if self.first is None:
                self.first = offset + int(rows[0])
            self.last = offset + int(rows[-1])

    def raise_for(self, what: str, sample_rate: int) -> None:
        if not self.values:
            return
        raise AudioError(
            f"{what} contains {self.values} non-finite sample values (NaN or infinity) in "
            f"{self.frames} frames, first at {_fmt_time(self.first / sample_rate)} and last at "
            f"{_fmt_time(self.last / sample_rate)}.",
            "Such values come from a broken plugin, render or converter; re-export the audio from "
            "its source as PCM WAV or FLAC, which cannot hold NaN.",
        )


def decode_source(
    src: Source, block_frames: int, sample_rate: int, channels: int, counter: list[int]
) -> Iterator[np.ndarray]:
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    if block_frames < 1:
        raise ValueError(f"block_frames must be positive, got {block_frames}")
    resampler = Resampler(src.info.sample_rate, sample_rate, channels)
    nonfinite = _NonFinite()
    mixes: dict[int, np.ndarray | None] = {}
    pending: list[np.ndarray] = []
    npending = 0

    def emit(y: np.ndarray, final: bool) -> Iterator[np.ndarray]:
        nonlocal pending, npending
        if y.shape[0]:
            pending.append(y)
            npending += y.shape[0]
        if npending < block_frames and not (final and npending):
            return
        buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
        start = 0
        while buf.shape[0] - start >= block_frames:
            yield np.ascontiguousarray(buf[start : start + block_frames].T)
            start += block_frames
        rest = buf[start:]
        if final and rest.shape[0]:
            yield np.ascontiguousarray(rest.T)
            rest = rest[:0]
        pending, npending = ([rest] if rest.shape[0] else []), rest.shape[0]

    offset = 0
    for x in _source_blocks(src, counter):
        nonfinite.add(x, offset)
        offset += x.shape[0]
        if nonfinite.values:  # keep scanning to report every bad sample, but stop producing
            continue
        nch = x.shape[1]
        if nch not in mixes:
            mixes[nch] = downmix_matrix(nch, src.layout if nch == src.info.channels else None, channels)
        m = mixes[nch]
        if m is not None:
            x = x @ m.T
        yield from emit(resampler.push(x), final=False)
    nonfinite.raise_for(f"'{src.path}'", src.info.sample_rate)
    yield from emit(resampler.finish(), final=True)


def probe_audio(path) -> AudioInfo:
    """Container, codec, rate, channels, exact frame count and bit depth of an audio file.

    PCM, FLAC and Ogg Vorbis are probed from their headers, which state the exact length; MP3
    and FFmpeg-read files are decoded once to count frames. Raises AudioError for files that
    are missing, empty, not audio, without frames, with too many channels, or visibly
    truncated. Damage that only decoding can find (a FLAC cut mid-stream, NaN samples) is
    reported by :func:`decode_audio` / :func:`iter_decode`.
    """
    src = open_source(path)
    if src.frames_exact:
        return src.info
    n = _count_frames(src)
    return replace(src.info, frames=n, duration_s=n / src.info.sample_rate)


def iter_decode(
    path, block_frames: int = SAMPLE_RATE * 30, sample_rate: int = SAMPLE_RATE, channels: int = CHANNELS
) -> Iterator[np.ndarray]:
    """Stream ``path`` as float32 ``(channels, block_frames)`` blocks (the last one shorter).

    Bounded memory: at most one source chunk plus one output block is held. The concatenated
    blocks are exactly :func:`decode_audio`'s array, whatever ``block_frames`` is.
    """
    src = open_source(path)
    yield from decode_source(src, block_frames, sample_rate, channels, [0])


def decode_audio(path, sample_rate: int = SAMPLE_RATE, channels: int = CHANNELS) -> tuple[np.ndarray, AudioInfo]:
    """Decode a whole file to float32 ``(channels, n)`` at ``sample_rate``.

    ``n == resampled_length(info.frames, info.sample_rate, sample_rate)``; ``info`` describes
    the source (as :func:`probe_audio` would). Mono is duplicated, more channels are downmixed
    (:func:`~.channels.downmix_matrix`), NaN/Inf raise AudioError.
    """
    src = open_source(path)
    counter = [0]
    blocks = decode_source(src, _DECODE_BLOCK, sample_rate, channels, counter)
    parts: list[np.ndarray] = []
    out, pos = None, 0
    if src.frames_exact:  # preallocate: no second copy of the whole file
        total = resampled_length(src.info.frames, src.info.sample_rate, sample_rate)
        out = np.empty((channels, total), np.float32)
    for b in blocks:
        if out is not None and not parts and pos + b.shape[1] <= out.shape[1]:
            out[:, pos : pos + b.shape[1]] = b
            pos += b.shape[1]
        else:  # no (or a wrong) length from the header: collect the blocks instead
            parts.append(b)
    if out is not None:
        parts.insert(0, out[:, :pos])
    if not parts:
        out = np.zeros((channels, 0), np.float32)
    else:
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    n = counter[0]
    info = replace(src.info, frames=n, duration_s=n / src.info.sample_rate)
    return out, info
