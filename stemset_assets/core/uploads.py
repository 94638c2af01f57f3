"""Taking a file in from outside the bucket (`stemset process FILE`, the web upload): a safe
object name, and a check that the content is audio Stemset can read.

The upload and its partition key are :mod:`stemset_assets.defs.intake`. Imports no Dagster.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path, PurePosixPath

from gpu_worker.errors import AudioError, StemsetError

# What soundfile or PyAV decodes; the sensor and uploads both go by it.
AUDIO_EXTENSIONS = (
    ".wav",
    ".wave",
    ".flac",
    ".mp3",
    ".ogg",
    ".oga",
    ".opus",
    ".m4a",
    ".mp4",
    ".aac",
    ".aif",
    ".aiff",
    ".aifc",
    ".caf",
    ".webm",
    ".mka",
    ".wma",
    ".bwf",
    ".rf64",
)
MAX_NAME_BYTES = 120  # of the file name, UTF-8, extension included
CONTENT_HASH_LEN = 12  # hex digits of the content's sha256 in an uploaded object's name
_FORBIDDEN = set('<>:"|?*\\/')


class UploadRejected(StemsetError):
    """An uploaded file that Stemset will not take; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.status = status


def safe_filename(name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """A file name safe as the last part of an object key: the base name only (any folder part,
    ``..`` included, dropped), no control characters (NUL included) or characters that trip
    shells and file systems, no leading dots, at most ``max_bytes`` UTF-8 bytes (the extension
    kept). Unicode letters stay (NFC): ``../../etc/passwd.wav`` -> ``passwd.wav``."""
    text = unicodedata.normalize("NFC", str(name)).replace("\\", "/").split("/")[-1]
    text = "".join(c for c in text if unicodedata.category(c)[0] != "C" and c not in _FORBIDDEN)
    text = " ".join(text.split()).lstrip(".").strip()
    stem, dot, ext = text.rpartition(".")
    if not dot or not stem or len(ext) > 8 or not ext.isalnum():
        stem, ext = text, ""
    ext = ext.lower()
    budget = max_bytes - (len(ext.encode()) + 1 if ext else 0)
    stem_bytes = stem.encode("utf-8")[:budget]
    stem = stem_bytes.decode("utf-8", "ignore").rstrip(" .") or "upload"
    return f"{stem}.{ext}" if ext else stem


def content_named(name: str, sha256: str) -> str:
    """The object name for an upload: the normalised name (:func:`safe_filename`) plus the first
    12 hex digits of its content's sha256 before the extension: ``coll  x.wav`` ->
    ``coll x-3f0c9a2e81b4.wav``. Two different files never share an object (or a partition),
    however their names normalise and whenever they arrive; the same file sent twice does."""
    digest = sha256.lower()[:CONTENT_HASH_LEN]
    if len(digest) != CONTENT_HASH_LEN or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    safe = safe_filename(name, MAX_NAME_BYTES - CONTENT_HASH_LEN - 1)
    stem, dot, ext = safe.rpartition(".")
    if not dot or not stem or "." + ext.lower() not in AUDIO_EXTENSIONS:
        stem, ext = safe, ""
    return f"{stem}-{digest}.{ext}" if ext else f"{stem}-{digest}"


def sniff_audio(head: bytes) -> str | None:
    """The audio container the first bytes announce, or None when they announce none."""
    if len(head) >= 12 and head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"ID3") or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mpeg"  # MP3 (or ADTS AAC) frame sync
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return "mp4"
    if len(head) >= 12 and head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    return None


def check_audio_file(path: Path, name: str) -> str:
    """Check that ``path`` (to be stored as ``name``) is audio Stemset can read: the extension,
    the header's magic bytes, then a probe of the stream. Returns the container sniffed;
    raises :class:`UploadRejected` (415 wrong type, 400 unreadable audio) naming ``name`` only."""
    ext = PurePosixPath(name).suffix.lower()
    if ext not in AUDIO_EXTENSIONS:
        raise UploadRejected(
            415, f"{name!r} does not have an audio file extension.", f"Upload one of: {', '.join(AUDIO_EXTENSIONS)}."
        )
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise UploadRejected(400, f"{name!r} is empty.", "Choose the recording itself, not an empty file.")
    kind = sniff_audio(head)
    if kind is None:
        raise UploadRejected(
            415,
            f"{name!r} is not audio: its content starts like no audio format "
            "(WAV, FLAC, Ogg, MP3, MP4/M4A, AIFF, WebM).",
            "Upload the recording itself, not a document, image or archive.",
        )
    from gpu_worker.audio.decode import probe_audio  # lazy: gpu_worker.audio pulls in scipy (pyloudnorm) and PyAV

    try:
        probe_audio(path)
    except AudioError as err:
        detail = err.message.replace(str(path), name)
        raise UploadRejected(
            400,
            f"{name!r} looks like {kind} but could not be read as audio: {detail}",
            "Export the recording again, or try another format.",
        ) from None
    return kind
