"""Encoding stems: WAV/FLAC (24-bit PCM, libsndfile), Opus (Ogg) and M4A (AAC), streamed block by block.

``wav`` and ``flac`` are 24-bit PCM (enough for separated stems, and the FLAC path stays
lossless). ``opus`` is libopus in an Ogg container; Opus only runs at 48 kHz, so the writer
resamples to 48 kHz with the same soxr resampler and the decoder brings it back. ``m4a`` is
FFmpeg's AAC encoder in MP4, written with ``movie_timescale`` equal to the sample rate so
the edit list records the exact length; the reader trims the AAC padding to that length.
Lossy formats default to 192 kbps. ``aac_coder`` picks FFmpeg's AAC quantiser search:
``fast`` (Stemset's default) or ``twoloop`` (FFmpeg's default, about 2.7x the CPU on stem-like
audio; benchmarks/RESULTS.md, "AAC encoder options"). Samples outside [-1, 1] are clipped
(counted in ``StemWriter.clipped_samples``). Decoding a written file with ``decode_audio`` at the
writer's sample rate gives exactly the number of frames written (for Opus this holds for
sample rates up to 48 kHz; above that, rounding through 48 kHz can differ by one frame).
Files are written to a hidden temporary name next to the target and renamed on
:meth:`StemWriter.close`, so a failed write never leaves a half-written stem in place.
"""

from __future__ import annotations

import os
import uuid
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from ..errors import EncodeError
from ..job import AAC_CODERS, DEFAULT_AAC_CODER
from .info import CHANNELS, MAX_RATE, MIN_RATE, OUTPUT_FORMATS, SAMPLE_RATE, as_2d
from .resample import Resampler

DEFAULT_BITRATE_KBPS = 192
OPUS_RATE = 48000
PCM_SUBTYPE = "PCM_24"
_AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
_BITRATE_RANGE = {"opus": (6, 510), "m4a": (16, 512)}


class _SndfileSink:
    def __init__(self, path: Path, fmt: str, sample_rate: int, channels: int):
        self.file = sf.SoundFile(
            str(path), "w", samplerate=sample_rate, channels=channels, format=fmt.upper(), subtype=PCM_SUBTYPE
        )

    def write(self, x: np.ndarray) -> None:  # (frames, channels)
        self.file.write(x)

    def close(self) -> None:
        self.file.close()

    def abort(self) -> None:
        try:
            self.file.close()
        except Exception:
            pass


class _FFmpegSink:
    def __init__(
        self, path: Path, fmt: str, bitrate_kbps: int, sample_rate: int, channels: int, options: dict | None = None
    ):
        self.layout = "mono" if channels == 1 else "stereo"
        if fmt == "opus":
            self.rate = OPUS_RATE
            self.container = av.open(str(path), "w", format="ogg")
            self.stream = self.container.add_stream("libopus", rate=OPUS_RATE, layout=self.layout)
        else:
            self.rate = sample_rate
            self.container = av.open(
                str(path),
                "w",
                format="ipod",
                options={"movflags": "+faststart", "movie_timescale": str(sample_rate)},
            )
            self.stream = self.container.add_stream("aac", rate=sample_rate, layout=self.layout)
        self.stream.bit_rate = int(bitrate_kbps) * 1000
        if options:  # FFmpeg encoder options (strings); an unknown value fails when the codec opens
            self.stream.codec_context.options = {k: str(v) for k, v in options.items()}
        self.resampler = Resampler(sample_rate, self.rate, channels)
        self.pts = 0

    def _encode(self, y: np.ndarray) -> None:
        if not y.shape[0]:
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(y.T), format="fltp", layout=self.layout)
        frame.sample_rate = self.rate
        frame.time_base = Fraction(1, self.rate)
        frame.pts = self.pts
        self.pts += y.shape[0]
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def write(self, x: np.ndarray) -> None:
        self._encode(self.resampler.push(x))

    def close(self) -> None:
        self._encode(self.resampler.finish())
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:
            pass


class StemWriter:
    """Streaming encoder for one stem: ``with StemWriter(path, "flac") as w: w.write(block)``.

    ``fmt`` is one of :data:`OUTPUT_FORMATS`. ``bitrate_kbps`` applies to ``opus`` and ``m4a``
    (default 192) and is ignored for ``wav``/``flac`` (24-bit PCM). Blocks are float32
    ``(channels, n)``; values outside [-1, 1] are clipped and counted in ``clipped_samples``.
    The file appears at ``path`` only when :meth:`close` succeeds.
    """

    def __init__(
        self,
        path,
        fmt: str,
        bitrate_kbps: int | None = None,
        sample_rate: int = SAMPLE_RATE,
        channels: int = CHANNELS,
        aac_coder: str | None = None,
    ):
        self.path = Path(os.fspath(path))
        self.fmt = str(fmt).lower().lstrip(".")
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self.frames_written = 0
        self.clipped_samples = 0
        self._closed = False
        if self.fmt not in OUTPUT_FORMATS:
            raise EncodeError(
                f"Cannot write '{self.path}': unknown output format '{fmt}'.",
                f"Use one of {', '.join(OUTPUT_FORMATS)} (output.format in config.yaml).",
            )
        if self.channels not in (1, 2):
            raise EncodeError(f"Cannot write '{self.path}' with {channels} channels: stems are mono or stereo.")
        if self.sample_rate < MIN_RATE or self.sample_rate > MAX_RATE:
            raise EncodeError(f"Cannot write '{self.path}' at {sample_rate} Hz: not a usable sample rate.")
        self.bitrate_kbps = None
        if self.fmt in _BITRATE_RANGE:
            kbps = DEFAULT_BITRATE_KBPS if bitrate_kbps is None else bitrate_kbps
            lo, hi = _BITRATE_RANGE[self.fmt]
            if not isinstance(kbps, (int, np.integer)) or isinstance(kbps, bool) or not lo <= kbps <= hi:
                raise EncodeError(
                    f"Cannot write '{self.path}': bitrate {bitrate_kbps!r} kbps is outside the "
                    f"{lo}..{hi} kbps that {self.fmt} supports.",
                    "Set output.bitrate in config.yaml to a whole number of kbps such as 192.",
                )
            self.bitrate_kbps = int(kbps)
        if self.fmt == "m4a" and self.sample_rate not in _AAC_RATES:
            raise EncodeError(
                f"Cannot write '{self.path}': AAC does not support {self.sample_rate} Hz.",
                f"Use one of {', '.join(map(str, _AAC_RATES))} Hz, or write flac/opus instead.",
            )
        self.aac_coder = DEFAULT_AAC_CODER if aac_coder is None else aac_coder
        if self.aac_coder not in AAC_CODERS:
            raise EncodeError(
                f"Cannot write '{self.path}': unknown AAC coder {aac_coder!r}.",
                f"Use one of {', '.join(AAC_CODERS)} (output.aac_coder in config.yaml).",
            )
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            if self.fmt in ("wav", "flac"):
                self._sink = _SndfileSink(self._tmp, self.fmt, self.sample_rate, self.channels)
            else:
                options = {"aac_coder": self.aac_coder} if self.fmt == "m4a" else None
                self._sink = _FFmpegSink(
                    self._tmp, self.fmt, self.bitrate_kbps, self.sample_rate, self.channels, options
                )
        except (OSError, sf.LibsndfileError, av.error.FFmpegError) as err:
            self._unlink_tmp()
            raise EncodeError(
                f"Cannot create '{self.path}': {err}.",
                "Check that the folder exists and is writable and that the disk is not full.",
            ) from err

    def write(self, block: np.ndarray) -> None:
        if self._closed:
            raise EncodeError(f"Cannot write to '{self.path}': the writer is already closed.")
        x = np.asarray(block, dtype=np.float32)
        if x.ndim == 1 and self.channels == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[0] != self.channels:
            raise EncodeError(
                f"Cannot write a block shaped {x.shape} to '{self.path}': expected ({self.channels}, frames)."
            )
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).sum())
            self.abort()
            raise EncodeError(
                f"Cannot write '{self.path}': the audio contains {bad} NaN or infinite values "
                f"after {self.frames_written / self.sample_rate:.3f} s.",
                "This is a bug in the separation step: the model output should be finite.",
            )
        over = np.abs(x) > 1.0
        if over.any():
            self.clipped_samples += int(over.sum())
            x = np.clip(x, -1.0, 1.0)
        try:
            self._sink.write(np.ascontiguousarray(x.T))
        except (OSError, sf.LibsndfileError, av.error.FFmpegError) as err:
            self.abort()
            raise EncodeError(
                f"Writing '{self.path}' failed after {self.frames_written / self.sample_rate:.3f} s: {err}.",
                "Check free disk space and that the folder is writable.",
            ) from err
        self.frames_written += x.shape[1]

    def close(self) -> None:
        if self._closed:
            return
        if self.frames_written == 0:
            self.abort()
            raise EncodeError(f"Nothing was written to '{self.path}': a stem needs at least one frame.")
        try:
            self._sink.close()
            os.replace(self._tmp, self.path)
        except (OSError, sf.LibsndfileError, av.error.FFmpegError) as err:
            self.abort()
            raise EncodeError(
                f"Finishing '{self.path}' failed: {err}.",
                "Check free disk space and that the folder is writable.",
            ) from err
        self._closed = True

    def abort(self) -> None:
        """Stop writing and remove the temporary file; ``path`` is left untouched."""
        if self._closed:
            return
        self._closed = True
        self._sink.abort()
        self._unlink_tmp()

    def _unlink_tmp(self) -> None:
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> StemWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def encode_audio(
    wav: np.ndarray,
    path,
    fmt: str,
    bitrate_kbps: int | None = None,
    sample_rate: int = SAMPLE_RATE,
    aac_coder: str | None = None,
) -> None:
    """Write ``wav`` (``(channels, n)`` float32) to ``path`` in one go (see :class:`StemWriter`)."""
    x = as_2d(wav)
    with StemWriter(path, fmt, bitrate_kbps, sample_rate=sample_rate, channels=x.shape[0], aac_coder=aac_coder) as w:
        step = SAMPLE_RATE * 30
        for i in range(0, max(x.shape[1], 1), step):
            w.write(x[:, i : i + step])
