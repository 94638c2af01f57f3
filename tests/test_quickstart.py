"""The README's first command runs the main job on the embedded defaults: here its Python half
(``python -m stemset_assets.cli.quickstart``) in a fresh folder with the shipped config.yaml, the
tiny demo models and a SQLite instance, twice (the second run reuses every stem)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
from dagster import DagsterInstance

from gpu_worker.demo_models import make_model_repo
from stemset_assets.defs.partitions import RECORDINGS_PARTITIONS

ROOT = Path(__file__).resolve().parent.parent


def _quickstart(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stemset_assets.cli.quickstart"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_quickstart_separates_the_demo_take_and_writes_the_catalog(tmp_path):
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEMSET_", "DAGSTER_"))}
    env.update(PYTHONPATH=str(ROOT), STEMSET_MODEL_REPO=str(make_model_repo(tmp_path / "models")))
    first = _quickstart(tmp_path, env)
    assert first.returncode == 0, first.stderr[-3000:]
    media = tmp_path / "media"
    assert (media / "inputs/h4n/demo take.wav").is_file()
    stems = sorted(p.name for p in (media / "outputs/h4n/demo_take/htdemucs").rglob("*") if p.is_file())
    assert stems == ["bass.m4a", "drums.m4a", "manifest.json", "other.m4a", "vocals.m4a"]
    catalog = pd.read_csv(media / "catalog/catalog.csv")
    row = catalog[(catalog.partition == "h4n/demo_take") & (catalog.strategy == "htdemucs")].iloc[0]
    assert row.state == "current" and row.duration_s == 8.0
    home = tmp_path / ".dagster_home"
    instance = DagsterInstance.from_config(str(home))
    assert instance.get_dynamic_partitions(RECORDINGS_PARTITIONS) == ["h4n/demo_take"]
    runs = instance.get_runs()
    assert len(runs) == 2 and all(r.is_success for r in runs)

    manifest_mtime = (media / "outputs/h4n/demo_take/htdemucs/manifest.json").stat().st_mtime_ns
    second = _quickstart(tmp_path, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing" in (home / "quickstart.log").read_text()  # Dagster's log goes to a file now
    assert (media / "outputs/h4n/demo_take/htdemucs/manifest.json").stat().st_mtime_ns == manifest_mtime
    assert len(list((media / "inputs/h4n").iterdir())) == 1
