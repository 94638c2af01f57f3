"""Audio I/O for the engine: probe, streaming decode/encode, loudness, peaks, sanity checks.

Everything here works on float32 arrays shaped ``(channels, frames)``.

Decoding
    Two readers, chosen by what can open the file (one code path per family):

    * **libsndfile** (``soundfile``) for what it reads natively: WAV/WAVEX/RF64/W64, AIFF,
      CAF, FLAC, Ogg Vorbis and MP3 (with LAME/Xing gapless trimming).
    * **FFmpeg** (``av``) for everything else: Ogg Opus, MP4/M4A (AAC, ALAC), WebM/Matroska,
      ADTS AAC, ... and anything libsndfile refuses.

    Source blocks are downmixed to the target channel count first (see
    :func:`downmix_matrix`), then resampled with ``soxr.ResampleStream`` (quality ``HQ``).
    :func:`iter_decode` streams in bounded memory; :func:`decode_audio` is built on the same
    generator, so both give identical samples. The output length is exact:
    ``resampled_length(frames, source_rate, target_rate) == round(frames * target / source)``
    where ``frames`` is the exact number of frames in the source (what :func:`probe_audio`
    reports). libsndfile reports exact counts for PCM, FLAC and Ogg Vorbis from the header;
    for MP3 and the FFmpeg family :func:`probe_audio` decodes the file once to count them,
    because container durations there are estimates (WebM stores milliseconds, ADTS has none).

Bad input raises :class:`~gpu_worker.errors.AudioError` naming the file:
    missing or empty files, non-audio files, zero audio frames, more than
    ``MAX_CHANNELS`` channels, NaN/Inf samples, and truncated *compressed* files (FLAC that
    loses sync, MP3 shorter than its Xing header says, Ogg whose last page is cut off, MP4 or
    WebM shorter than their declared duration, decoder errors). A PCM WAV cut mid-stream
    decodes the intact part and emits an :class:`AudioWarning` saying how much is missing;
    an Ogg file that ends on a page boundary without an end-of-stream flag decodes with a
    warning too.

Encoding (:class:`StemWriter`, :func:`encode_audio`)
    ``wav`` and ``flac`` are 24-bit PCM (enough for separated stems, and the FLAC path stays
    lossless). ``opus`` is libopus in an Ogg container; Opus only runs at 48 kHz, so the writer
    resamples to 48 kHz with the same soxr resampler and the decoder brings it back. ``m4a`` is
    FFmpeg's AAC encoder in MP4, written with ``movie_timescale`` equal to the sample rate so
    the edit list records the exact length; the reader trims the AAC padding to that length.
    Lossy formats default to 192 kbps. Samples outside [-1, 1] are clipped (counted in
    ``StemWriter.clipped_samples``). Decoding a written file with :func:`decode_audio` at the
    writer's sample rate gives exactly the number of frames written (for Opus this holds for
    sample rates up to 48 kHz; above that, rounding through 48 kHz can differ by one frame).
    Files are written to a hidden temporary name next to the target and renamed on
    :meth:`StemWriter.close`, so a failed write never leaves a half-written stem in place.
"""

from __future__ import annotations

import math
import os
import struct
import uuid
import warnings
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import pyloudnorm
import soundfile as sf
import soxr

from .errors import AudioError, EncodeError

__all__ = [
    "SAMPLE_RATE",
    "CHANNELS",
    "OUTPUT_FORMATS",
    "MAX_CHANNELS",
    "DEFAULT_BITRATE_KBPS",
    "AudioInfo",
    "AudioWarning",
    "probe_audio",
    "decode_audio",
    "iter_decode",
    "resampled_length",
    "downmix_matrix",
    "StemWriter",
    "encode_audio",
    "integrated_loudness",
    "sample_peak",
    "peak_dbfs",
    "waveform_peaks",
    "check_finite",
]

SAMPLE_RATE = 44100
CHANNELS = 2
OUTPUT_FORMATS = ("wav", "flac", "opus", "m4a")
MAX_CHANNELS = 32
DEFAULT_BITRATE_KBPS = 192
OPUS_RATE = 48000
PCM_SUBTYPE = "PCM_24"

_SOURCE_CHUNK = 1 << 16  # source frames per read; fixed so output never depends on block size
_DECODE_BLOCK = SAMPLE_RATE * 30  # output frames per block inside decode_audio
_RESAMPLE_QUALITY = "HQ"
_MIN_RATE, _MAX_RATE = 1000, 768000
_AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
_BITRATE_RANGE = {"opus": (6, 510), "m4a": (16, 512)}

_READ_HINT = (
    "Upload the original recording as WAV, FLAC, MP3, Ogg Vorbis, Opus, M4A/AAC or WebM; "
    "renaming a file does not convert it."
)
_REUPLOAD_HINT = (
    "The file was probably cut off while being uploaded or copied; upload the complete file again, "
    "or re-export it from the recorder or audio editor."
)


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


# --------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------


def resampled_length(frames: int, source_rate: int, target_rate: int) -> int:
    """The exact number of frames :func:`decode_audio` returns for ``frames`` source frames."""
    if source_rate == target_rate:
        return int(frames)
    return int(round(frames * target_rate / source_rate))


def _as_2d(wav: np.ndarray) -> np.ndarray:
    """``(n,)`` -> ``(1, n)``; ``(channels, n)`` unchanged."""
    x = np.asarray(wav)
    if x.ndim == 1:
        return x[None, :]
    if x.ndim != 2:
        raise ValueError(f"expected audio shaped (channels, frames), got shape {x.shape}")
    return x


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.3f} s"


class _Resampler:
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


# --------------------------------------------------------------------------------------
# Channel layouts and downmix
# --------------------------------------------------------------------------------------

_H = 1.0 / math.sqrt(2.0)
# FFmpeg channel names -> (gain into left, gain into right), ITU-R BS.775 style.
_CHANNEL_GAINS: dict[str, tuple[float, float]] = {
    **{n: (1.0, 0.0) for n in ("FL", "FLC", "WL", "DL", "BFL")},
    **{n: (0.0, 1.0) for n in ("FR", "FRC", "WR", "DR", "BFR")},
    **{n: (_H, _H) for n in ("FC", "BC", "TC", "TFC", "TBC", "BFC")},
    **{n: (_H, 0.0) for n in ("BL", "SL", "TFL", "TBL", "TSL", "SDL")},
    **{n: (0.0, _H) for n in ("BR", "SR", "TFR", "TBR", "TSR", "SDR")},
    **{n: (0.0, 0.0) for n in ("LFE", "LFE2")},
}
# WAVE_FORMAT_EXTENSIBLE dwChannelMask bits, in order.
_WAV_MASK_NAMES = (
    "FL", "FR", "FC", "LFE", "BL", "BR", "FLC", "FRC", "BC",
    "SL", "SR", "TC", "TFL", "TFC", "TFR", "TBL", "TBC", "TBR",
)  # fmt: skip
# Channel orders fixed by the FLAC and Vorbis specifications (libsndfile does not reorder).
_FLAC_ORDER = {
    3: ("FL", "FR", "FC"),
    4: ("FL", "FR", "BL", "BR"),
    5: ("FL", "FR", "FC", "BL", "BR"),
    6: ("FL", "FR", "FC", "LFE", "BL", "BR"),
    7: ("FL", "FR", "FC", "LFE", "BC", "SL", "SR"),
    8: ("FL", "FR", "FC", "LFE", "BL", "BR", "SL", "SR"),
}
_VORBIS_ORDER = {
    3: ("FL", "FC", "FR"),
    4: ("FL", "FR", "BL", "BR"),
    5: ("FL", "FC", "FR", "BL", "BR"),
    6: ("FL", "FC", "FR", "BL", "BR", "LFE"),
    7: ("FL", "FC", "FR", "SL", "SR", "BC", "LFE"),
    8: ("FL", "FC", "FR", "SL", "SR", "BL", "BR", "LFE"),
}


def downmix_matrix(
    channels: int, layout: tuple[str, ...] | None, target: int = CHANNELS
) -> np.ndarray | None:
    """The ``(target, channels)`` mixing matrix, or None when no mixing is needed.

    * mono -> stereo: the channel is duplicated; stereo -> mono: the mean of L and R.
    * more than two channels with a known layout (WAVEX channel mask, FLAC/Vorbis order,
      FFmpeg layout): ITU-R BS.775-style. Front L/R go to their side at 1.0, centre channels
      to both sides at 0.707, surround/back/top channels to their side at 0.707, LFE is
      dropped. Each output row is then scaled so its gains sum to 1, so the downmix can never
      clip (a 5.1 file gets L = (FL + 0.707 FC + 0.707 BL) / 2.414).
    * more than two channels without a layout (e.g. a multitrack recorder's plain WAV, whose
      channels are independent microphones): even-indexed channels (1st, 3rd, ...) are
      averaged into L and odd-indexed into R, so every track is kept.
    * to mono from more than two channels: the mean of the stereo downmix's two rows.
    """
    if target not in (1, 2):
        raise ValueError(f"target channels must be 1 or 2, got {target}")
    if channels == target:
        return None
    if channels == 1:
        return np.ones((target, 1), np.float32)
    if channels == 2:
        stereo = np.eye(2, dtype=np.float64)
    else:
        stereo = np.zeros((2, channels), np.float64)
        if layout is not None and len(layout) == channels and all(n in _CHANNEL_GAINS for n in layout):
            for i, name in enumerate(layout):
                stereo[:, i] = _CHANNEL_GAINS[name]
        if not (stereo.sum(axis=1) > 0).all():  # unknown layout (or one with no L/R content)
            stereo[:] = 0.0
            stereo[0, 0::2] = 1.0
            stereo[1, 1::2] = 1.0
        stereo /= stereo.sum(axis=1, keepdims=True)
    if target == 1:
        return stereo.mean(axis=0, keepdims=True).astype(np.float32)
    return stereo.astype(np.float32)


# --------------------------------------------------------------------------------------
# Opening a source: which reader, what it claims, sanity checks
# --------------------------------------------------------------------------------------


@dataclass
class _Source:
    path: Path
    family: str  # "sndfile" | "ffmpeg"
    info: AudioInfo  # frames == declared (may be provisional when not frames_exact)
    frames_exact: bool  # info.frames is exact without decoding
    layout: tuple[str, ...] | None
    declared: int | None = None  # a frame count the header promises, to detect truncation
    tolerance: int = 0  # how many frames short of ``declared`` still counts as complete
    trim_to: int | None = None  # cut decoded output to this many frames (MP4 edit list)


_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or an Office document)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BM", "a BMP image"),
)


def _describe_content(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError:
        return "unreadable data"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (perhaps an error page saved instead of the file)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file"
    return "binary data in no audio format"


def _not_audio(path: Path, detail: str | None = None) -> AudioError:
    what = _describe_content(path)
    msg = (
        f"'{path}' is not an audio file Stemset can read: it looks like {what}, and neither "
        f"libsndfile nor FFmpeg found an audio stream in it"
    )
    msg += f" ({detail})." if detail else "."
    return AudioError(msg, _READ_HINT)


def _truncated(path: Path, claimed_s: float, got_s: float) -> AudioError:
    return AudioError(
        f"'{path}' is truncated or corrupt: its header promises {claimed_s:.2f} s of audio but only "
        f"{got_s:.2f} s could be decoded.",
        _REUPLOAD_HINT,
    )


def _ffmpeg_reason(err: Exception) -> str:
    return str(getattr(err, "strerror", None) or err)


def _decode_failed(path: Path, at_s: float, decoder: str, err: Exception) -> AudioError:
    reason = _ffmpeg_reason(err).strip().rstrip(".")
    return AudioError(
        f"'{path}' could not be decoded after {at_s:.2f} s: {decoder} reported \"{reason}\". "
        f"The file is corrupt or truncated.",
        _REUPLOAD_HINT,
    )


def _riff_layout_and_truncation(path: Path, size: int) -> tuple[int | None, tuple[int, int] | None]:
    """For a RIFF/RF64 WAVE file: (channel mask or None, (data bytes claimed, data bytes present))."""
    mask = None
    data = None
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            return None, None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            cid, csize = chunk[:4], struct.unpack("<I", chunk[4:8])[0]
            if cid == b"fmt ":
                body = f.read(min(csize, 40))
                if len(body) >= 24 and struct.unpack("<H", body[:2])[0] == 0xFFFE:
                    mask = struct.unpack("<I", body[20:24])[0]
            elif cid == b"data":
                if head[:4] == b"RIFF" and csize not in (0, 0xFFFFFFFF):
                    data = (csize, size - (pos + 8))
                break
            pos += 8 + csize + (csize & 1)
    return mask, data


def _ogg_tail_state(path: Path, size: int) -> str:
    """"ok", "no-eos" (ends on a page boundary without end-of-stream) or "cut" (mid-page).

    Walks the pages in the last two maximum page sizes of the file, hopping header to header
    and resynchronising on the next capture pattern if a hop lands on garbage.
    """
    tail_len = min(size, 2 * 65307)  # an Ogg page is at most 65307 bytes
    with open(path, "rb") as f:
        f.seek(size - tail_len)
        tail = f.read(tail_len)
    n = len(tail)
    pos = tail.find(b"OggS")
    while pos >= 0:
        nseg = tail[pos + 26] if pos + 27 <= n else None
        if nseg is None or pos + 27 + nseg > n:
            end = n + 1
        elif tail[pos + 4] != 0:  # not a version-0 page header
            pos = tail.find(b"OggS", pos + 1)
            continue
        else:
            end = pos + 27 + nseg + sum(tail[pos + 27 : pos + 27 + nseg])
        if end == n:
            return "ok" if tail[pos + 5] & 0x04 else "no-eos"
        if end < n and tail[end : end + 4] == b"OggS":
            pos = end
            continue
        nxt = tail.find(b"OggS", pos + 1)
        if nxt < 0:
            return "cut"
        pos = nxt
    return "cut"


def _check_ogg(path: Path, size: int) -> None:
    state = _ogg_tail_state(path, size)
    if state == "cut":
        raise AudioError(
            f"'{path}' is truncated: the file ends in the middle of an Ogg page, so its last part "
            f"is garbage.",
            _REUPLOAD_HINT,
        )
    if state == "no-eos":
        warnings.warn(
            f"'{path}' has no Ogg end-of-stream marker; it may have been cut short. Decoding the "
            f"audio that is there.",
            AudioWarning,
            stacklevel=4,
        )


def _has_xing(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(10)
        skip = 0
        if head[:3] == b"ID3" and len(head) == 10:
            s = head[6:10]
            skip = 10 + ((s[0] & 0x7F) << 21 | (s[1] & 0x7F) << 14 | (s[2] & 0x7F) << 7 | (s[3] & 0x7F))
        f.seek(skip)
        first = f.read(4096)
    return b"Xing" in first or b"Info" in first


_SF_CONTAINERS = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3", "AIFF": "aiff"}
_SF_PCM = {
    "PCM_S8": ("pcm_s8", 8),
    "PCM_U8": ("pcm_u8", 8),
    "PCM_16": ("pcm_s16", 16),
    "PCM_24": ("pcm_s24", 24),
    "PCM_32": ("pcm_s32", 32),
    "FLOAT": ("pcm_f32", 32),
    "DOUBLE": ("pcm_f64", 64),
    "ULAW": ("pcm_mulaw", 8),
    "ALAW": ("pcm_alaw", 8),
}
_SF_LOSSY = {
    "VORBIS": "vorbis",
    "OPUS": "opus",
    "MPEG_LAYER_I": "mp1",
    "MPEG_LAYER_II": "mp2",
    "MPEG_LAYER_III": "mp3",
}


def _sf_codec(fmt: str, subtype: str) -> tuple[str, int | None]:
    if subtype in _SF_LOSSY:
        return _SF_LOSSY[subtype], None
    name, bits = _SF_PCM.get(subtype, (subtype.lower(), None))
    if fmt == "FLAC":
        return "flac", bits
    if name.startswith("pcm_") and name[-1].isdigit() and bits and bits > 8:
        name += "be" if fmt in ("AIFF",) else "le"
    return name, bits


def _short_container(ffmpeg_name: str, path: Path) -> str:
    names = ffmpeg_name.split(",")
    ext = path.suffix.lower().lstrip(".")
    if ext in names:
        return ext
    if "mov" in names:
        return "mp4"
    if "matroska" in names:
        return "mkv"
    return names[0]


def _check_shape(path: Path, sample_rate: int, channels: int) -> None:
    if channels > MAX_CHANNELS:
        raise AudioError(
            f"'{path}' has {channels} audio channels; Stemset reads at most {MAX_CHANNELS}.",
            "Export a stereo (or up to 8-channel surround) mix of the recording and upload that.",
        )
    if channels < 1 or not (_MIN_RATE <= sample_rate <= _MAX_RATE):
        raise AudioError(
            f"'{path}' declares {channels} channels at {sample_rate} Hz, which is not usable audio "
            f"(Stemset reads 1..{MAX_CHANNELS} channels at {_MIN_RATE}..{_MAX_RATE} Hz).",
            "Re-export the recording as a standard WAV or FLAC file.",
        )


def _no_frames(path: Path, container: str) -> AudioError:
    return AudioError(
        f"'{path}' is a valid {container} file but contains no audio samples (0 frames).",
        "A take that was stopped immediately writes an empty file; upload a recording with sound in it.",
    )


def _open(path) -> _Source:
    p = Path(os.fspath(path))
    if not p.exists():
        raise AudioError(f"'{p}' does not exist.", "Check the path or object key and try again.")
    if not p.is_file():
        raise AudioError(f"'{p}' is not a regular file.", "Point Stemset at an audio file, not a folder.")
    size = p.stat().st_size
    if size == 0:
        raise AudioError(
            f"'{p}' is empty (0 bytes).",
            "The upload or copy failed or is still in progress; upload the file again.",
        )
    try:
        sfi = sf.info(str(p))
    except Exception:  # libsndfile refuses it: let FFmpeg try
        sfi = None
    # Ogg Opus goes to FFmpeg with the other codecs; so does a FLAC/Ogg whose header does not
    # state its length (libsndfile then reports 0 or SF_COUNT_MAX frames and cannot stream it).
    if sfi is not None and sfi.subtype != "OPUS":
        unknown_length = sfi.frames >= 2**62 or (sfi.frames <= 0 and sfi.format in ("FLAC", "OGG"))
        if not unknown_length:
            return _open_sndfile(p, size, sfi)
    return _open_ffmpeg(p, size)


def _open_sndfile(p: Path, size: int, sfi) -> _Source:
    fmt, subtype = sfi.format, sfi.subtype
    _check_shape(p, int(sfi.samplerate), int(sfi.channels))
    container = _SF_CONTAINERS.get(fmt, fmt.lower())
    codec, bits = _sf_codec(fmt, subtype)
    frames = int(sfi.frames)
    layout = None
    exact, declared, tolerance = True, None, 0
    if fmt in ("WAV", "WAVEX", "RF64"):
        mask, data = _riff_layout_and_truncation(p, size)
        if mask:
            names = tuple(n for b, n in enumerate(_WAV_MASK_NAMES) if mask >> b & 1)
            layout = names[: sfi.channels] if len(names) >= sfi.channels else None
        if data is not None and data[0] > data[1]:
            missing = 1.0 - data[1] / data[0]
            warnings.warn(
                f"'{p}' is truncated: its header promises {data[0]} bytes of audio but the file holds "
                f"only {data[1]} ({missing:.0%} missing). Decoding the intact "
                f"{frames / sfi.samplerate:.2f} s.",
                AudioWarning,
                stacklevel=3,
            )
    elif fmt == "FLAC":
        layout = _FLAC_ORDER.get(sfi.channels)
        declared = frames  # STREAMINFO's exact count: decoding fewer means the file is cut
    elif fmt == "OGG":
        layout = _VORBIS_ORDER.get(sfi.channels)
        _check_ogg(p, size)
    elif fmt == "MP3":
        exact = False  # libsndfile estimates the length unless a Xing header states it: count
        if _has_xing(p) and frames > 0:
            declared, tolerance = frames, 2 * 1152
    if exact and frames == 0:
        raise _no_frames(p, container)
    info = AudioInfo(
        container=container,
        codec=codec,
        sample_rate=int(sfi.samplerate),
        channels=int(sfi.channels),
        duration_s=frames / sfi.samplerate,
        frames=frames,
        bit_depth=bits,
    )
    return _Source(p, "sndfile", info, exact, layout, declared, tolerance)


def _open_ffmpeg(p: Path, size: int) -> _Source:
    try:
        container = av.open(str(p), metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as err:
        with open(p, "rb") as f:
            head = f.read(12)
        if head[4:8] == b"ftyp":  # an MP4 whose index (moov atom, written last) is missing
            raise AudioError(
                f"'{p}' is an MP4/M4A file that FFmpeg cannot open ({_ffmpeg_reason(err)}); its index "
                f"(the moov atom, which recorders write last) is missing, so the file is truncated.",
                _REUPLOAD_HINT,
            ) from err
        raise _not_audio(p) from err
    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["no"]
            detail = f"FFmpeg read it as '{container.format.name}' with {' and '.join(kinds)} streams only"
            raise _not_audio(p, detail)
        st = container.streams.audio[0]
        cc = st.codec_context
        rate, channels = int(cc.sample_rate or 0), int(cc.channels or 0)
        if rate <= 0 or channels <= 0:
            raise _not_audio(p, f"FFmpeg guessed '{container.format.name}' but found no decodable audio")
        _check_shape(p, rate, channels)
        names = tuple(ch.name for ch in cc.layout.channels)
        layout = names if all(n in _CHANNEL_GAINS for n in names) else None
        codec = cc.codec.canonical_name
        bits = None
        if codec.startswith("pcm_"):
            digits = "".join(c for c in codec if c.isdigit())
            bits = int(digits) if digits else None
        elif cc.codec.lossless and cc.format is not None and cc.format.bits == 16:
            bits = 16
        fmt_names = container.format.name.split(",")
        short = _short_container(container.format.name, p)
        # Only containers that store a real duration can prove a file short. MP4's edit list is
        # exact (and the AAC padding past it is trimmed); Matroska stores milliseconds and Ogg's
        # last granule includes the Opus pre-skip, hence the 0.1 s tolerance.
        declared = trim_to = None
        if "mov" in fmt_names and st.duration and st.time_base:
            declared = trim_to = int(round(Fraction(st.duration) * st.time_base * rate))
        elif ("matroska" in fmt_names or "ogg" in fmt_names) and container.duration:
            declared = int(container.duration * rate // 1_000_000)
        if "ogg" in fmt_names:
            _check_ogg(p, size)
        info = AudioInfo(
            container=short,
            codec=codec,
            sample_rate=rate,
            channels=channels,
            duration_s=(declared or 0) / rate,
            frames=declared or 0,  # provisional: probe_audio counts the decoded frames
            bit_depth=bits,
        )
    return _Source(p, "ffmpeg", info, False, layout, declared or None, int(0.1 * rate), trim_to)


# --------------------------------------------------------------------------------------
# Source blocks (source rate, source channels) and the decode pipeline
# --------------------------------------------------------------------------------------


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


def _sndfile_blocks(src: _Source) -> Iterator[np.ndarray]:
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


def _ffmpeg_blocks(src: _Source) -> Iterator[np.ndarray]:
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


def _source_blocks(src: _Source, counter: list[int]) -> Iterator[np.ndarray]:
    """Source-rate ``(frames, channels)`` blocks; checks truncation and emptiness at the end."""
    gen = _sndfile_blocks(src) if src.family == "sndfile" else _ffmpeg_blocks(src)
    for x in gen:
        counter[0] += x.shape[0]
        yield x
    n, rate = counter[0], src.info.sample_rate
    if n == 0:
        raise _no_frames(src.path, src.info.container)
    if src.declared and n < src.declared - src.tolerance:
        raise _truncated(src.path, src.declared / rate, n / rate)


def _count_frames(src: _Source) -> int:
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


def _decode_stream(
    src: _Source, block_frames: int, sample_rate: int, channels: int, counter: list[int]
) -> Iterator[np.ndarray]:
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    if block_frames < 1:
        raise ValueError(f"block_frames must be positive, got {block_frames}")
    resampler = _Resampler(src.info.sample_rate, sample_rate, channels)
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
    src = _open(path)
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
    src = _open(path)
    yield from _decode_stream(src, block_frames, sample_rate, channels, [0])


def decode_audio(
    path, sample_rate: int = SAMPLE_RATE, channels: int = CHANNELS
) -> tuple[np.ndarray, AudioInfo]:
    """Decode a whole file to float32 ``(channels, n)`` at ``sample_rate``.

    ``n == resampled_length(info.frames, info.sample_rate, sample_rate)``; ``info`` describes
    the source (as :func:`probe_audio` would). Mono is duplicated, more channels are downmixed
    (:func:`downmix_matrix`), NaN/Inf raise AudioError via the same check as :func:`check_finite`.
    """
    src = _open(path)
    counter = [0]
    blocks = _decode_stream(src, _DECODE_BLOCK, sample_rate, channels, counter)
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


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


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
    def __init__(self, path: Path, fmt: str, bitrate_kbps: int, sample_rate: int, channels: int):
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
        self.resampler = _Resampler(sample_rate, self.rate, channels)
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
            raise EncodeError(
                f"Cannot write '{self.path}' with {channels} channels: stems are mono or stereo."
            )
        if self.sample_rate < _MIN_RATE or self.sample_rate > _MAX_RATE:
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
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            if self.fmt in ("wav", "flac"):
                self._sink = _SndfileSink(self._tmp, self.fmt, self.sample_rate, self.channels)
            else:
                self._sink = _FFmpegSink(
                    self._tmp, self.fmt, self.bitrate_kbps, self.sample_rate, self.channels
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
                "This is a bug in the separation step; check the model output with check_finite().",
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
    wav: np.ndarray, path, fmt: str, bitrate_kbps: int | None = None, sample_rate: int = SAMPLE_RATE
) -> None:
    """Write ``wav`` (``(channels, n)`` float32) to ``path`` in one go (see :class:`StemWriter`)."""
    x = _as_2d(wav)
    with StemWriter(path, fmt, bitrate_kbps, sample_rate=sample_rate, channels=x.shape[0]) as w:
        step = SAMPLE_RATE * 30
        for i in range(0, max(x.shape[1], 1), step):
            w.write(x[:, i : i + step])


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


def integrated_loudness(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float | None:
    """ITU-R BS.1770-4 integrated loudness in LUFS (pyloudnorm), or None.

    Channels get BS.1770 weights for L/R/C (1.0); a ``(1, n)`` or ``(n,)`` input is measured as
    mono, so a 0 dBFS 997 Hz sine reads -3.01 LUFS in mono and about 0.0 LUFS in both stereo
    channels. None for digital silence, for audio entirely below the -70 LUFS absolute gate,
    and for input shorter than one 400 ms gating block (padding would bias the result).
    At most 5 channels (pyloudnorm's limit).
    """
    x = _as_2d(wav)
    if x.shape[0] > 5:
        raise ValueError(f"integrated_loudness takes at most 5 channels, got {x.shape[0]}")
    if x.shape[1] < math.ceil(0.4 * sample_rate) or not np.any(x):
        return None
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
    x = _as_2d(wav)
    length = x.shape[1]
    if length == 0:
        return np.zeros((n, 2), np.float32)
    mono = x.mean(axis=0, dtype=np.float64).astype(np.float32) if x.shape[0] > 1 else x[0].astype(np.float32)
    starts = (np.arange(n, dtype=np.int64) * length) // n
    lo = np.minimum.reduceat(mono, starts)
    hi = np.maximum.reduceat(mono, starts)
    return np.stack([lo, hi], axis=1).astype(np.float32)


def check_finite(wav: np.ndarray, what: str, sample_rate: int = SAMPLE_RATE) -> None:
    """Raise AudioError if ``wav`` has NaN/Inf values, saying how many and where (seconds)."""
    x = _as_2d(wav)
    if x.size == 0 or np.isfinite(np.sum(x, dtype=np.float64)):
        return
    report = _NonFinite()
    report.add(x.T, 0)
    report.raise_for(what, sample_rate)
