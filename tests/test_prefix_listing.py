"""A remote bucket's wide status is listed under prefixes of the names it asks about, several
LISTs at once (core.prefix_listing), and reads the same facts as a whole-profile walk; S3
timestamps are read by a fast parser that gives botocore's own values."""

import threading
from datetime import datetime, timezone

import pytest
from botocore.utils import parse_timestamp

from gpu_worker.stores import s3_timestamps
from gpu_worker.stores.base import ObjectInfo, ObjectStore
from gpu_worker.stores.s3 import S3ObjectStore
from stemset_assets.core import prefix_listing, set_facts
from stemset_assets.core import state as st

from .test_status_listing import KEYS, TARGETS, WANTED, _media

SLUGS = ["a", "ab", "abc", "take", "take-2", "take.x", "take_1", "take_10", "take_100", "take_2", "zz", "z"]


@pytest.mark.parametrize("want", [1, 3, 8, 12, 100])
def test_prefixes_start_every_name_exactly_once(want):
    prefixes = prefix_listing.prefixes_for(SLUGS, want)
    for name in SLUGS:  # every object of <name>/ is under exactly one prefix, and no prefix starts another
        assert sum(f"{name}/".startswith(p) for p in prefixes) == 1, (name, prefixes)
    assert not any(p != q and q.startswith(p) for p in prefixes for q in prefixes)
    assert len(prefixes) >= min(want, len(SLUGS))
    if want == 1:
        assert len(prefixes) < len(SLUGS)  # as few as asked for: fewer LIST calls


def test_a_jump_past_the_most_prefixes_keeps_the_fewer():
    names = [f"take_{i}" for i in range(5000)]  # 9 prefixes at take_<d>, then 100 at take_<dd>
    assert len(prefix_listing.prefixes_for(names, 20)) == 100
    capped = prefix_listing.prefixes_for(names, 20, most=20)
    assert capped == [f"take_{i}" for i in range(10)]
    assert all(sum(f"{n}/".startswith(p) for p in capped) == 1 for n in names)
    assert prefix_listing.shard_prefixes(names, 16) == capped  # 5,000 names: at most 20 prefixes
    assert len(prefix_listing.shard_prefixes([f"take_{i}" for i in range(100_000)], 16)) == 100
    spread = [f"{a}{b}" for a in "abcdefghij" for b in "klmnopqrst"]  # no jump: the first count over want
    assert len(prefix_listing.prefixes_for(spread, 4, most=8)) == 10


def test_shard_count_grows_with_names_within_bounds():
    assert prefix_listing.shard_count(10, 16) == 1  # a few names: one listing
    assert prefix_listing.shard_count(5_000, 16) == 20
    assert prefix_listing.shard_count(100_000, 16) == 32  # two per thread at most


class _BarrierStore(ObjectStore):
    """Each list() waits until another is running: it deadlocks (then times out) if lists run one at a time."""

    def __init__(self):
        self.barrier = threading.Barrier(2, timeout=10)

    def list(self, prefix=""):
        self.barrier.wait()
        yield ObjectInfo(f"{prefix}x", 1, "e", 0.0)


def test_list_prefixes_runs_lists_at_once_and_keeps_every_object():
    got = list(prefix_listing.list_prefixes(_BarrierStore(), ["p1/", "p2/", "p3/", "p4/"], threads=2))
    assert [i.key for i in got] == ["p1/x", "p2/x", "p3/x", "p4/x"]


def _states(store):
    return {
        (r.partition, r.strategy): (r.state.state, r.state.reasons, r.facts.input_etag is not None)
        for r in set_facts.collect_states(store, KEYS, ["ht", "other"], TARGETS, WANTED)
    }


def test_a_wide_s3_status_lists_by_prefix_and_agrees_with_the_local_folder(s3_store, tmp_path, monkeypatch):
    monkeypatch.setattr(prefix_listing, "NAMES_PER_PREFIX", 1)  # shard even these 25 partitions
    _media(None, store=s3_store)
    local = _media(tmp_path)
    listed = []
    real_list = S3ObjectStore.list
    monkeypatch.setattr(S3ObjectStore, "list", lambda self, prefix="": listed.append(prefix) or real_list(self, prefix))
    remote = _states(s3_store)
    assert remote == _states(local)
    assert remote[("h4n/take_0", "ht")][0] == st.CURRENT and remote[("h4n/take_0", "ht")][2]  # input found
    assert remote[("h4n/take_2", "ht")][0] == st.BROKEN
    by_area = {area: [p for p in listed if p.startswith(f"{area}/")] for area in ("recordings", "outputs", "inputs")}
    assert all(len(prefixes) >= 10 for prefixes in by_area.values()), by_area  # not one listing per profile
    assert "outputs/h4n/" not in listed


TIMESTAMPS = [
    "2026-12-02T18:20:00.000Z",
    "2026-12-02T18:20:00Z",
    "2026-12-02T18:20:00.123456Z",
    "1999-01-01T00:00:00.5Z",
    "Wed, 02 Dec 2026 18:20:00 GMT",  # response headers: botocore's parser
    "Sun, 06 Nov 1994 08:49:37 GMT",
    "1764699600",
    "2026-12-02T18:20:00+01:00",
    "Wed, 32 Dec 2026 18:20:00 GMT",  # not a date: botocore's parser words the error
]


@pytest.mark.parametrize("text", TIMESTAMPS)
def test_the_fast_timestamp_parser_gives_botocores_values(text):
    try:
        slow = parse_timestamp(text)
    except ValueError:
        with pytest.raises(ValueError):
            s3_timestamps.parse_s3_timestamp(text)
        return
    fast = s3_timestamps.parse_s3_timestamp(text)
    assert fast == slow and fast.utcoffset() == slow.utcoffset()
    assert fast.timestamp() == slow.timestamp()


def test_the_store_reads_listings_with_the_fast_parser(seaweed, monkeypatch):
    calls, fast = [], s3_timestamps.parse_s3_timestamp

    def counting(value):
        calls.append(value)
        return fast(value)

    monkeypatch.setattr(s3_timestamps, "parse_s3_timestamp", counting)
    bucket = seaweed.make_bucket()
    store = S3ObjectStore.from_settings(
        seaweed.endpoint_url, bucket, seaweed.region, seaweed.access_key_id, seaweed.secret_access_key
    )
    for i in range(3):
        store.put_bytes(f"k/{i}", b"x")
    listed = {i.key: i.last_modified for i in store.list("k/")}
    assert len(calls) >= 3  # the listing's timestamps went through the fast parser
    plain = seaweed.client().list_objects_v2(Bucket=bucket, Prefix="k/")["Contents"]  # botocore's default parser
    assert listed == {o["Key"]: o["LastModified"].timestamp() for o in plain}
    assert (
        store.head("k/0").last_modified
        == seaweed.client().head_object(Bucket=bucket, Key="k/0")["LastModified"].timestamp()
    )
    assert datetime.fromtimestamp(listed["k/0"], timezone.utc).year >= 2026
