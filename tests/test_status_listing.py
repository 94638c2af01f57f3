"""The wide status path (more than NARROW_MAX partitions): the local folder's fast listing gives the
same facts as the store's own walk, and the fact cache kept in the Dagster instance between
`stemset status` runs re-reads exactly what changed."""

import json
import os

import pytest
from dagster import DagsterInstance

from gpu_worker.stores.local import TMP_PREFIX, LocalObjectStore
from stemset_assets.core import set_facts
from stemset_assets.core import state as st
from stemset_assets.defs.status import InstanceFactCache

FP, SHA = "fp-now", "sha-flac"
N = set_facts.NARROW_MAX + 5  # wide: one listing per profile and area
KEYS = [f"h4n/take_{i}" for i in range(N)]
TARGETS = {("h4n", "ht"): st.Target(FP, "m4a"), ("h4n", "other"): st.Target(FP, "m4a")}
WANTED = {"h4n": frozenset({"ht"})}


def _put_set(store, pk, strategy="ht", folder="", fp=FP):
    """A published set: stems (flat, or in a set folder ``folder``) and the manifest listing them."""
    stems = {}
    for name in ("vocals", "drums"):
        key = f"outputs/{pk}/{strategy}/{folder}{name}.m4a"
        store.put_bytes(key, b"x" * 10)
        stems[name] = {"key": key, "bytes": 10, "format": "m4a"}
    doc = {"fingerprint": fp, "input_sha256": SHA, "stems": stems, "backend": "local", "input_duration_s": 3.0}
    store.put_bytes(f"outputs/{pk}/{strategy}/manifest.json", json.dumps(doc).encode())


def _media(root, store=None):
    """The layout in a local folder at ``root``, or written through ``store`` (then without the
    local store's in-progress temp files)."""
    local = store is None
    store = LocalObjectStore(root, fsync=False) if local else store
    for i, pk in enumerate(KEYS):
        inp = f"inputs/{pk}.wav"
        store.put_bytes(inp, b"RIFF")
        rec = {"source_sha256": SHA, "input_etag": store.head(inp).etag, "original_key": inp, "duration_s": 3.0}
        if i != 1:  # take_1 was never recorded
            store.put_bytes(f"recordings/{pk}/recording.json", json.dumps(rec).encode())
        if i % 5 == 0:
            _put_set(store, pk)
        elif i % 5 == 1:
            _put_set(store, pk, folder="v-attempt1/")
            store.put_bytes(f"outputs/{pk}/ht/v-attempt0/vocals.m4a", b"old")  # unlisted: no fact
        elif i % 5 == 2:
            store.put_bytes(f"outputs/{pk}/ht/vocals.m4a", b"x")  # a stem without its manifest: broken
            failure = {"fingerprint": FP, "input_sha256": SHA, "error": "oom", "failed_at": 1.0}
            store.put_bytes(f"outputs/{pk}/other/failure.json", json.dumps(failure).encode())
        elif i % 5 == 3:
            _put_set(store, pk, strategy="other", fp="fp-old")
    # What is never a fact, at every depth the fast path walks or skips.
    store.put_bytes("outputs/h4n/take_0/ht/.staging/job1/vocals.m4a", b"half")
    store.put_bytes("outputs/h4n/take_0/ht/.staging/drums.m4a", b"zz")
    store.put_bytes("outputs/h4n/take_0/ht/notaset/drums.m4a", b"zz")
    store.put_bytes("outputs/h4n/take_0/ht/deeper/still/drums.m4a", b"zz")
    store.put_bytes("outputs/h4n/take_0/note.txt", b"a file at the strategy depth")
    store.put_bytes("outputs/h4n/loose.txt", b"a file at the slug depth")
    store.put_bytes("recordings/h4n/take_0/other.json", b"{}")
    store.put_bytes("recordings/h4n/stray.json", b"{}")
    store.put_bytes("recordings/h4n/take_1/recording.json/inner", b"{}")  # a folder named recording.json
    for folder in ("outputs/h4n/take_0/ht", "outputs/h4n/take_1/ht/v-attempt1", "recordings/h4n/take_2"):
        if local:
            (root / folder / f"{TMP_PREFIX}x").write_bytes(b"in progress")
    return store


def _plain(listed):
    return {
        "inputs": listed.inputs,
        "records": listed.records,
        "manifests": listed.manifests,
        "failures": listed.failures,
        "stems": {k: v for k, v in listed.stems.items() if v},
        "in_set_folders": {k: v for k, v in listed.in_set_folders.items() if v},
    }


def _store_walk(store, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(set_facts, "_list_local", lambda *a: False)
        return set_facts._list(store, KEYS)


def test_the_fast_local_listing_gives_the_store_walks_facts(tmp_path, monkeypatch):
    store = _media(tmp_path)
    fast = set_facts._Listed({}, {}, {}, {}, set_facts.defaultdict(dict), set_facts.defaultdict(dict))
    assert set_facts._list_local(store, "h4n", fast)  # the fast path is taken on a plain folder
    assert _plain(set_facts._list(store, KEYS)) == _plain(_store_walk(store, monkeypatch))
    # ... and the facts are the ones the layout means, not merely equal
    assert len(fast.records) == N - 1 and "h4n/take_1" not in fast.records
    assert set(fast.in_set_folders[("h4n/take_1", "ht")]) == {
        "outputs/h4n/take_1/ht/v-attempt1/vocals.m4a",
        "outputs/h4n/take_1/ht/v-attempt1/drums.m4a",
        "outputs/h4n/take_1/ht/v-attempt0/vocals.m4a",
    }
    assert ("h4n/take_2", "other") in fast.failures
    assert all(
        ".staging" not in k and "deeper" not in k and TMP_PREFIX not in k for s in fast.stems.values() for k in s
    )
    states = {
        (r.partition, r.strategy): r.state.state
        for r in set_facts.collect_states(store, KEYS, ["ht", "other"], TARGETS, WANTED)
    }
    assert states[("h4n/take_0", "ht")] == st.CURRENT
    assert states[("h4n/take_1", "ht")] == st.CURRENT  # its set folder's listed stems, not v-attempt0's
    assert states[("h4n/take_2", "ht")] == st.BROKEN
    assert states[("h4n/take_2", "other")] == st.UNUSED  # a failure of a strategy no profile asks for
    assert states[("h4n/take_3", "other")] == st.STALE
    assert states[("h4n/take_4", "ht")] == st.MISSING


def test_a_symlinked_folder_is_left_to_the_store_walk(tmp_path, monkeypatch):
    store = _media(tmp_path / "media")
    _put_set(LocalObjectStore(tmp_path / "elsewhere"), "h4n/linked")
    os.symlink(tmp_path / "elsewhere/outputs/h4n/linked", tmp_path / "media/outputs/h4n/take_4")
    fast = set_facts._Listed({}, {}, {}, {}, set_facts.defaultdict(dict), set_facts.defaultdict(dict))
    assert not set_facts._list_local(store, "h4n", fast)
    assert fast.records == {} and fast.manifests == {}  # nothing half-added
    listed = set_facts._list(store, KEYS)
    assert ("h4n/take_4", "ht") in listed.manifests  # the store's walk followed the link
    assert _plain(listed) == _plain(_store_walk(store, monkeypatch))


def _status(instance, store):
    """One `stemset status` run's facts: load the instance's cache, collect, save."""
    cache = InstanceFactCache(instance, store)
    rows = set_facts.collect_states(store, KEYS, ["ht"], TARGETS, WANTED, cache)
    cache.save()
    return {r.partition: r.state for r in rows}


def test_the_instance_cache_serves_a_warm_run_and_rereads_what_changed(tmp_path):
    store = _media(tmp_path / "media")
    instance = DagsterInstance.ephemeral()
    assert _status(instance, store)["h4n/take_5"].state == st.CURRENT
    key = "outputs/h4n/take_5/ht/manifest.json"
    assert key in InstanceFactCache(instance, store).entries

    # Same size, same mtime, same inode: the same ETag, so a warm run answers from the cache
    # without reading the object (the new fingerprint goes unseen, which proves no re-read).
    path = tmp_path / "media" / key
    before = path.stat()
    data = path.read_bytes()
    with open(path, "r+b") as f:
        f.write(data.replace(b'"fp-now"', b'"fp-new"'))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert _status(instance, store)["h4n/take_5"].state == st.CURRENT

    # A rewrite through the store (a new ETag) is read again.
    doc = json.loads(store.get_bytes(key))
    store.put_bytes(key, json.dumps({**doc, "fingerprint": "fp-old"}).encode())
    assert _status(instance, store)["h4n/take_5"].reasons == (st.STRATEGY_CHANGED,)

    # A deleted set and recording disappear from the state and from the saved cache.
    for info in list(store.list("outputs/h4n/take_5/")):
        store.delete(info.key)
    store.delete("recordings/h4n/take_5/recording.json")
    assert _status(instance, store)["h4n/take_5"].reasons == (st.NOT_RECORDED,)
    entries = InstanceFactCache(instance, store).entries
    assert key not in entries and "recordings/h4n/take_5/recording.json" not in entries
    assert "outputs/h4n/take_0/ht/manifest.json" in entries


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_warm_run_still_sees_a_stem_change(tmp_path, damage):
    """The cache holds documents only: stems are judged from the listing on every run."""
    store = _media(tmp_path / "media")
    instance = DagsterInstance.ephemeral()
    assert _status(instance, store)["h4n/take_5"].state == st.CURRENT
    stem = tmp_path / "media/outputs/h4n/take_5/ht/drums.m4a"
    if damage == "truncate":
        with open(stem, "r+b") as f:  # in place: the folder's own mtime does not change
            f.truncate(4)
    else:
        stem.unlink()
    want = st.STEM_SHORT if damage == "truncate" else st.STEM_MISSING
    assert _status(instance, store)["h4n/take_5"].reasons == (want,)


def test_a_damaged_instance_cache_is_read_past(tmp_path):
    store = _media(tmp_path / "media")
    instance = DagsterInstance.ephemeral()
    key = InstanceFactCache(instance, store).key
    manifest = "outputs/h4n/take_0/ht/manifest.json"
    junk = {manifest: [store.head(manifest).etag, "junk"], "recordings/h4n/take_0/recording.json": [1, 2, 3]}
    for raw in ("{not json", json.dumps([1, 2]), json.dumps(junk)):
        instance.daemon_cursor_storage.set_cursor_values({key: raw})
        states = _status(instance, store)
        assert states["h4n/take_0"].state == st.CURRENT and states["h4n/take_4"].state == st.MISSING
    entries = InstanceFactCache(instance, store).entries  # saved again, whole
    assert entries[manifest][1]["fingerprint"] == FP
