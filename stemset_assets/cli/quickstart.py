"""``python -m stemset_assets.cli.quickstart``: the main job on whatever config is in force.

Registers every input of every profile as a ``recordings`` partition (what the
``new_recordings`` sensor does on a schedule), materialises ``recording`` and the profile's
default stems for each in this process, then the ``catalog``, and prints where things landed.
With local storage and an empty ``inputs/<first profile>/`` it first writes a synthesised demo
take there, so a fresh clone has something to separate.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from gpu_worker.stores.base import ObjectStore

from ..config import StemsetConfig, load_config
from ..core.layout import CATALOG_CSV, OUTPUTS, input_prefix
from ..core.partition_keys import assign_partition_keys, list_inputs
from ..defs.partitions import RECORDINGS_PARTITIONS
from ..defs.resources.media_store import MediaStoreResource
from ..defs.runs import dagster_instance, materialize_catalog, materialize_in_process

DEMO_NAME = "demo take.wav"


def demo_take(seconds: float = 8.0, sr: int = 44100) -> np.ndarray:
    """A few bars of bass, chords and a click: enough for every stem to get something."""
    t = np.arange(int(seconds * sr)) / sr
    bass = 0.3 * np.sin(2 * np.pi * 55 * t)
    chord = sum(0.1 * np.sin(2 * np.pi * f * t) for f in (220, 277.2, 329.6)) * (t % 1.0 < 0.6)
    click = 0.5 * np.exp(-60 * (t % 0.5)) * np.sin(2 * np.pi * 1800 * t)
    mono = bass + chord + click
    return np.stack([mono, 0.9 * mono], axis=1).astype(np.float32)


def ensure_demo_input(config: StemsetConfig, store: ObjectStore) -> str | None:
    """Write the demo take into the first profile's inputs when storage is local and it is empty."""
    if config.storage.backend != "local" or not config.profiles:
        return None
    profile = next(iter(config.profiles))
    if list_inputs(store, profile):
        return None
    key = input_prefix(profile) + DEMO_NAME
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / DEMO_NAME
        sf.write(str(path), demo_take(), 44100, subtype="PCM_24")
        store.upload(path, key)
    return key


def main() -> int:
    config = load_config()
    store = MediaStoreResource.from_config(config).get_store()
    demo = ensure_demo_input(config, store)
    if demo:
        print(f"wrote a demo input: {store.uri(demo)}")
    instance = dagster_instance(config)
    print(f"Dagster instance: {instance.root_directory}")
    failed = 0
    for name, profile in config.profiles.items():
        existing = instance.get_dynamic_partitions(RECORDINGS_PARTITIONS)
        keys = list(assign_partition_keys(name, list_inputs(store, name), existing).values())
        if not keys or not profile.strategies:
            continue
        with tqdm(total=len(keys), desc=f"{name}: {', '.join(profile.strategies)}", unit="file") as bar:

            def advance(done: int, total: int, outcome) -> None:
                bar.update(1)
                if not outcome.success:
                    tqdm.write(f"failed: {outcome.partition}: {outcome.error}")

            outcomes = materialize_in_process(config, instance, keys, profile.strategies, progress=advance)
        failed += sum(not o.success for o in outcomes)
    catalog = materialize_catalog(config, instance)
    if not catalog.success:
        print(f"catalog failed: {catalog.error}", file=sys.stderr)
        return 1
    print(
        f"catalog: {store.uri(CATALOG_CSV)}; stems under {OUTPUTS}/ in {store.uri(CATALOG_CSV).rsplit('/catalog/', 1)[0]}"
    )
    print("Browse the runs and assets with: dagster dev -w workspace.yaml")
    if failed:
        print(f"{failed} recording(s) failed: see the 'failed:' lines above.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
