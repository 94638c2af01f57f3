"""``python -m stemset_assets.cli.quickstart``: the main job on whatever config is in force.

Registers every input of every profile as a ``recordings`` partition (what the
``new_recordings`` sensor does on a schedule), materialises ``recording`` and the profile's
default stems for each in this process, then the ``catalog``, and prints where things landed.
With local storage and an empty ``inputs/<first profile>/`` it first writes a synthesised demo
take there, so a fresh clone has something to separate.

Dagster's own log (and any traceback) goes to ``$DAGSTER_HOME/quickstart.log``; the terminal
shows a progress bar per profile that says FAILED when a run fails, and one line per failure.
Without network (the model download fails) it says so once and names ``STEMSET_DEMO_MODELS=1``.
``--demo-models`` builds tiny random-weight models and writes ``.stemset/demo-config.yaml`` (the
config in force with ``models.repo`` pinned to them), so the demo's sets read current afterwards
under that config.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

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
DEMO_DIR = Path(".stemset")
OFFLINE_HINT = (
    "Could not download the Demucs model weights (no network?). Run the demo offline with tiny "
    "random-weight models: STEMSET_DEMO_MODELS=1 bash scripts/quickstart.sh; or point "
    "STEMSET_MODEL_REPO at a folder of Demucs weights (README: Model weights)."
)


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


def write_demo_config(config: StemsetConfig, repo: Path, folder: Path = DEMO_DIR) -> Path:
    """The config in force with ``models.repo`` pinned to ``repo`` (and a relative local root made
    absolute, since the file lives elsewhere): the demo's fingerprints then stay what they were."""
    import yaml

    from ..config.loading import DEFAULT_CONFIG_YAML

    text = config.path.read_text(encoding="utf-8") if config.path is not None else DEFAULT_CONFIG_YAML
    data = yaml.safe_load(text) or {}
    data.setdefault("models", {})
    data["models"] = {**(data["models"] or {}), "repo": str(repo.absolute())}
    storage = data.setdefault("storage", {}) or {}
    storage.setdefault("local", {})
    storage["local"] = {**(storage["local"] or {}), "root": str(config.storage.local.root)}
    data["storage"] = storage
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "demo-config.yaml"
    out.write_text(
        "# Written by the quickstart with STEMSET_DEMO_MODELS=1: config.yaml with the tiny demo models pinned.\n"
        + yaml.safe_dump(data, sort_keys=False),
        encoding="utf-8",
    )
    return out


@contextlib.contextmanager
def logs_to_file(path: Path) -> Iterator[TextIO]:
    """Send this process's stderr (Dagster's console log, warnings, tracebacks) to ``path``;
    yields a stream on the real terminal for progress and messages."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield terminal
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        terminal.close()


def failure_line(partition: str, error: str | None) -> str:
    text = " ".join((error or "failed").split())
    if "download servers (no network?)" in text:
        return OFFLINE_HINT
    return f"failed: {partition}: {text[:400]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stemset_assets.cli.quickstart")
    parser.add_argument("--demo-models", action="store_true", help="tiny random-weight models (offline)")
    args = parser.parse_args(argv)
    config = load_config()
    if args.demo_models:
        from gpu_worker.demo_models import make_model_repo

        repo = make_model_repo(DEMO_DIR / "demo-models")
        path = write_demo_config(config, repo)
        os.environ["STEMSET_CONFIG"] = str(path.absolute())
        os.environ.pop("STEMSET_MODEL_REPO", None)
        config = load_config()
        print(f"demo models in {repo}; config with them pinned: {path}")
        print(f"  (use STEMSET_CONFIG={path} with stemset and dagster commands so the demo's sets read current)")
    store = MediaStoreResource.from_config(config).get_store()
    demo = ensure_demo_input(config, store)
    if demo:
        print(f"wrote a demo input: {store.uri(demo)}")
    instance = dagster_instance(config)
    log_path = Path(instance.root_directory) / "quickstart.log"
    print(f"Dagster instance: {instance.root_directory} (its log: {log_path})")
    failed = 0
    messages: list[str] = []
    with logs_to_file(log_path) as terminal:
        for name, profile in config.profiles.items():
            existing = instance.get_dynamic_partitions(RECORDINGS_PARTITIONS)
            keys = list(assign_partition_keys(name, list_inputs(store, name), existing).values())
            if not keys or not profile.strategies:
                continue
            desc = f"{name}: {', '.join(profile.strategies)}"
            with tqdm(total=len(keys), desc=desc, unit="file", file=terminal) as bar:

                def advance(done: int, total: int, outcome, bar=bar, desc=desc) -> None:
                    if outcome.success:
                        bar.update(1)  # a failed file does not count as done: the bar never reads 100%
                        return
                    bar.set_description(f"{desc} FAILED")
                    line = failure_line(outcome.partition, outcome.error)
                    if line not in messages:
                        messages.append(line)
                        bar.write(line, file=terminal)

                outcomes = materialize_in_process(config, instance, keys, profile.strategies, progress=advance)
            failed += sum(not o.success for o in outcomes)
        catalog = materialize_catalog(config, instance)
    if not catalog.success:
        print(f"catalog failed: {' '.join((catalog.error or '').split())[:400]} (log: {log_path})", file=sys.stderr)
        return 1
    print(
        f"catalog: {store.uri(CATALOG_CSV)}; stems under {OUTPUTS}/ in {store.uri(CATALOG_CSV).rsplit('/catalog/', 1)[0]}"
    )
    print("Browse the runs and assets with: dagster dev -w workspace.yaml")
    if failed:
        print(f"{failed} recording(s) failed (above; the full log is {log_path}).", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
