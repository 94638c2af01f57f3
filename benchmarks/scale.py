"""Stemset at scale on the production instance: Postgres (from the pgserver wheel) with the
``deploy/dagster.yaml`` that ``stemset deploy render`` writes, and a real S3 server (SeaweedFS).

1. ``sensor``: N input objects in SeaweedFS; the new_recordings sensor ticks until the backlog is
   drained (``sensors.max_new_per_tick`` a tick), registering N partitions on Postgres: time per tick.
2. ``backfill_plan``: ``stemset backfill``'s plan over the N partitions (states read from the bucket,
   the spend guard's spending read from Postgres): time and peak memory. Submitting the Dagster
   backfill needs a webserver (GraphQL) and is not timed here.

``stemset status`` over many partitions: ``benchmarks/status.py --partitions N``.

    python benchmarks/scale.py --json --objects 10000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from benchmarks.common import emit, machine  # noqa: E402
from benchmarks.sensor import CONFIG, bench_sensor, make_store, media_resource, upload  # noqa: E402


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--per-tick", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from dagster import DagsterInstance

    from stemset_assets.config import parse_config
    from stemset_assets.core.deploy_files import instance_config
    from stemset_assets.defs.backfill import plan_backfill
    from tests.postgres_fixtures import start_postgres, stop_postgres

    result: dict = {"benchmark": "scale", "objects": args.objects, "machine": machine()}
    server = start_postgres()
    try:
        os.environ.update(server.env(server.create_database()))
        result["postgres_startup_s"] = round(server.startup_s, 2)
        with tempfile.TemporaryDirectory(prefix="stemset-scale-") as tmp, contextlib.ExitStack() as stack:
            root = Path(tmp) / "media"
            store, s3 = make_store("s3", Path(tmp), stack)
            config = parse_config(CONFIG % {"root": root, "per_tick": args.per_tick}, base_dir=tmp)
            home = Path(tmp) / "home"
            home.mkdir()
            (home / "dagster.yaml").write_text(yaml.safe_dump(instance_config(config), sort_keys=False))
            instance = DagsterInstance.from_config(str(home))
            result["instance"] = type(instance.run_storage).__name__
            result["upload_s"] = round(upload(store, args.objects), 2)
            media = media_resource("s3", root, s3)
            result["sensor"] = bench_sensor(config, instance, media)
            t0 = time.perf_counter()
            plan = plan_backfill(instance, config, "htdemucs", "redo", store=store)
            result["backfill_plan"] = {
                "partitions": plan.count,
                "plan_s": round(time.perf_counter() - t0, 2),
                "held_back": len(plan.held_back),
            }
            result["peak_rss_mb"] = peak_rss_mb()
            instance.dispose()
    finally:
        stop_postgres(server)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
