"""Stemset at scale on the production instance: Postgres (from the pgserver wheel) with the
``deploy/dagster.yaml`` that ``stemset deploy render`` writes, and a real S3 server (SeaweedFS).

1. ``sensor``: N input objects in SeaweedFS; the new_recordings sensor ticks until the backlog is
   drained (``sensors.max_new_per_tick`` a tick), registering N partitions on Postgres: time per tick.
2. ``backfill_plan``: ``stemset backfill``'s plan over the N partitions (states read from the bucket,
   the spend guard's spending read from Postgres): time and peak memory.
3. ``backfill_launch`` (unless ``--skip-launch``): each partition's ``recording.json`` is written to
   the bucket (as if the sensor's runs had recorded every input), so ``stemset backfill`` plans the
   N missing stem sets without ``recording``; the plan is submitted as
   ``stemset backfill`` submits it (GraphQL ``launchPartitionBackfill`` on a real dagster-webserver,
   a ``dagster code-server`` for the code location) and a real dagster-daemon turns it into runs of
   ``backfill.max_partitions_per_run`` partitions, polled until all exist (or ``--window`` s).
   ``max_concurrent_runs: 0`` keeps every run QUEUED (no separation). Peak RSS and CPU seconds of
   the webserver, daemon and code server are read from /proc.

``stemset status`` over many partitions: ``benchmarks/status.py --partitions N``.

    python benchmarks/scale.py --json --objects 10000 --window 1000   # the issue's scale (an hour here)
    python benchmarks/scale.py --json --objects 200 --window 300      # a quick check (~4 minutes)
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


def bench_launch(config, instance, store, config_path, home, instance_text, env, tmp: Path, window_s: float) -> dict:
    from benchmarks.backfill_launch import dagster_processes, record_recordings, submit_and_create_runs, wait_for_daemon
    from stemset_assets.defs.backfill import plan_backfill
    from tests.webserver import code_server, dagster_daemon, dagster_webserver, grpc_workspace

    keys = list(instance.get_dynamic_partitions("recordings"))
    out: dict = {"record_recordings_s": round(record_recordings(store, keys), 1)}
    t0 = time.perf_counter()
    plan = plan_backfill(instance, config, "htdemucs", "redo", store=store)
    out["plan_s"] = round(time.perf_counter() - t0, 2)
    with (
        code_server(config_path, "stemset_assets.definitions", env, tmp / "code.log") as port,
        dagster_webserver(
            home, config_path, instance_yaml=instance_text, workspace=grpc_workspace(tmp / "ws.yaml", port), env=env
        ) as client,
        dagster_daemon(home, config_path, workspace=tmp / "ws.yaml", env=env, log_path=tmp / "daemon.log"),
    ):
        out["daemon_up_s"] = round(wait_for_daemon(instance, 180), 1)
        out.update(submit_and_create_runs(plan, config, instance, client, window_s=window_s))
        out["plan_and_submit_s"] = round(out["plan_s"] + out["submit_s"], 2)
        out["processes"] = dagster_processes()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--per-tick", type=int, default=200)
    ap.add_argument("--window", type=float, default=1500, help="longest wait for the daemon's runs (s)")
    ap.add_argument("--skip-launch", action="store_true", help="plan only: no webserver, daemon or runs")
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
            os.environ["DAGSTER_HOME"] = str(home)
            instance_yaml = instance_config(config)
            instance_yaml["run_coordinator"]["config"]["max_concurrent_runs"] = 0  # runs stay QUEUED
            instance_text = yaml.safe_dump(instance_yaml, sort_keys=False)
            (home / "dagster.yaml").write_text(instance_text)
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
            if not args.skip_launch:
                config_path = Path(tmp) / "config.yaml"
                config_path.write_text(CONFIG % {"root": root, "per_tick": args.per_tick})
                env = server.env(os.environ["DAGSTER_PG_DB"])
                result["backfill_launch"] = bench_launch(
                    config, instance, store, config_path, home, instance_text, env, Path(tmp), args.window
                )
            result["peak_rss_mb"] = peak_rss_mb()
            instance.dispose()
    finally:
        stop_postgres(server)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
