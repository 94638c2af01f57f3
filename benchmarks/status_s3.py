"""`stemset status` over N partitions in a real S3 server (SeaweedFS): listing as before (one
listing per profile and area, botocore's default timestamp parser) against now (a C timestamp
parser, LISTs under prefixes of the partitions' names, 16 at once), cold (every recording.json and
manifest.json read) and warm (an in-memory fact cache), optionally with a delay added before every
request to stand for a remote bucket's round trip (SeaweedFS on loopback answers in ~1 ms; R2 in
tens to hundreds).

    python benchmarks/status_s3.py --json --partitions 5000 --latency-ms 0,50
    python benchmarks/status_s3.py --json --partitions 5000 --compare-prefixes --compare-listing-reader

Each run counts its LIST requests (``lists``): in a warm status they are most of the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, machine  # noqa: E402
from benchmarks.sensor import make_store  # noqa: E402
from benchmarks.status import CONFIG, timed  # noqa: E402
from gpu_worker.stores import s3_listing  # noqa: E402
from gpu_worker.stores.s3 import S3ObjectStore  # noqa: E402
from stemset_assets.config import parse_config  # noqa: E402
from stemset_assets.core import prefix_listing, set_facts  # noqa: E402
from stemset_assets.core.set_facts import MemoryFactCache  # noqa: E402
from stemset_assets.core.status import status_rows  # noqa: E402
from stemset_assets.core.stemsets import fingerprints  # noqa: E402

STEMS = ("drums", "bass", "other", "vocals")


def upload(store, n: int, fp: str) -> None:
    """N recordings with a published 4-stem set each: 7 objects a partition."""

    def one(i: int) -> None:
        pk = f"h4n/take_{i}"
        store.put_bytes(f"inputs/{pk}.wav", b"RIFF")
        etag = store.head(f"inputs/{pk}.wav").etag
        rec = {"source_sha256": "s", "input_etag": etag, "original_key": f"inputs/{pk}.wav", "duration_s": 240.0}
        store.put_bytes(f"recordings/{pk}/recording.json", json.dumps(rec).encode())
        stems = {}
        for stem in STEMS:
            key = f"outputs/{pk}/htdemucs/{stem}.m4a"
            store.put_bytes(key, b"xx")
            stems[stem] = {"key": key, "bytes": 2, "format": "m4a"}
        doc = {"fingerprint": fp, "input_sha256": "s", "stems": stems, "backend": "modal", "input_duration_s": 240.0}
        store.put_bytes(f"outputs/{pk}/htdemucs/manifest.json", json.dumps(doc).encode())

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(n)))


def plain_store(server, bucket: str) -> S3ObjectStore:
    """The same bucket through a client with botocore's default (dateutil) timestamp parser."""
    return S3ObjectStore(server.client(max_pool_connections=32, retries={"max_attempts": 3}), bucket)


def delayed(store: S3ObjectStore, latency_s: float) -> S3ObjectStore:
    if latency_s > 0:
        store.client.meta.events.register("before-send.s3", lambda **_: time.sleep(latency_s))
    return store


def uncapped_prefixes(names, threads: int) -> list[str]:
    """The shard prefixes before they were capped at names / NAMES_PER_PREFIX (up to 100 LISTs of
    50 names where 10 of 500 do)."""
    return prefix_listing.prefixes_for(names, prefix_listing.shard_count(len(names), threads))


def run(store, config, keys, one_listing: bool, uncapped: bool = False) -> dict:
    old, capped = prefix_listing.NAMES_PER_PREFIX, set_facts.shard_prefixes
    if one_listing:  # shard_count() is then 1: one listing per profile and area, as before
        prefix_listing.NAMES_PER_PREFIX = 10**12
    if uncapped:
        set_facts.shard_prefixes = uncapped_prefixes
    lists: list[int] = []
    count = lambda **_: lists.append(1)
    store.client.meta.events.register("before-call.s3.ListObjectsV2", count)
    try:
        _, cold_s, cold_cpu = timed(lambda: status_rows(store, config, keys))
        cache = MemoryFactCache()
        status_rows(store, config, keys, cache=cache)
        lists.clear()
        rows, warm_s, warm_cpu = timed(lambda: status_rows(store, config, keys, cache=cache))
    finally:
        prefix_listing.NAMES_PER_PREFIX, set_facts.shard_prefixes = old, capped
        store.client.meta.events.unregister("before-call.s3.ListObjectsV2", count)  # the next run counts its own
    assert all(r.state == "current" for r in rows), {r.state for r in rows}
    return {"cold_s": cold_s, "cold_cpu_s": cold_cpu, "warm_s": warm_s, "warm_cpu_s": warm_cpu, "lists": len(lists)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partitions", type=int, default=5000)
    ap.add_argument("--latency-ms", default="0", help="comma-separated delays added before each request")
    ap.add_argument(
        "--compare-listing-reader",
        action="store_true",
        help="also time the current store with botocore parsing the listings (no gpu_worker.stores.s3_listing)",
    )
    ap.add_argument(
        "--compare-prefixes",
        action="store_true",
        help="also time the current store with the shard prefixes uncapped (as before the cap)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result: dict = {"benchmark": "status_s3", "partitions": args.partitions, "objects": 7 * args.partitions}
    with tempfile.TemporaryDirectory(prefix="stemset-status-s3-") as tmp, contextlib.ExitStack() as stack:
        store, (server, bucket) = make_store("s3", Path(tmp), stack)
        config = parse_config(CONFIG.replace("ROOT", str(Path(tmp) / "media")), base_dir=tmp)
        fp = fingerprints(config)["htdemucs"]
        _, result["upload_s"], _ = timed(lambda: upload(store, args.partitions, fp))
        keys = [f"h4n/take_{i}" for i in range(args.partitions)]
        for ms in (float(x) for x in args.latency_ms.split(",")):
            new = delayed(
                S3ObjectStore.from_settings(
                    server.endpoint_url,
                    bucket,
                    server.region,
                    server.access_key_id,
                    server.secret_access_key,
                    max_attempts=3,
                ),
                ms / 1000,
            )
            before = delayed(plain_store(server, bucket), ms / 1000)
            runs = {
                "before": run(before, config, keys, one_listing=True),
                "now": run(new, config, keys, one_listing=False),
            }
            if args.compare_prefixes:
                runs["now_uncapped_prefixes"] = run(new, config, keys, one_listing=False, uncapped=True)
            if args.compare_listing_reader:  # the same store with botocore parsing whole listings
                new.client.meta.events.unregister(s3_listing.EVENT, unique_id=s3_listing.UNIQUE_ID)
                runs["now_botocore_listing_parser"] = run(new, config, keys, one_listing=False)
            result[f"latency_{ms:g}ms"] = runs
    result["machine"] = machine()
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
