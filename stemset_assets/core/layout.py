"""Where everything lives in the media store, and the small JSON record kept beside each recording.

One layout for the local folder and the bucket (``<partition key>`` is ``<profile>/<slug>``)::

    inputs/<profile>/<file>                          what the musician dropped in
    recordings/<partition key>/source.flac           canonical 44.1 kHz stereo FLAC (24-bit)
    recordings/<partition key>/peaks.json            waveform peaks (min/max of the mono mix)
    recordings/<partition key>/waveform.png          the waveform, rendered
    recordings/<partition key>/recording.json        a :class:`RecordingRecord`, written last
    outputs/<partition key>/<strategy>/v-<attempt>/<stem>.<ext>  stems, one folder per publish
    outputs/<partition key>/<strategy>/manifest.json the worker's SeparationResult, written last: it
                                                     lists the stems (the one commit point)
    outputs/<partition key>/<strategy>/.staging/...  stems being uploaded (never read or served)
    outputs/<partition key>/<strategy>/failure.json  the latest failed attempt (removed once a set is published)
    catalog/catalog.csv, catalog/catalog.parquet     the catalog asset

``recording.json`` is what the stem assets and the catalog read to learn a recording's
original object key, its input sha256 and the sha256 of its canonical FLAC (the worker's
manifest records the latter as ``input_sha256``). Written last, so it exists only when the
canonical FLAC, peaks and waveform are in place. :func:`read_manifest` and :func:`download_stems`
read a stem set back.

This module imports neither Dagster nor torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from gpu_worker import manifests
from gpu_worker.errors import StemsetError, StorageError
from gpu_worker.job import MANIFEST_NAME, SeparationResult
from gpu_worker.stores.base import ObjectStore
from gpu_worker.stores.publish import hidden_key

INPUTS = "inputs"
RECORDINGS = "recordings"
OUTPUTS = "outputs"
CATALOG = "catalog"

SOURCE_NAME = "source.flac"
PEAKS_NAME = "peaks.json"
WAVEFORM_NAME = "waveform.png"
RECORD_NAME = "recording.json"
FAILURE_NAME = "failure.json"

CATALOG_CSV = f"{CATALOG}/catalog.csv"
CATALOG_PARQUET = f"{CATALOG}/catalog.parquet"
CATALOG_COST_PLOT = f"{CATALOG}/cost_over_time.png"

RECORD_VERSION = 1


def is_hidden_key(key: str) -> bool:
    """Staging objects (``.../.staging/...``): never part of a published set, never served."""
    return hidden_key(key)


def input_prefix(profile: str) -> str:
    return f"{INPUTS}/{profile}/"


def source_key(partition_key: str) -> str:
    return f"{RECORDINGS}/{partition_key}/{SOURCE_NAME}"


def peaks_key(partition_key: str) -> str:
    return f"{RECORDINGS}/{partition_key}/{PEAKS_NAME}"


def waveform_key(partition_key: str) -> str:
    return f"{RECORDINGS}/{partition_key}/{WAVEFORM_NAME}"


def record_key(partition_key: str) -> str:
    return f"{RECORDINGS}/{partition_key}/{RECORD_NAME}"


def stems_prefix(partition_key: str, strategy: str) -> str:
    """``outputs/<profile>/<slug>/<strategy>`` (no trailing slash: the job's output_prefix)."""
    return f"{OUTPUTS}/{partition_key}/{strategy}"


def manifest_key(partition_key: str, strategy: str) -> str:
    return f"{stems_prefix(partition_key, strategy)}/{MANIFEST_NAME}"


def failure_key(partition_key: str, strategy: str) -> str:
    """Where the latest failed attempt at the set is described (removed when a set is published)."""
    return f"{stems_prefix(partition_key, strategy)}/{FAILURE_NAME}"


def parse_manifest_key(key: str) -> tuple[str, str] | None:
    """``outputs/<profile>/<slug>/<strategy>/manifest.json`` -> (partition key, strategy)."""
    parts = key.split("/")
    if len(parts) != 5 or parts[0] != OUTPUTS or parts[-1] != MANIFEST_NAME:
        return None
    return f"{parts[1]}/{parts[2]}", parts[3]


def parse_record_key(key: str) -> str | None:
    """``recordings/<profile>/<slug>/recording.json`` -> partition key."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != RECORDINGS or parts[-1] != RECORD_NAME:
        return None
    return f"{parts[1]}/{parts[2]}"


@dataclass(frozen=True)
class RecordingRecord:
    """What the ``recording`` asset learnt about one input, kept as ``recording.json``."""

    partition_key: str
    original_key: str  # inputs/<profile>/<file> as uploaded
    input_etag: str  # the input object's ETag when it was read (changes on re-upload)
    input_bytes: int
    sha256: str  # of the input object's bytes: the recording's data version
    source_key: str  # the canonical FLAC
    source_sha256: str  # of the canonical FLAC: what the worker's manifest calls input_sha256
    source_bytes: int
    container: str
    codec: str
    sample_rate: int  # of the input
    channels: int  # of the input
    bit_depth: int | None
    duration_s: float  # of the input (its frames / its rate)
    frames: int  # of the canonical FLAC, at 44.1 kHz
    lufs: float | None
    peak_dbfs: float | None
    peaks_key: str
    waveform_key: str
    code_version: str
    made_at: float  # epoch seconds
    version: int = RECORD_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecordingRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def read_record(store: ObjectStore, partition_key: str) -> RecordingRecord | None:
    """The partition's ``recording.json``, or None when the recording was never materialised
    (or the record is unreadable, which is treated the same way)."""
    key = record_key(partition_key)
    try:
        if store.head(key) is None:
            return None
        data = json.loads(store.get_bytes(key))
        return RecordingRecord.from_dict(data)
    except StorageError:
        raise
    except (ValueError, TypeError):
        return None


def write_record(store: ObjectStore, record: RecordingRecord) -> None:
    store.put_bytes(record_key(record.partition_key), record.to_json().encode(), content_type="application/json")


def read_manifest(store: ObjectStore, partition: str, strategy: str) -> SeparationResult | None:
    """The stem set's manifest, or None when there is none (yet) or it is unreadable."""
    # A store that is down raises (the API answers 503); a manifest gone or unreadable after the
    # listing reads as "no set yet".
    return manifests.read_manifest(store, manifest_key(partition, strategy), unreadable=(StemsetError,))


def download_stems(store: ObjectStore, manifest: SeparationResult, folder: Path) -> list[Path]:
    """Each stem of ``manifest`` into ``folder/<stem>.<ext>``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for stem in manifest.stems.values():
        target = folder / os.path.basename(stem.key)
        store.download(stem.key, target)
        out.append(target)
    return out
