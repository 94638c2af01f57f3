"""Cold and warm `stemset status` over N partitions: the one state rule over bucket facts.

Builds N recordings with a published 4-stem set each (manifest, stems, recording.json, input) in a
local media folder (once: a complete folder is reused), then times
:func:`stemset_assets.core.status.status_rows` with no cache (cold: every recording.json and
manifest.json read) and again with a warm in-memory fact cache; then what the CLI does (partitions
from a SQLite Dagster instance, the fact cache in its key-value store), first on an empty cache and
then warm, and the `stemset status` command itself as a process: listing the bucket (``--fresh``),
then from the rows that listing kept (what a wide status reads while the daemon's state sensor
lists every tick).

    python benchmarks/status.py --json --partitions 10000 --root /dev/shm/stemset-status
    python benchmarks/status.py --json --partitions 100000 --root /dev/shm/stemset-status100k
    python benchmarks/status.py --json --partitions 100000 --root /dev/shm/stemset-status100k --postgres
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_worker.stores.local import LocalObjectStore  # noqa: E402
from stemset_assets.config import load_config  # noqa: E402
from stemset_assets.core.set_facts import MemoryFactCache  # noqa: E402
from stemset_assets.core.status import status_rows  # noqa: E402
from stemset_assets.core.stemsets import fingerprints  # noqa: E402

CONFIG = """
storage: {backend: local, local: {root: ROOT}}
profiles:
  h4n: {strategies: [htdemucs], output: {format: m4a, bitrate: 192}}
strategies:
  htdemucs: {_: htdemucs, drums: drums, bass: bass, other: other, vocals: vocals}
"""


MARKER = ".complete"  # written last: a folder without it (an interrupted build) is built again


def build(root: Path, n: int, fp: str) -> None:
    """N recordings with a published 4-stem set each, written as plain files (the layout
    LocalObjectStore reads) rather than through put_bytes: 700,000 atomic writes would take minutes."""
    marker = root / MARKER
    if marker.exists() and marker.read_text().strip() == f"{n} {fp}":
        return
    store = LocalObjectStore(root)
    for i in range(n):
        pk = f"h4n/take_{i}"
        inp = root / f"inputs/{pk}.wav"
        inp.parent.mkdir(parents=True, exist_ok=True)
        inp.write_bytes(b"RIFF")
        etag = store.head(f"inputs/{pk}.wav").etag
        rec = root / f"recordings/{pk}/recording.json"
        rec.parent.mkdir(parents=True, exist_ok=True)
        doc = {"source_sha256": "s", "input_etag": etag, "original_key": f"inputs/{pk}.wav", "duration_s": 240.0}
        rec.write_text(json.dumps(doc))
        out = root / f"outputs/{pk}/htdemucs"
        out.mkdir(parents=True, exist_ok=True)
        stems_json = {}
        for stem in ("drums", "bass", "other", "vocals"):
            (out / f"{stem}.m4a").write_bytes(b"xx")
            stems_json[stem] = {"key": f"outputs/{pk}/htdemucs/{stem}.m4a", "bytes": 2, "format": "m4a"}
        manifest = {
            "fingerprint": fp,
            "input_sha256": "s",
            "stems": stems_json,
            "billed_seconds": 3.0,
            "backend": "modal",
            "gpu_type": "A100-40GB",
            "input_duration_s": 240.0,
        }
        (out / "manifest.json").write_text(json.dumps(manifest))
    marker.write_text(f"{n} {fp}")


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, round(time.perf_counter() - t0, 3), round(time.process_time() - c0, 3)


def instance_runs(
    root: Path, config_path: Path, config, keys: list[str], home: Path | None = None, command_runs: int = 3
) -> dict:
    """``stemset status`` as the CLI runs it: partitions from the Dagster instance of ``home``
    (default: a SQLite one under ``root``), the fact cache in its key-value store. In process
    (first call on an empty cache, then warm), then the command itself as a process (warm: what a
    user waits for, imports included)."""
    home = home or root / "dagster_home"
    home.mkdir(exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    from dagster import DagsterInstance

    from stemset_assets.core.layout import OUTPUTS
    from stemset_assets.core.status import status_frame, summary
    from stemset_assets.defs.partitions import RECORDINGS_PARTITIONS
    from stemset_assets.defs.status import CACHE_KEY, read_status

    instance = DagsterInstance.get()
    out: dict = {"instance": type(instance.run_storage).__name__}
    have = set(instance.get_dynamic_partitions(RECORDINGS_PARTITIONS))  # the instance says what it holds
    todo = [k for k in keys if k not in have]
    if todo:
        t0 = time.perf_counter()
        for i in range(0, len(todo), 10_000):
            instance.add_dynamic_partitions(RECORDINGS_PARTITIONS, todo[i : i + 10_000])
        out["register_partitions_s"] = round(time.perf_counter() - t0, 2)
    store = LocalObjectStore(root / "media", fsync=False)
    cache_key = CACHE_KEY + store.uri(OUTPUTS)
    instance.daemon_cursor_storage.set_cursor_values({cache_key: ""})  # start from an empty fact cache

    def status() -> None:
        summary(status_frame(read_status(instance, config, store=store)))

    _, out["first_s"], out["first_cpu_s"] = timed(status)
    _, out["warm_s"], out["warm_cpu_s"] = timed(status)
    raw = instance.daemon_cursor_storage.get_cursor_values({cache_key}).get(cache_key) or ""
    out["fact_cache_bytes"] = len(raw)
    env = {**os.environ, "STEMSET_MODEL_REPO": ""}
    base = [sys.executable, "-m", "stemset_assets.cli", "--config", str(config_path), "status"]
    # --fresh lists the bucket (and keeps the rows); the plain command then reads the kept rows
    # plus what runs changed since, as it does after any listing (the state sensor makes one a tick).
    for name, extra, runs in (("command_fresh", ["--fresh"], 1), ("command", [], command_runs)):
        walls, cpus = [], []
        for _ in range(runs):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            proc = subprocess.run([*base, *extra], env=env, capture_output=True, text=True, timeout=600, check=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            walls.append(round(time.perf_counter() - t0, 3))
            cpus.append(round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3))
        out[f"{name}_s"], out[f"{name}_cpu_s"] = statistics.median(walls), statistics.median(cpus)
        if runs > 1:
            out[f"{name}_runs_s"], out[f"{name}_runs_cpu_s"] = walls, cpus
        out[name] = " ".join([*base[1:], *extra])
        out[f"{name}_output"] = proc.stdout.strip().splitlines()
    instance.dispose()
    return out


def postgres_runs(root: Path, config_path: Path, config, keys: list[str]) -> dict:
    """:func:`instance_runs` on a fresh Postgres database with the instance ``stemset deploy
    render`` writes (pooled Dagster Postgres storage), the command reading it as a deployment does."""
    import yaml

    from stemset_assets.core.deploy_files import instance_config
    from tests.postgres_fixtures import start_postgres, stop_postgres

    server = start_postgres()
    try:
        os.environ.update(server.env(server.create_database()))
        home = root / "dagster_home_pg"
        home.mkdir(exist_ok=True)
        (home / "dagster.yaml").write_text(yaml.safe_dump(instance_config(config), sort_keys=False))
        return instance_runs(root, config_path, config, keys, home=home)
    finally:
        stop_postgres(server)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partitions", type=int, default=10_000)
    ap.add_argument("--root", default="/tmp/stemset-status-bench")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-instance", action="store_true", help="skip the Dagster-instance and command runs")
    ap.add_argument(
        "--postgres",
        action="store_true",
        help="also run the instance and command on the production instance: deploy/dagster.yaml's storage on a "
        "Postgres from the pgserver wheel",
    )
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "config.yaml"
    cfg.write_text(CONFIG.replace("ROOT", str(root / "media")))
    config = load_config(cfg, env={"STEMSET_MODEL_REPO": ""})
    fp = fingerprints(config)["htdemucs"]
    media = root / "media"
    _, build_s, _ = timed(lambda: build(media, args.partitions, fp))
    store = LocalObjectStore(media, fsync=False)
    keys = [f"h4n/take_{i}" for i in range(args.partitions)]
    rows, cold, cold_cpu = timed(lambda: status_rows(store, config, keys))
    cache = MemoryFactCache()
    status_rows(store, config, keys, cache=cache)
    rows, warm, warm_cpu = timed(lambda: status_rows(store, config, keys, cache=cache))
    result = {
        "partitions": args.partitions,
        "files": args.partitions * 7,
        "build_s": build_s,  # ~0 when the folder's marker says it is already built
        "cold_s": cold,
        "cold_cpu_s": cold_cpu,  # what the process itself spent: less sensitive to load
        "warm_s": warm,
        "warm_cpu_s": warm_cpu,
        "states": {s: sum(r.state == s for r in rows) for s in {r.state for r in rows}},
    }
    if not args.no_instance:
        result["instance"] = instance_runs(root, cfg, config, keys)
        if args.postgres:
            result["instance_postgres"] = postgres_runs(root, cfg, config, keys)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1) if args.json else result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
