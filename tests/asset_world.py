"""The small world the asset tests materialise in: a config with every strategy, tiny Demucs
models (one that answers NaN), a local or SeaweedFS media store, an ephemeral Dagster instance,
and readers for what a run reported. A test module that imports a ``*_fixture`` function has that
fixture under its ``name`` (the parameters then shadow no import)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from dagster import (
    DagsterEventType,
    DagsterInstance,
    materialize,
)

from gpu_worker.stores.base import ObjectStore
from stemset_assets.config import StemsetConfig, load_config
from stemset_assets.core.partition_keys import assign_partition_keys, list_inputs
from stemset_assets.defs.assets.catalog import build_catalog_asset
from stemset_assets.defs.assets.recording import recording
from stemset_assets.defs.assets.stems import build_stems_asset
from stemset_assets.defs.partitions import RECORDINGS_PARTITIONS
from stemset_assets.defs.resources import MediaStoreResource, SeparatorResource
from tests.audio_fixtures import music_like, write_audio
from tests.model_fixtures import make_model_repo, save_model, tiny_htdemucs

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "Böse Take, #1 [final]|mix.flac"

CONFIG = """
storage:
  backend: local
  local: {root: ./media}
models:
  repo: %(repo)s
profiles:
  h4n:
    strategies: [htdemucs]
    output: {format: flac}
  memos:
    strategies: [htdemucs_6s]
    output: {format: m4a, bitrate: 96}
strategies:
  htdemucs:
    _: htdemucs
    drums: drums
    bass: bass
    other: other
    vocals: vocals
    __params: {shifts: 1, overlap: 0.25}
  htdemucs_ft:
    _: htdemucs_ft
    drums: drums
    bass: bass
    other: other
    vocals: vocals
  htdemucs_6s:
    _: htdemucs_6s
    drums: drums
    bass: bass
    other: other
    vocals: vocals
    guitar: guitar
    piano: piano
  vocals_guitar_piano:
    _: htdemucs_ft
    drums: drums
    bass: bass
    vocals: vocals
    other:
      _: htdemucs_6s
      guitar: guitar
      piano: piano
      other: other
"""

NAN_STRATEGY = """
  nan_probe:
    _: nan_demucs
    drums: drums
    bass: bass
    other: other
    vocals: vocals
"""


@pytest.fixture(scope="module", name="model_repo")
def model_repo_fixture(tmp_path_factory) -> Path:
    repo = make_model_repo(tmp_path_factory.mktemp("models"))
    broken = tiny_htdemucs(seed=99)
    for p in broken.parameters():
        p.data.fill_(float("nan"))
    save_model(broken, repo, "0dd0beef")
    (repo / "nan_demucs.yaml").write_text("models: ['0dd0beef']\n")
    return repo


def write_config(folder: Path, repo: Path, extra: str = "", replace: tuple[str, str] | None = None) -> StemsetConfig:
    text = CONFIG % {"repo": repo} + extra
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(text)
    return load_config(path, env={})


# --------------------------------------------------------------------------- a small world


@dataclass
class World:
    config: StemsetConfig
    media: MediaStoreResource
    instance: DagsterInstance
    tmp: Path

    @property
    def store(self) -> ObjectStore:
        return self.media.get_store()

    def resources(self) -> dict:
        return {"media_store": self.media, "separator": SeparatorResource()}

    def put_input(self, key: str, wav: np.ndarray, sr: int) -> None:
        local = self.tmp / "upload" / Path(key).name
        local.parent.mkdir(parents=True, exist_ok=True)
        write_audio(local, wav, sr)
        self.store.upload(local, key)

    def register(self, profile: str) -> dict[str, str]:
        """What the new-input sensor does: partition keys for the profile's inputs, added to the instance."""
        existing = self.instance.get_dynamic_partitions(RECORDINGS_PARTITIONS)
        keys = assign_partition_keys(profile, list_inputs(self.store, profile), existing)
        self.instance.add_dynamic_partitions(RECORDINGS_PARTITIONS, [k for k in keys.values() if k not in existing])
        return keys

    def run(self, pk: str, strategies=None, config: StemsetConfig | None = None, with_recording=True, **kw):
        config = config or self.config
        names = list(config.strategies) if strategies is None else strategies
        assets = ([recording] if with_recording else []) + [build_stems_asset(config, n) for n in names]
        return materialize(assets, instance=self.instance, partition_key=pk, resources=self.resources(), **kw)

    def run_catalog(self, config: StemsetConfig | None = None):
        return materialize(
            [build_catalog_asset(config or self.config)], instance=self.instance, resources=self.resources()
        )


def local_world(tmp: Path, config: StemsetConfig) -> World:
    return World(config, MediaStoreResource(backend="local", root=str(tmp / "media")), DagsterInstance.ephemeral(), tmp)


def s3_media(seaweed) -> MediaStoreResource:
    """The media store resource for a new bucket on the test's SeaweedFS server."""
    return MediaStoreResource(
        backend="s3",
        endpoint_url=seaweed.endpoint_url,
        bucket=seaweed.make_bucket(),
        region=seaweed.region,
        access_key_id=seaweed.access_key_id,
        secret_access_key=seaweed.secret_access_key,
        max_attempts=2,
    )


def s3_world(tmp: Path, config: StemsetConfig, seaweed) -> World:
    return World(config, s3_media(seaweed), DagsterInstance.ephemeral(), tmp)


def materializations(result) -> dict[str, object]:
    out = {}
    for ev in result.get_asset_materialization_events():
        m = ev.event_specific_data.materialization
        out[m.asset_key.to_user_string()] = m
    return out


def meta(m, key):
    return m.metadata[key].value


def check_results(result) -> dict[tuple[str, str], object]:
    return {(ev.asset_key.to_user_string(), ev.check_name): ev for ev in result.get_asset_check_evaluations()}


def failure_text(result) -> str:
    parts = []
    for ev in result.all_events:
        if ev.event_type == DagsterEventType.STEP_FAILURE:
            data = ev.event_specific_data
            if data.user_failure_data is not None:
                parts.append(data.user_failure_data.description or "")
            if data.error is not None:
                parts.append(data.error.message)
    return "\n".join(parts)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- end to end, both stores


@pytest.fixture(params=["local", "s3"], name="world")
def world_fixture(request, tmp_path, model_repo) -> World:
    config = write_config(tmp_path / "cfg", model_repo)
    if request.param == "local":
        return local_world(tmp_path, config)
    return s3_world(tmp_path, config, request.getfixturevalue("seaweed"))


@pytest.fixture(name="small_world")
def small_world_fixture(tmp_path, model_repo) -> World:
    world = local_world(tmp_path, write_config(tmp_path / "cfg", model_repo))
    world.put_input("inputs/h4n/take3.wav", music_like(2.0, seed=7), 44100)
    assert world.register("h4n") == {"inputs/h4n/take3.wav": "h4n/take3"}
    return world
