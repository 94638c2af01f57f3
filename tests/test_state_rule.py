"""The one state rule, on its own facts and on facts read from a real local store."""

import json

import pytest

from gpu_worker.stores.local import LocalObjectStore
from stemset_assets.core import state as st
from stemset_assets.core.layout import FAILURE_NAME
from stemset_assets.core.set_facts import MemoryFactCache, collect_states

FP, SHA, ETAG = "fp-now", "sha-flac", "etag-in"
TARGET = st.Target(FP, "m4a")
REC = st.RecordingFacts(source_sha256=SHA, input_etag=ETAG, duration_s=3.0, original_key="inputs/h4n/a.wav")
STEMS = {"vocals": ("outputs/h4n/a/ht/vocals.m4a", 10), "drums": ("outputs/h4n/a/ht/drums.m4a", 12)}
WHOLE = {key: size for key, size in STEMS.values()}


def manifest(**kw):
    base = {"fingerprint": FP, "input_sha256": SHA, "output_format": "m4a", "stems": STEMS}
    return st.ManifestFacts(**{**base, **kw})


def facts(**kw):
    base = {"wanted": True, "recording": REC, "input_etag": ETAG, "manifest": manifest(), "stem_objects": WHOLE}
    return st.SetFacts(**{**base, **kw})


@pytest.mark.parametrize(
    ("case", "expected", "reason"),
    [
        (facts(), st.CURRENT, st.UP_TO_DATE),
        (facts(wanted=False, manifest=None, stem_objects={}), st.UNUSED, st.NOT_WANTED),
        # A set made on request though no profile asks for it is judged like any other.
        (facts(wanted=False), st.CURRENT, st.UP_TO_DATE),
        (facts(wanted=False, manifest=manifest(fingerprint="fp-old")), st.STALE, st.STRATEGY_CHANGED),
        (facts(manifest=None, stem_objects={}), st.MISSING, st.NOT_SEPARATED),
        (facts(manifest=None, stem_objects={}, recording=None, input_etag=None), st.MISSING, st.NOT_RECORDED),
        (facts(manifest=None), st.BROKEN, st.MANIFEST_MISSING),
        (facts(stem_objects={STEMS["vocals"][0]: 10}), st.BROKEN, st.STEM_MISSING),
        (facts(stem_objects={**WHOLE, STEMS["drums"][0]: 3}), st.BROKEN, st.STEM_SHORT),
        (facts(manifest=manifest(fingerprint="fp-old")), st.STALE, st.STRATEGY_CHANGED),
        (facts(manifest=manifest(input_sha256="sha-old")), st.STALE, st.RECORDING_CHANGED),
        (facts(manifest=manifest(output_format="flac")), st.STALE, st.FORMAT_CHANGED),
        (facts(input_etag="etag-new"), st.STALE, st.INPUT_CHANGED),
        (
            facts(manifest=None, stem_objects={}, failure=st.FailureFacts(FP, SHA, "boom", 1.0)),
            st.FAILED,
            st.SEPARATION_FAILED,
        ),
        # A failure for an older fingerprint or recording does not describe what is asked now.
        (
            facts(manifest=None, stem_objects={}, failure=st.FailureFacts("fp-old", SHA, "boom", 1.0)),
            st.MISSING,
            st.NOT_SEPARATED,
        ),
        # A redo of a stale set that failed: failed (the old set stays where it is).
        (
            facts(manifest=manifest(fingerprint="fp-old"), failure=st.FailureFacts(FP, SHA, "boom", 1.0)),
            st.FAILED,
            st.SEPARATION_FAILED,
        ),
        # A current set wins over a stale failure record.
        (facts(failure=st.FailureFacts(FP, SHA, "boom", 1.0)), st.CURRENT, st.UP_TO_DATE),
    ],
)
def test_rule(case, expected, reason):
    got = st.decide_state(case, TARGET)
    assert got.state == expected
    assert got.reasons[0] == reason
    assert got.detail


def test_input_missing_is_reported_beside_the_state():
    got = st.decide_state(facts(input_etag=None), TARGET)
    assert (got.state, got.reasons) == (st.CURRENT, (st.UP_TO_DATE, st.INPUT_MISSING))


def test_broken_names_the_object():
    got = st.decide_state(facts(stem_objects={STEMS["vocals"][0]: 10}), TARGET)
    assert "drums" in got.detail and STEMS["drums"][0] in got.detail


# --------------------------------------------------------------------------- facts from a store


def _store_with_set(tmp_path):
    store = LocalObjectStore(tmp_path)
    store.put_bytes("inputs/h4n/a.wav", b"RIFF....")
    etag = store.head("inputs/h4n/a.wav").etag
    store.put_bytes(
        "recordings/h4n/a/recording.json",
        json.dumps(
            {"source_sha256": SHA, "input_etag": etag, "duration_s": 3.0, "original_key": "inputs/h4n/a.wav"}
        ).encode(),
    )
    stems = {}
    for name in ("vocals", "drums"):
        key = f"outputs/h4n/a/ht/{name}.m4a"
        store.put_bytes(key, b"x" * 10)
        stems[name] = {"key": key, "bytes": 10, "format": "m4a"}
    store.put_bytes(
        "outputs/h4n/a/ht/manifest.json",
        json.dumps(
            {
                "fingerprint": FP,
                "input_sha256": SHA,
                "stems": stems,
                "billed_seconds": 2.0,
                "backend": "local",
                "input_duration_s": 3.0,
            }
        ).encode(),
    )
    store.put_bytes("outputs/h4n/a/ht/.staging/job1/vocals.m4a", b"half")  # never a fact
    return store


def _states(store, cache=None, wanted=("ht",)):
    rows = collect_states(
        store,
        ["h4n/a", "h4n/b"],
        ["ht", "other"],
        {("h4n", "ht"): TARGET, ("h4n", "other"): TARGET},
        {"h4n": frozenset(wanted)},
        cache,
    )
    return {(r.partition, r.strategy): r.state for r in rows}


def test_collect_states_from_a_store(tmp_path):
    store = _store_with_set(tmp_path)
    states = _states(store)
    assert states[("h4n/a", "ht")].state == st.CURRENT
    assert states[("h4n/a", "other")].state == st.UNUSED
    assert states[("h4n/b", "ht")].reasons == (st.NOT_RECORDED,)

    store.delete("outputs/h4n/a/ht/drums.m4a")
    assert _states(store)[("h4n/a", "ht")].reasons[0] == st.STEM_MISSING
    store.put_bytes("outputs/h4n/a/ht/drums.m4a", b"x" * 4)
    assert _states(store)[("h4n/a", "ht")].reasons[0] == st.STEM_SHORT
    store.put_bytes("outputs/h4n/a/ht/drums.m4a", b"x" * 10)
    store.delete("outputs/h4n/a/ht/manifest.json")
    assert _states(store)[("h4n/a", "ht")].reasons[0] == st.MANIFEST_MISSING


def test_failure_record_and_input_changes(tmp_path):
    store = _store_with_set(tmp_path)
    for key in [i.key for i in store.list("outputs/h4n/a/ht/") if ".staging" not in i.key]:
        store.delete(key)
    store.put_bytes(
        f"outputs/h4n/a/ht/{FAILURE_NAME}",
        json.dumps({"fingerprint": FP, "input_sha256": SHA, "error": "out of memory", "failed_at": 5.0}).encode(),
    )
    got = _states(store)[("h4n/a", "ht")]
    assert (got.state, got.detail) == (st.FAILED, "out of memory")

    store.delete("inputs/h4n/a.wav")
    assert st.INPUT_MISSING in _states(store)[("h4n/a", "ht")].reasons


def test_cache_is_used_only_while_the_etag_holds(tmp_path):
    store = _store_with_set(tmp_path)
    cache = MemoryFactCache()
    assert _states(store, cache)[("h4n/a", "ht")].state == st.CURRENT
    assert "outputs/h4n/a/ht/manifest.json" in cache.entries
    # Rewrite the manifest with another fingerprint: a new ETag, so the cache cannot hide it.
    doc = json.loads(store.get_bytes("outputs/h4n/a/ht/manifest.json"))
    doc["fingerprint"] = "fp-old-and-longer"
    store.put_bytes("outputs/h4n/a/ht/manifest.json", json.dumps(doc).encode())
    assert _states(store, cache)[("h4n/a", "ht")].reasons[0] == st.STRATEGY_CHANGED


def test_unused_rows_still_say_what_happened_to_the_recording():
    def unused(**kw):
        return st.decide_state(facts(wanted=False, manifest=None, stem_objects={}, **kw), TARGET).reasons

    assert unused(recording=None) == (st.NOT_WANTED, st.NOT_RECORDED)
    assert unused(input_etag=None) == (st.NOT_WANTED, st.INPUT_MISSING)
    assert unused(input_etag="e2") == (st.NOT_WANTED, st.INPUT_CHANGED)
