"""Taking a file in from outside the bucket (the CLI's `stemset process FILE`, the web upload):
a safe object name, a content check, the upload to ``inputs/<profile>/`` and the partition key;
and reading back the stems a run made.

Shared by :mod:`stemset_assets.cli_process` and :mod:`stemset_assets.api`. Imports no torch;
Dagster only for the partition helpers.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from gpu_worker.errors import AudioError, StemsetError
from gpu_worker.job import SeparationResult
from gpu_worker.stores.base import ObjectStore

from .layout import input_prefix, manifest_key
from .partitions import RECORDINGS_PARTITIONS, assign_partition_keys, list_inputs

if TYPE_CHECKING:
    from dagster import DagsterInstance

    from .config import StemsetConfig

# What soundfile or PyAV decodes; the sensor and uploads both go by it.
AUDIO_EXTENSIONS = (".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".aac",
                    ".aif", ".aiff", ".aifc", ".caf", ".webm", ".mka", ".wma", ".bwf", ".rf64")
MAX_NAME_BYTES = 120  # of the file name, UTF-8, extension included
_FORBIDDEN = set('<>:"|?*\\/')


def open_store(config: "StemsetConfig") -> ObjectStore:
    """The configured media store for use outside a Dagster run (the CLI, the web API): the
    same resource the assets use, with credentials as values rather than ``EnvVar`` (which only
    a run can resolve)."""
    from .resources.media_store import MediaStoreResource

    if config.storage.backend != "s3" or config.storage.s3 is None:
        return MediaStoreResource.from_config(config).get_store()
    s3 = config.storage.s3
    return MediaStoreResource(
        backend="s3", root=str(config.storage.local.root), endpoint_url=s3.endpoint_url, bucket=s3.bucket,
        region=s3.region, access_key_id=s3.access_key_id, secret_access_key=s3.secret_access_key,
        public_url=s3.public_url,
    ).get_store()


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
        raise UploadRejected(415, f"{name!r} does not have an audio file extension.",
                             f"Upload one of: {', '.join(AUDIO_EXTENSIONS)}.")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise UploadRejected(400, f"{name!r} is empty.", "Choose the recording itself, not an empty file.")
    kind = sniff_audio(head)
    if kind is None:
        raise UploadRejected(415, f"{name!r} is not audio: its content starts like no audio format "
                                  "(WAV, FLAC, Ogg, MP3, MP4/M4A, AIFF, WebM).",
                             "Upload the recording itself, not a document, image or archive.")
    from gpu_worker.audio.decode import probe_audio

    try:
        probe_audio(path)
    except AudioError as err:
        detail = err.message.replace(str(path), name)
        raise UploadRejected(400, f"{name!r} looks like {kind} but could not be read as audio: {detail}",
                             "Export the recording again, or try another format.") from None
    return kind


@dataclass(frozen=True)
class Ingested:
    object_key: str  # inputs/<profile>/<name>
    partition: str  # <profile>/<slug>


def ingest_file(store: ObjectStore, instance: "DagsterInstance", profile: str, path: Path,
                name: str | None = None) -> Ingested:
    """Upload ``path`` to ``inputs/<profile>/<safe name>`` and register its partition key (the
    same key the new-input sensor would give it; a file of the same name is replaced, which
    makes its recording and stems stale)."""
    from .runs import register_partitions

    object_key = input_prefix(profile) + safe_filename(name or path.name)
    store.upload(path, object_key)
    existing = instance.get_dynamic_partitions(RECORDINGS_PARTITIONS)
    key = assign_partition_keys(profile, list_inputs(store, profile), existing)[object_key]
    register_partitions(instance, [key])
    return Ingested(object_key, key)


def read_manifest(store: ObjectStore, partition: str, strategy: str) -> SeparationResult | None:
    """The stem set's manifest, or None when there is none (yet)."""
    key = manifest_key(partition, strategy)
    if store.head(key) is None:
        return None
    try:
        return SeparationResult.from_json(store.get_bytes(key))
    except StemsetError:
        return None


def download_stems(store: ObjectStore, manifest: SeparationResult, folder: Path) -> list[Path]:
    """Each stem of ``manifest`` into ``folder/<stem>.<ext>``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for stem in manifest.stems.values():
        target = folder / os.path.basename(stem.key)
        store.download(stem.key, target)
        out.append(target)
    return out
