"""A published manifest outlives the code that wrote it: readers ignore fields a later version
added, while jobs and live results (one contract between one Dagster side and its workers) stay strict."""

from __future__ import annotations

import json

import pytest

from gpu_worker.errors import JobError
from gpu_worker.job import SeparationResult, StemFile
from gpu_worker.manifests import read_manifest
from gpu_worker.stores.local import LocalObjectStore
from stemset_assets.core import layout

PARTITION, STRATEGY = "h4n/t0", "htdemucs"


def manifest_doc(mkey: str) -> dict:
    stem = StemFile(
        name="vocals",
        key=mkey.rsplit("/", 1)[0] + "/vocals.flac",
        uri="file:///x",
        format="flac",
        bytes=10,
        duration_s=1.0,
        lufs=-20.0,
        peak_dbfs=-1.0,
        sample_peak=0.9,
        rms_dbfs=-23.0,
        nonfinite_samples=0,
    )
    result = SeparationResult(
        job_id="j",
        strategy_name=STRATEGY,
        fingerprint="f" * 16,
        input_key="inputs/h4n/t0.wav",
        input_sha256="0" * 64,
        input_duration_s=1.0,
        sample_rate=44100,
        stems={"vocals": stem},
        manifest_key=mkey,
        residual_db=-60.0,
        timings={"total": 1.0},
        device="cpu",
        gpu_type=None,
        peak_memory_mb=100.0,
        gpu_peak_memory_mb=None,
        billed_seconds=1.0,
        segments=1,
        batches=1,
        engine_version="test",
    )
    return result.to_dict()


def test_a_manifest_with_fields_from_a_later_version_is_still_read(tmp_path):
    store = LocalObjectStore(tmp_path)
    mkey = layout.manifest_key(PARTITION, STRATEGY)
    doc = manifest_doc(mkey)
    doc["a_field_from_the_future"] = {"x": 1}
    doc["stems"]["vocals"]["another_new_field"] = 3
    store.put_bytes(mkey, json.dumps(doc).encode())

    for got in (read_manifest(store, mkey), layout.read_manifest(store, PARTITION, STRATEGY)):
        assert got is not None and got.stems["vocals"].lufs == -20.0 and got.manifest_key == mkey
    # A result answered by a worker of this very version is still checked strictly.
    with pytest.raises(JobError, match="unknown field"):
        SeparationResult.from_dict(doc)


def test_an_unreadable_manifest_reads_as_no_set(tmp_path):
    store = LocalObjectStore(tmp_path)
    mkey = layout.manifest_key(PARTITION, STRATEGY)
    for body in (b"not json", b"[]", json.dumps({"stems": "nope"}).encode(), json.dumps({"version": 999}).encode()):
        store.put_bytes(mkey, body)
        assert read_manifest(store, mkey) is None
        assert layout.read_manifest(store, PARTITION, STRATEGY) is None


def test_a_store_that_is_down_raises_instead_of_reading_as_no_set(tmp_path):
    from gpu_worker.errors import StorageError

    class Down(LocalObjectStore):
        def head(self, key):
            raise StorageError("The bucket is unreachable.")

    with pytest.raises(StorageError):
        layout.read_manifest(Down(tmp_path), PARTITION, STRATEGY)
    with pytest.raises(StorageError):
        read_manifest(Down(tmp_path), layout.manifest_key(PARTITION, STRATEGY))
