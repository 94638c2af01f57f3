"""Dagster event writes on Postgres: dagster_postgres' own storage (a new connection per call)
against deploy/dagster.yaml's PooledPostgresStorage (one kept connection per store).

A real Postgres from the pgserver wheel; each variant on a fresh database, twice, in turn; each
writes N runless materialisations (one partition each) and reads them back.

    python benchmarks/pg_pool.py --json --events 200
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, machine  # noqa: E402
from stemset_assets.config import parse_config  # noqa: E402
from stemset_assets.core.deploy_files import instance_config  # noqa: E402
from tests.postgres_fixtures import start_postgres, stop_postgres  # noqa: E402


def one(storage: dict, events: int) -> dict:
    from dagster import AssetKey, AssetMaterialization, DagsterInstance

    with tempfile.TemporaryDirectory() as home:
        (Path(home) / "dagster.yaml").write_text(yaml.safe_dump({"storage": storage, "telemetry": {"enabled": False}}))
        instance = DagsterInstance.from_config(home)
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(events):
                instance.report_runless_asset_event(AssetMaterialization(asset_key="probe", partition=f"p{i}"))
            found = len(instance.get_materialized_partitions(AssetKey("probe")))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            instance.dispose()
    assert found == events, found
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "ms_per_event": round(1000 * wall / events, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    pooled = instance_config(parse_config("{}", base_dir="."))["storage"]
    plain = {"postgres": pooled["custom"]["config"]}
    result: dict = {"benchmark": "pg_pool", "events": args.events, "machine": machine()}
    server = start_postgres()
    try:
        for name in ("dagster_postgres", "pooled") * args.rounds:
            os.environ.update(server.env(server.create_database()))
            result.setdefault(name, []).append(one(plain if name == "dagster_postgres" else pooled, args.events))
    finally:
        stop_postgres(server)
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
