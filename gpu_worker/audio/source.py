"""Opening an audio file: which reader (libsndfile or FFmpeg) takes it, what its header claims,
and the checks that turn bad input into a clear :class:`~gpu_worker.errors.AudioError`."""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import soundfile as sf

from ..errors import AudioError
from .channels import CHANNEL_GAINS, FLAC_ORDER, VORBIS_ORDER, WAV_MASK_NAMES
from .info import MAX_CHANNELS, MAX_RATE, MIN_RATE, AudioInfo, AudioWarning

_READ_HINT = (
    "Upload the original recording as WAV, FLAC, MP3, Ogg Vorbis, Opus, M4A/AAC or WebM; "
    "renaming a file does not convert it."
)
REUPLOAD_HINT = (
    "The file was probably cut off while being uploaded or copied; upload the complete file again, "
    "or re-export it from the recorder or audio editor."
)
MIN_FRACTION_ENV = "STEMSET_MIN_DECODED_FRACTION"
DEFAULT_MIN_FRACTION = 0.99
ACCEPT_HINT = (
    f"To separate the part that is there knowingly, set {MIN_FRACTION_ENV}=0 (`stemset separate --accept-truncated`)."
)


def min_decoded_fraction() -> float:
    """How much of the length a header promises must decode for a file to count as whole:
    ``$STEMSET_MIN_DECODED_FRACTION`` (0..1), default 0.99. Below it a file is an error; at or
    above it (0 accepts any cut file) the intact part is decoded with an AudioWarning."""
    raw = os.environ.get(MIN_FRACTION_ENV, "").strip()
    if not raw:
        return DEFAULT_MIN_FRACTION
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise AudioError(f"{MIN_FRACTION_ENV}={raw!r} must be a fraction from 0 to 1 (default {DEFAULT_MIN_FRACTION}).")
    return value


def check_complete(path: Path, promised: int, got: int, unit: str, rate: int | None = None) -> None:
    """Fail when ``got`` is below the accepted fraction of what the header ``promised`` (frames,
    or bytes for a WAV's data chunk); warn when it is short but accepted."""
    if got >= promised or promised <= 0:
        return
    fraction = got / promised
    if rate:
        amounts = f"{promised / rate:.2f} s of audio but only {got / rate:.2f} s could be decoded"
    else:
        amounts = f"{promised} {unit} of audio but the file holds only {got}"
    detail = f"its header promises {amounts} ({fraction:.1%} of it)"
    limit = min_decoded_fraction()
    if fraction < limit:
        raise AudioError(
            f"'{path}' is truncated or corrupt: {detail}, below the {limit:.0%} Stemset accepts.",
            f"{REUPLOAD_HINT} {ACCEPT_HINT}",
        )
    warnings.warn(
        f"'{path}' is truncated: {detail}; decoding the intact part ({MIN_FRACTION_ENV}={limit:g}).",
        AudioWarning,
        stacklevel=3,
    )


@dataclass
class Source:
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
        REUPLOAD_HINT,
    )


def ffmpeg_reason(err: Exception) -> str:
    return str(getattr(err, "strerror", None) or err)


def _decode_failed(path: Path, at_s: float, decoder: str, err: Exception) -> AudioError:
    reason = ffmpeg_reason(err).strip().rstrip(".")
    return AudioError(
        f"'{path}' could not be decoded after {at_s:.2f} s: {decoder} reported \"{reason}\". "
        f"The file is corrupt or truncated.",
        REUPLOAD_HINT,
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
    """ "ok", "no-eos" (ends on a page boundary without end-of-stream) or "cut" (mid-page).

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
            f"'{path}' is truncated: the file ends in the middle of an Ogg page, so its last part is garbage.",
            REUPLOAD_HINT,
        )
    if state == "no-eos":
        warnings.warn(
            f"'{path}' has no Ogg end-of-stream marker; it may have been cut short. Decoding the audio that is there.",
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
    if channels < 1 or not (MIN_RATE <= sample_rate <= MAX_RATE):
        raise AudioError(
            f"'{path}' declares {channels} channels at {sample_rate} Hz, which is not usable audio "
            f"(Stemset reads 1..{MAX_CHANNELS} channels at {MIN_RATE}..{MAX_RATE} Hz).",
            "Re-export the recording as a standard WAV or FLAC file.",
        )


def no_frames_error(path: Path, container: str) -> AudioError:
    return AudioError(
        f"'{path}' is a valid {container} file but contains no audio samples (0 frames).",
        "A take that was stopped immediately writes an empty file; upload a recording with sound in it.",
    )


def open_source(path) -> Source:
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


def _open_sndfile(p: Path, size: int, sfi) -> Source:
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
            names = tuple(n for b, n in enumerate(WAV_MASK_NAMES) if mask >> b & 1)
            layout = names[: sfi.channels] if len(names) >= sfi.channels else None
        if data is not None and data[0] > data[1]:
            if frames:  # the frames the data chunk's size promises, at the bytes per frame present
                check_complete(p, round(frames * data[0] / data[1]), frames, "frames", int(sfi.samplerate))
            else:
                check_complete(p, data[0], data[1], "bytes")
    elif fmt == "FLAC":
        layout = FLAC_ORDER.get(sfi.channels)
        declared = frames  # STREAMINFO's exact count: decoding fewer means the file is cut
    elif fmt == "OGG":
        layout = VORBIS_ORDER.get(sfi.channels)
        _check_ogg(p, size)
    elif fmt == "MP3":
        exact = False  # libsndfile estimates the length unless a Xing header states it: count
        if _has_xing(p) and frames > 0:
            declared, tolerance = frames, 2 * 1152
    if exact and frames == 0:
        raise no_frames_error(p, container)
    info = AudioInfo(
        container=container,
        codec=codec,
        sample_rate=int(sfi.samplerate),
        channels=int(sfi.channels),
        duration_s=frames / sfi.samplerate,
        frames=frames,
        bit_depth=bits,
    )
    return Source(p, "sndfile", info, exact, layout, declared, tolerance)


def _open_ffmpeg(p: Path, size: int) -> Source:
    try:
        container = av.open(str(p), metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as err:
        with open(p, "rb") as f:
            head = f.read(12)
        if head[4:8] == b"ftyp":  # an MP4 whose index (moov atom, written last) is missing
            raise AudioError(
                f"'{p}' is an MP4/M4A file that FFmpeg cannot open ({ffmpeg_reason(err)}); its index "
                f"(the moov atom, which recorders write last) is missing, so the file is truncated.",
                REUPLOAD_HINT,
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
        layout = names if all(n in CHANNEL_GAINS for n in names) else None
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
    return Source(p, "ffmpeg", info, False, layout, declared or None, int(0.1 * rate), trim_to)
