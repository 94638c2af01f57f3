"""The ``recording`` asset: one partition per input file, turned into a canonical FLAC.

For partition ``<profile>/<slug>`` it reads ``inputs/<profile>/<file>`` (see
:func:`stemset_assets.core.partition_keys.resolve_input`), hashes it (sha256: the data version),
probes it, decodes it to 44.1 kHz stereo and writes, under ``recordings/<profile>/<slug>/``:
``source.flac`` (24-bit), ``peaks.json`` (waveform peaks), ``waveform.png`` and, last,
``recording.json`` (:class:`~stemset_assets.core.layout.RecordingRecord`). Everything is computed
before the first write, so an input that is not audio fails with the decoder's message and
leaves nothing behind.

Re-materialising an unchanged input (same sha256, same code version, objects intact) keeps
the stored FLAC as it is (metadata ``reused: true``), so the stem sets made from it stay
current.
"""

# No `from __future__ import annotations`: Dagster reads the context and resource annotations at runtime.

import json
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path, PurePosixPath

from dagster import (
    AssetExecutionContext,
    BackfillPolicy,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from gpu_worker.errors import AudioError, EncodeError, StorageError
from gpu_worker.hashing import file_sha256
from gpu_worker.stores.base import ObjectStore

from ...core.layout import (
    RecordingRecord,
    peaks_key,
    read_record,
    source_key,
    waveform_key,
    write_record,
)
from ...core.partition_keys import resolve_input, split_partition_key
from ...core.plots import inline_markdown_image, waveform_png
from ..asset_keys import RECORDING_KEY
from ..partitions import RECORDINGS_PARTITIONS, recordings
from ..resources.media_store import MediaStoreResource

RECORDING_CODE_VERSION = "1"
"""Bump when the canonical FLAC, peaks or waveform would come out differently."""
PEAKS = 800


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(float(value), digits)


@asset(
    name=RECORDING_KEY.path[-1],
    partitions_def=recordings,
    code_version=RECORDING_CODE_VERSION,
    group_name="recordings",
    kinds={"audio", "flac"},
    backfill_policy=BackfillPolicy.multi_run(1),  # decoding is cheap: one partition per run keeps it simple
    description=(
        "An input recording (inputs/<profile>/<file>) as canonical 44.1 kHz stereo FLAC at "
        "recordings/<profile>/<slug>/source.flac, with its format, loudness, peak and waveform. "
        "Data version: the input's sha256."
    ),
)
def recording(context: AssetExecutionContext, media_store: MediaStoreResource) -> MaterializeResult:
    pk = context.partition_key
    store = media_store.get_store()
    try:
        split_partition_key(pk)
        original = resolve_input(store, pk, context.instance.get_dynamic_partitions(RECORDINGS_PARTITIONS))
        info = store.head(original)
        if info is None:
            raise StorageError(f"The input {store.uri(original)} disappeared before it could be read.")
    except (StorageError, ValueError) as err:
        raise Failure(description=str(err), allow_retries=False) from err

    with tempfile.TemporaryDirectory(prefix="stemset-recording-") as tmp:
        local = Path(tmp) / (PurePosixPath(original).name or "input")
        store.download(original, local)
        sha = file_sha256(local)
        previous = read_record(store, pk)
        if _reusable(store, previous, original, sha):
            assert previous is not None
            if previous.input_etag != info.etag:  # re-uploaded with the same content
                previous = replace(previous, input_etag=info.etag)
                write_record(store, previous)
            context.log.info(f"{original}: unchanged (sha256 {sha[:12]}); keeping {store.uri(previous.source_key)}")
            return _result(store, media_store, previous, store.get_bytes(previous.waveform_key), reused=True)
        record, files = _process(context, store, pk, original, info.etag, info.size, sha, local, Path(tmp))
        # All computed: publish the objects, the record last.
        store.upload(files["source"], record.source_key, content_type="audio/flac")
        store.upload(files["peaks"], record.peaks_key, content_type="application/json")
        store.upload(files["waveform"], record.waveform_key, content_type="image/png")
        write_record(store, record)
        png = files["waveform"].read_bytes()
    return _result(store, media_store, record, png, reused=False)


def _reusable(store: ObjectStore, previous: RecordingRecord | None, original: str, sha: str) -> bool:
    if previous is None or previous.sha256 != sha or previous.code_version != RECORDING_CODE_VERSION:
        return False
    if previous.original_key != original:
        return False
    source = store.head(previous.source_key)
    return (
        source is not None
        and source.size == previous.source_bytes
        and store.head(previous.waveform_key) is not None
        and store.head(previous.peaks_key) is not None
    )


def _process(
    context, store: ObjectStore, pk: str, original: str, etag: str, size: int, sha: str, local: Path, tmp: Path
) -> tuple[RecordingRecord, dict[str, Path]]:
    # lazy: scipy (pyloudnorm) and PyAV load only when a recording is made
    from gpu_worker.audio.analyse import integrated_loudness, peak_dbfs, waveform_peaks
    from gpu_worker.audio.decode import decode_audio
    from gpu_worker.audio.encode import encode_audio
    from gpu_worker.audio.info import SAMPLE_RATE, AudioWarning

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AudioWarning)
            wav, info = decode_audio(local)
        for w in caught:
            if issubclass(w.category, AudioWarning):
                context.log.warning(str(w.message).replace(str(local), store.uri(original)))
        source = tmp / "source.flac"
        encode_audio(wav, source, "flac")
    except (AudioError, EncodeError) as err:
        message = str(err).replace(str(local), store.uri(original))
        raise Failure(
            description=message, metadata={"original_key": original, "sha256": sha}, allow_retries=False
        ) from None

    lufs = integrated_loudness(wav)
    peak = peak_dbfs(wav)
    peaks = waveform_peaks(wav, PEAKS)
    peaks_file = tmp / "peaks.json"
    peaks_file.write_text(
        json.dumps(
            {
                "bins": PEAKS,
                "duration_s": wav.shape[1] / SAMPLE_RATE,
                "sample_rate": SAMPLE_RATE,
                "min": [round(float(v), 4) for v in peaks[:, 0]],
                "max": [round(float(v), 4) for v in peaks[:, 1]],
            },
            separators=(",", ":"),
        )
    )
    waveform = tmp / "waveform.png"
    waveform.write_bytes(waveform_png(peaks, wav.shape[1] / SAMPLE_RATE, title=PurePosixPath(original).name))
    record = RecordingRecord(
        partition_key=pk,
        original_key=original,
        input_etag=etag,
        input_bytes=size,
        sha256=sha,
        source_key=source_key(pk),
        source_sha256=file_sha256(source),
        source_bytes=source.stat().st_size,
        container=info.container,
        codec=info.codec,
        sample_rate=info.sample_rate,
        channels=info.channels,
        bit_depth=info.bit_depth,
        duration_s=round(info.duration_s, 6),
        frames=int(wav.shape[1]),
        lufs=_round(lufs),
        peak_dbfs=_round(peak),
        peaks_key=peaks_key(pk),
        waveform_key=waveform_key(pk),
        code_version=RECORDING_CODE_VERSION,
        made_at=time.time(),
    )
    return record, {"source": source, "peaks": peaks_file, "waveform": waveform}


def _result(
    store: ObjectStore, media_store: MediaStoreResource, record: RecordingRecord, png: bytes, reused: bool
) -> MaterializeResult:
    metadata = {
        "original_key": record.original_key,
        "input_uri": store.uri(record.original_key),
        "sha256": record.sha256,
        "format": record.container,
        "codec": record.codec,
        "sample_rate": record.sample_rate,
        "channels": record.channels,
        "bit_depth": record.bit_depth if record.bit_depth is not None else MetadataValue.null(),
        "duration_s": round(record.duration_s, 3),
        "input_bytes": record.input_bytes,
        "input_etag": record.input_etag,  # staleness compares it with the listing (input_changed)
        "lufs": record.lufs if record.lufs is not None else MetadataValue.null(),
        "peak_dbfs": record.peak_dbfs if record.peak_dbfs is not None else MetadataValue.null(),
        "uri": store.uri(record.source_key),
        "source_url": MetadataValue.url(media_store.playback_url(record.source_key)),
        "source_sha256": record.source_sha256,
        "peaks_uri": store.uri(record.peaks_key),
        "waveform": MetadataValue.url(media_store.playback_url(record.waveform_key)),
        "waveform_preview": MetadataValue.md(inline_markdown_image(png, "waveform")),
        "reused": reused,
    }
    return MaterializeResult(metadata=metadata, data_version=DataVersion(record.sha256))
