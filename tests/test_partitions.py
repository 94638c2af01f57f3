"""Partition keys: UI-safe slugs, stable, collision-free, and mapped back to their input object."""

from __future__ import annotations

import re
import time

import pytest
from dagster import DagsterInstance

from gpu_worker.errors import StorageError
from gpu_worker.stores.local import LocalObjectStore
from stemset_assets.core.layout import RecordingRecord, write_record
from stemset_assets.core.partition_keys import (
    assign_partition_keys,
    base_slug,
    hashed_key,
    list_inputs,
    partition_key,
    resolve_input,
    short_hash,
    slugify,
    split_partition_key,
)
from stemset_assets.defs.partitions import RECORDINGS_PARTITIONS

SAFE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
HOSTILE = [
    "Böse Take, #1 [final]|mix.flac",
    "  spaces\tand\nnewlines .wav",
    "Ünïcödé — Café Ω ß 東京.m4a",
    "...hidden...dots....wav",
    "a,b|c[d]e/f.wav",
    "コンサート.wav",
    "x" * 300 + ".wav",
    "-_.weird-edges_.-.wav",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_slugs_are_ui_safe(name):
    slug = base_slug("h4n", f"inputs/h4n/{name}")
    assert SAFE.match(slug), slug
    assert not set(slug) & set(",|[]/ \t\n"), slug
    assert "..." not in slug and ".." not in slug
    assert len(slug) <= 80
    assert slug == base_slug("h4n", f"inputs/h4n/{name}")  # stable
    key = partition_key("h4n", f"inputs/h4n/{name}")
    assert key == f"h4n/{slug}"


def test_slug_examples():
    assert slugify("Böse Take, #1 [final]|mix") == "bose_take_1_final_mix"
    assert slugify("Café") == "cafe"
    assert slugify("東京") == "recording"  # nothing ASCII left
    assert base_slug("h4n", "inputs/h4n/take3.wav") == "take3"
    assert base_slug("h4n", "inputs/h4n/2024/Take 1.final.wav") == "2024_take_1.final"
    assert base_slug("h4n", "inputs/h4n/no_extension") == "no_extension"


def test_hostile_keys_are_valid_dagster_partitions():
    keys = list(assign_partition_keys("h4n", [f"inputs/h4n/{n}" for n in HOSTILE]).values())
    assert len(set(keys)) == len(keys)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(RECORDINGS_PARTITIONS, keys)
    assert sorted(instance.get_dynamic_partitions(RECORDINGS_PARTITIONS)) == sorted(keys)


def test_collision_gets_a_hash_suffix_and_stays_stable():
    first, second = "inputs/h4n/take_1.wav", "inputs/h4n/Take 1.wav"
    k1 = partition_key("h4n", first, {})
    assert k1 == "h4n/take_1"
    k2 = partition_key("h4n", second, {k1: first})
    assert k2 == f"h4n/take_1-{short_hash(second)}" == hashed_key("h4n", second)
    owners = {k1: first, k2: second}
    # Asking again gives the same answers, whoever asks first.
    assert partition_key("h4n", first, owners) == k1
    assert partition_key("h4n", second, owners) == k2
    # With plain keys: a hashed key already there is recognised; a taken bare key is someone else's.
    assert partition_key("h4n", second, [k1, k2]) == k2
    assert partition_key("h4n", "inputs/h4n/take 1.wav", [k1, k2]) == hashed_key("h4n", "inputs/h4n/take 1.wav")
    # Same file name in another profile: no clash.
    assert partition_key("memos", "inputs/memos/take_1.wav", owners) == "memos/take_1"


def test_assign_gives_the_bare_slug_to_the_oldest(local_store: LocalObjectStore):
    local_store.put_bytes("inputs/h4n/take_1.wav", b"a")
    time.sleep(0.01)
    local_store.put_bytes("inputs/h4n/Take 1.wav", b"b")
    local_store.put_bytes("inputs/h4n/.DS_Store", b"junk")  # hidden: never a partition
    infos = list_inputs(local_store, "h4n")
    assert [i.key for i in infos] == ["inputs/h4n/take_1.wav", "inputs/h4n/Take 1.wav"]
    keys = assign_partition_keys("h4n", infos)
    assert keys == {
        "inputs/h4n/take_1.wav": "h4n/take_1",
        "inputs/h4n/Take 1.wav": hashed_key("h4n", "inputs/h4n/Take 1.wav"),
    }
    # A later listing with the keys in use changes nothing.
    assert assign_partition_keys("h4n", infos, set(keys.values())) == keys
    assert assign_partition_keys("h4n", infos, {v: k for k, v in keys.items()}) == keys


def test_resolve_input_maps_keys_back(local_store: LocalObjectStore):
    local_store.put_bytes("inputs/h4n/take_1.wav", b"a")
    time.sleep(0.01)
    local_store.put_bytes("inputs/h4n/Take 1.wav", b"b")
    local_store.put_bytes("inputs/h4n/Böse Take, #1 [final]|mix.flac", b"c")
    keys = assign_partition_keys("h4n", list_inputs(local_store, "h4n"))
    for obj, pk in keys.items():
        assert resolve_input(local_store, pk, keys.values()) == obj
    assert resolve_input(local_store, "h4n/bose_take_1_final_mix") == "inputs/h4n/Böse Take, #1 [final]|mix.flac"
    with pytest.raises(StorageError, match="No input object under inputs/h4n/"):
        resolve_input(local_store, "h4n/nothing_here")


def test_resolve_input_prefers_the_recording_record(local_store: LocalObjectStore):
    local_store.put_bytes("inputs/h4n/take_1.wav", b"a")
    local_store.put_bytes("inputs/h4n/Take 1.wav", b"b")
    record = RecordingRecord(
        partition_key="h4n/take_1",
        original_key="inputs/h4n/Take 1.wav",
        input_etag="x",
        input_bytes=1,
        sha256="0" * 64,
        source_key="recordings/h4n/take_1/source.flac",
        source_sha256="1" * 64,
        source_bytes=1,
        container="wav",
        codec="pcm_s16le",
        sample_rate=44100,
        channels=2,
        bit_depth=16,
        duration_s=1.0,
        frames=44100,
        lufs=None,
        peak_dbfs=None,
        peaks_key="p",
        waveform_key="w",
        code_version="1",
        made_at=0.0,
    )
    write_record(local_store, record)
    assert resolve_input(local_store, "h4n/take_1") == "inputs/h4n/Take 1.wav"
    local_store.delete("inputs/h4n/Take 1.wav")  # the recorded object is gone: fall back to the listing
    assert resolve_input(local_store, "h4n/take_1") == "inputs/h4n/take_1.wav"


def test_split_partition_key():
    assert split_partition_key("h4n/take_1") == ("h4n", "take_1")
    for bad in ("take_1", "h4n/", "/x", "a/b/c"):
        with pytest.raises(ValueError):
            split_partition_key(bad)
