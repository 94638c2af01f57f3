"""Benchmark: the ``new_recordings`` sensor tick and ``stemset status`` over many objects/partitions.

    python benchmarks/sensor.py --json --objects 10000                 # local media folder
    python benchmarks/sensor.py --json --objects 10000 --storage s3    # a SeaweedFS bucket (weed mini)

1. Sensor: ``--objects`` small input objects under ``inputs/h4n/``; the sensor is evaluated
   (``build_sensor_context`` on a SQLite instance, partitions added as the daemon would) until
   the backlog is drained. Reports each tick's time, partitions added per tick, ticks, cursor size.
2. Status: for every partition, materialisation events of ``recording`` (with its real metadata,
   the inline waveform preview and the input's ETag included, and its data version tag) and of the
   4 stems of ``htdemucs`` (or only the first, ``--stems first``: the one status reads) are written
   to the instance; half of them under an older fingerprint. Then
   :func:`stemset_assets.defs.staleness.staleness` (what ``stemset status`` computes) is timed with the
   input listing: cold (the first call, which reads every latest event and fills the facts cache
   in the instance's key-value store) and warm (the calls after it), and warm without the listing.

Seeding is the slow part (SQLite, one transaction per event: ~23 ms an event on the disk here,
~7 ms on tmpfs): ``--tmpdir /dev/shm`` puts the instance and media folder in memory, so
``--status-partitions 10000 --stems first`` seeds 20,000 events in about 2.5 minutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIG = """
storage: {backend: local, local: {root: %(root)s}}
sensors: {max_new_per_tick: %(per_tick)d, settle_s: 0}
profiles:
  h4n: {strategies: [htdemucs]}
strategies:
  htdemucs: {_: htdemucs, drums: drums, bass: bass, other: other, vocals: vocals}
"""


def make_store(kind: str, root: Path, stack):
    from gpu_worker.stores.local import LocalObjectStore
    from gpu_worker.stores.s3 import S3ObjectStore

    if kind == "local":
        return LocalObjectStore(root / "media", fsync=False), None
    import secrets

    from tests.conftest import _start, _stop, _weed_binary

    server = _start(
        _weed_binary(), root / "weed", "BENCH" + secrets.token_hex(6).upper(), secrets.token_urlsafe(24), "auto"
    )
    stack.callback(_stop, server.process)
    bucket = server.make_bucket()
    store = S3ObjectStore.from_settings(
        endpoint_url=server.endpoint_url,
        bucket=bucket,
        region=server.region,
        access_key_id=server.access_key_id,
        secret_access_key=server.secret_access_key,
        max_attempts=3,
    )
    return store, (server, bucket)


def media_resource(kind: str, root: Path, s3):
    from stemset_assets.defs.resources import MediaStoreResource

    if kind == "local":
        return MediaStoreResource(backend="local", root=str(root))
    server, bucket = s3
    return MediaStoreResource(
        backend="s3",
        endpoint_url=server.endpoint_url,
        bucket=bucket,
        region=server.region,
        access_key_id=server.access_key_id,
        secret_access_key=server.secret_access_key,
    )


def upload(store, n: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda i: store.put_bytes(f"inputs/h4n/take_{i:05d}.wav", b"RIFF" + i.to_bytes(4, "big") * 8), range(n)
            )
        )
    return time.perf_counter() - t0


def bench_sensor(config, instance, media) -> dict:
    from dagster import build_sensor_context

    from stemset_assets.defs.sensors import build_new_recordings_sensor

    sensor = build_new_recordings_sensor(config)
    cursor, ticks, added, requested = None, [], [], 0
    while True:
        t0 = time.perf_counter()
        result = sensor(build_sensor_context(instance=instance, cursor=cursor, resources={"media_store": media}))
        for req in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        ticks.append(time.perf_counter() - t0)  # the tick plus the daemon's partition add
        cursor = result.cursor
        runs = len(result.run_requests or [])
        requested += runs
        added.append(sum(len(r.partition_keys) for r in result.dynamic_partitions_requests or []))
        if not runs:
            break
    return {
        "ticks": len(ticks),
        "tick_s_first": round(ticks[0], 3),
        "tick_s_max": round(max(ticks), 3),
        "tick_s_mean": round(statistics.mean(ticks), 3),
        "tick_s_last_empty": round(ticks[-1], 3),
        "partitions_added_per_tick": max(added),
        "runs_requested": requested,
        "partitions": len(instance.get_dynamic_partitions("recordings")),
        "cursor_bytes": len(cursor or ""),
    }


def seed_events(config, instance, keys: list[str], all_stems: bool = True, store=None) -> float:
    """Write recording + stem materialisations for every partition (half under an old fingerprint),
    with the metadata and data/code version tags the real assets record (the input's ETag from ``store``)."""
    import numpy as np
    from dagster import AssetKey, AssetMaterialization, MetadataValue

    from stemset_assets.core.plots import inline_markdown_image, waveform_png
    from stemset_assets.core.stemsets import data_version, fingerprints
    from stemset_assets.defs.asset_keys import stem_keys
    from stemset_assets.defs.assets.recording import RECORDING_CODE_VERSION

    fp = fingerprints(config)["htdemucs"]
    rng = np.random.default_rng(0)
    peaks = np.sort(rng.uniform(-0.8, 0.8, size=(800, 2)), axis=1).astype(np.float32)
    preview = inline_markdown_image(waveform_png(peaks, 180.0, title="take.wav"), "waveform")
    etags = {info.key: info.etag for info in store.list("inputs/")} if store is not None else {}
    t0 = time.perf_counter()
    for i, pk in enumerate(keys):
        sha = f"{i:064x}"
        original = f"inputs/{pk}.wav"
        instance.report_runless_asset_event(
            AssetMaterialization(
                AssetKey("recording"),
                partition=pk,
                metadata={
                    "original_key": original,
                    "sha256": sha,
                    "duration_s": 180.0,
                    "input_bytes": 36,
                    "input_etag": etags.get(original, ""),
                    "format": "wav",
                    "sample_rate": 44100,
                    "channels": 2,
                    "lufs": -14.2,
                    "peak_dbfs": -1.1,
                    "uri": f"recordings/{pk}/source.flac",
                    "waveform_preview": MetadataValue.md(preview),
                    "reused": False,
                },
                tags={"dagster/data_version": sha, "dagster/code_version": RECORDING_CODE_VERSION},
            )
        )
        used = fp if i % 2 else "0ld0ld0ld0ld"
        for key in stem_keys(config, ["htdemucs"])[: None if all_stems else 1]:
            instance.report_runless_asset_event(
                AssetMaterialization(
                    key,
                    partition=pk,
                    metadata={
                        "fingerprint": used,
                        "input_sha256": sha,
                        "duration_s": 180.0,
                        "billed_seconds": 9.0,
                        "backend": "modal",
                        "cost_usd": 0.00625,
                        "bytes": 1_000_000,
                        "uri": f"outputs/{pk}/htdemucs/{key.path[-1]}.m4a",
                        "strategy": "htdemucs",
                        "timings": MetadataValue.json({"decode": 0.1, "separate": 8.0, "encode": 0.5, "total": 9.0}),
                    },
                    tags={"dagster/data_version": data_version(sha, used), "dagster/code_version": used},
                )
            )
    return time.perf_counter() - t0


def main(argv=None) -> int:
    import contextlib

    from dagster import instance_for_test

    from benchmarks.common import emit, machine
    from stemset_assets.config import parse_config
    from stemset_assets.defs.staleness import staleness, summary

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--per-tick", type=int, default=200, help="sensors.max_new_per_tick (default 200, as shipped)")
    ap.add_argument("--storage", choices=["local", "s3"], default="local")
    ap.add_argument("--skip-status", action="store_true")
    ap.add_argument(
        "--status-partitions",
        type=int,
        default=None,
        help="seed events for only this many partitions (SQLite writes ~25 ms per event here)",
    )
    ap.add_argument(
        "--stems",
        choices=["all", "first"],
        default="all",
        help="seed all 4 stems' events, or only the first (the one status reads)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="warm status calls to time (the best is reported)")
    ap.add_argument("--tmpdir", default=None, help="where the instance and media folder go (e.g. /dev/shm)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="stemset-bench-", dir=args.tmpdir) as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp) / "media"
        store, s3 = make_store(args.storage, Path(tmp), stack)
        config = parse_config(CONFIG % {"root": root, "per_tick": args.per_tick}, base_dir=tmp)
        media = media_resource(args.storage, root, s3)
        result = {
            "benchmark": "sensor",
            "storage": args.storage,
            "objects": args.objects,
            "max_new_per_tick": args.per_tick,
            "machine": machine(),
        }
        result["upload_s"] = round(upload(store, args.objects), 2)
        (Path(tmp) / "dagster").mkdir()
        with instance_for_test(temp_dir=str(Path(tmp) / "dagster")) as instance:
            result["sensor"] = bench_sensor(config, instance, media)
            if not args.skip_status:
                keys = sorted(instance.get_dynamic_partitions("recordings"))[: args.status_partitions]
                result["status_partitions"] = len(keys)
                result["seed_events_s"] = round(seed_events(config, instance, keys, args.stems == "all", store), 1)
                result["seeded_stems"] = args.stems
                only = None if len(keys) == result["sensor"]["partitions"] else keys

                def timed(**kw) -> tuple[float, object]:
                    t0 = time.perf_counter()
                    df = staleness(instance, config, store=store, partitions=only, **kw)
                    return round(time.perf_counter() - t0, 3), df

                result["status_s_cold"], df = timed()
                warm = [timed() for _ in range(max(1, args.repeat))]
                result["status_s"] = min(t for t, _ in warm)
                result["status_s_warm_all"] = [t for t, _ in warm]
                result["status_s_without_listing"] = min(
                    timed(check_inputs=False)[0] for _ in range(max(1, args.repeat))
                )
                result["status_rows"] = len(df)
                result["status_same_when_warm"] = bool(df.equals(warm[-1][1]))
                result["status_summary"] = summary(df).to_dict(orient="records")
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
