"""Issue 14, deliver 3: publishing leaves nothing half-visible. A failure at any step of a publish
leaves the manifest listing the complete old set (never a missing manifest beside visible stems);
leftovers are swept; staging is never a fact. Real stores (a folder and SeaweedFS); failures are
injected by making one real store call raise (the killed-process cases are tests/faults/)."""

from __future__ import annotations

import json

import pytest

from gpu_worker.errors import StorageError
from gpu_worker.stores.base import ObjectStore
from gpu_worker.stores.publish import new_attempt, publish_set, set_key, sweep
from stemset_assets.core.set_facts import collect_states
from stemset_assets.core.state import BROKEN, CURRENT, Target

PK, STRATEGY = "h4n/take", "ht"
PREFIX = f"outputs/{PK}/{STRATEGY}"
MANIFEST = f"{PREFIX}/manifest.json"
NAMES = ("bass", "drums", "other", "vocals")
TARGET = Target("fp", "flac")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    return request.getfixturevalue("local_store" if request.param == "local" else "s3_store")


def stage_and_publish(store: ObjectStore, job: str, content: bytes, fail_at: str | None = None, monkeypatch=None):
    """Stage a 4-stem set in a fresh set folder and publish it (``fail_at``: 'copy2' or 'manifest')."""
    attempt = new_attempt(job)
    final = {n: set_key(PREFIX, attempt, f"{n}.flac") for n in NAMES}
    staged = {n: f"{PREFIX}/.staging/{attempt}/{n}.flac" for n in NAMES}
    for n in NAMES:
        store.put_bytes(staged[n], content + n.encode())
    doc = {"fingerprint": "fp", "input_sha256": "src", "job_id": job}
    doc["stems"] = {n: {"key": final[n], "bytes": len(content) + len(n), "format": "flac"} for n in NAMES}
    if fail_at and monkeypatch:
        calls = []
        real_copy, real_put = store._publish_object, store.put_bytes

        def copy(src, dst):
            calls.append(dst)
            if fail_at == "copy2" and len(calls) == 2:
                raise StorageError("injected: the connection dropped")
            real_copy(src, dst)

        def put(key, data, content_type=None):
            if fail_at == "manifest" and key == MANIFEST:
                raise StorageError("injected: the connection dropped")
            real_put(key, data, content_type)

        monkeypatch.setattr(store, "_publish_object", copy)
        monkeypatch.setattr(store, "put_bytes", put)
    try:
        publish_set(store, staged, final, MANIFEST, json.dumps(doc).encode())
    finally:
        if monkeypatch:
            monkeypatch.undo()
    return final


def state(store: ObjectStore):
    store.put_bytes(
        f"recordings/{PK}/recording.json",
        json.dumps({"source_sha256": "src", "input_etag": "e", "original_key": "inputs/h4n/take.wav"}).encode(),
    ) if store.head(f"recordings/{PK}/recording.json") is None else None
    (row,) = collect_states(store, [PK], [STRATEGY], {("h4n", STRATEGY): TARGET}, {"h4n": frozenset({STRATEGY})})
    return row.state


def visible(store: ObjectStore) -> dict[str, bytes]:
    """What a reader sees: the manifest's stems, read through the manifest."""
    doc = json.loads(store.get_bytes(MANIFEST))
    return {n: store.get_bytes(s["key"]) for n, s in doc["stems"].items()}


@pytest.mark.parametrize("fail_at", ["copy2", "manifest"])
def test_a_failed_publish_leaves_the_complete_old_set(store: ObjectStore, monkeypatch, fail_at):
    stage_and_publish(store, "job-1", b"old-")
    assert state(store).state == CURRENT
    with pytest.raises(StorageError) as err:
        stage_and_publish(store, "job-2", b"new-", fail_at, monkeypatch)
    text = str(err.value)  # says what is published now, not "nothing was half-written"
    assert "previously published set is still the one its manifest lists" in text and "injected" in text
    assert store.head(MANIFEST) is not None  # today's code deleted it first: stems without a manifest
    assert visible(store) == {n: b"old-" + n.encode() for n in NAMES}
    assert state(store).state == CURRENT  # not broken, not missing

    # The retry of the same job sweeps its earlier attempt and publishes the complete new set.
    final = stage_and_publish(store, "job-2", b"new-")
    assert visible(store) == {n: b"new-" + n.encode() for n in NAMES}
    assert sweep(store, PREFIX, grace_s=0) == []  # nothing left to sweep: the old set went at publish
    assert sorted(i.key for i in store.list(PREFIX + "/")) == sorted([*final.values(), MANIFEST])
    assert state(store).state == CURRENT


def test_sweep_removes_other_jobs_leftovers_only_when_old(store: ObjectStore, monkeypatch):
    stage_and_publish(store, "job-1", b"old-")
    with pytest.raises(StorageError):
        stage_and_publish(store, "job-2", b"new-", "manifest", monkeypatch)
    leftovers = sorted(i.key for i in store.list(PREFIX + "/") if "job-2" in i.key)
    assert any("/v-job-2." in k for k in leftovers)  # (and, on S3, its staging copies)
    assert state(store).state == CURRENT  # an unlisted set folder is not a fact
    assert sweep(store, PREFIX) == []  # another job's fresh leftovers: it may still be publishing
    assert sweep(store, PREFIX, job_id="job-3") == []
    assert sorted(sweep(store, "outputs/", grace_s=0)) == leftovers  # the whole tree, once old enough
    assert visible(store) == {n: b"old-" + n.encode() for n in NAMES}


def test_staging_is_never_a_fact_and_a_listed_set_is_never_swept(store: ObjectStore):
    final = stage_and_publish(store, "job-1", b"old-")
    store.put_bytes(f"{PREFIX}/.staging/job-9.00000000/vocals.flac", b"half")
    assert state(store).state == CURRENT
    assert sweep(store, PREFIX, grace_s=0) == [f"{PREFIX}/.staging/job-9.00000000/vocals.flac"]
    assert all(store.head(k) is not None for k in final.values())
    store.delete(final["vocals"])  # a listed stem gone: broken, as before
    assert state(store).state == BROKEN
