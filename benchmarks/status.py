"""Cold and warm `stemset status` over N partitions: the one state rule over bucket facts.

Builds N recordings with a published 4-stem set each (manifest, stems, recording.json, input) in a
local media folder, then times :func:`stemset_assets.core.status.status_rows` with no cache (cold:
every recording.json and manifest.json read) and again with a warm fact cache.

    python benchmarks/status.py --json --partitions 10000 --root /dev/shm/stemset-status
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def build(root: Path, n: int, fp: str) -> None:
    store = LocalObjectStore(root, fsync=False)
    for i in range(n):
        pk = f"h4n/take_{i}"
        store.put_bytes(f"inputs/h4n/take_{i}.wav", b"RIFF")
        etag = store.head(f"inputs/h4n/take_{i}.wav").etag
        store.put_bytes(
            f"recordings/{pk}/recording.json",
            json.dumps(
                {
                    "source_sha256": "s",
                    "input_etag": etag,
                    "original_key": f"inputs/h4n/take_{i}.wav",
                    "duration_s": 240.0,
                }
            ).encode(),
        )
        stems = {}
        for stem in ("drums", "bass", "other", "vocals"):
            key = f"outputs/{pk}/htdemucs/{stem}.m4a"
            store.put_bytes(key, b"xx")
            stems[stem] = {"key": key, "bytes": 2, "format": "m4a"}
        store.put_bytes(
            f"outputs/{pk}/htdemucs/manifest.json",
            json.dumps(
                {
                    "fingerprint": fp,
                    "input_sha256": "s",
                    "stems": stems,
                    "billed_seconds": 3.0,
                    "backend": "modal",
                    "gpu_type": "A100-40GB",
                    "input_duration_s": 240.0,
                }
            ).encode(),
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partitions", type=int, default=10_000)
    ap.add_argument("--root", default="/tmp/stemset-status-bench")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "config.yaml"
    cfg.write_text(CONFIG.replace("ROOT", str(root / "media")))
    config = load_config(cfg, env={"STEMSET_MODEL_REPO": ""})
    fp = fingerprints(config)["htdemucs"]
    media = root / "media"
    if not (media / "outputs").exists():
        build(media, args.partitions, fp)
    store = LocalObjectStore(media, fsync=False)
    keys = [f"h4n/take_{i}" for i in range(args.partitions)]
    t0, c0 = time.perf_counter(), time.process_time()
    rows = status_rows(store, config, keys)
    cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
    cache = MemoryFactCache()
    status_rows(store, config, keys, cache=cache)
    t0 = time.perf_counter()
    rows = status_rows(store, config, keys, cache=cache)
    warm = time.perf_counter() - t0
    result = {
        "partitions": args.partitions,
        "cold_s": round(cold, 3),
        "cold_cpu_s": round(cold_cpu, 3),  # what the process itself spent: less sensitive to load
        "warm_s": round(warm, 3),
        "states": {s: sum(r.state == s for r in rows) for s in {r.state for r in rows}},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=1) if args.json else result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
