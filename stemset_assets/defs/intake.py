"""Taking in a file from outside the bucket: the upload to ``inputs/<profile>/`` and its
``recordings`` partition key (the same key the new-input sensor would give it).

The name and content checks are :mod:`stemset_assets.core.uploads`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dagster import DagsterInstance

from gpu_worker.stores.base import ObjectStore

from ..core.layout import input_prefix
from ..core.partition_keys import assign_partition_keys, list_inputs
from ..core.uploads import safe_filename
from .partitions import RECORDINGS_PARTITIONS, register_partitions


@dataclass(frozen=True)
class Ingested:
    object_key: str  # inputs/<profile>/<name>
    partition: str  # <profile>/<slug>


def ingest_file(
    store: ObjectStore, instance: DagsterInstance, profile: str, path: Path, name: str | None = None
) -> Ingested:
    """Upload ``path`` to ``inputs/<profile>/<safe name>`` and register its partition key (a file
    of the same name is replaced, which makes its recording and stems stale)."""
    object_key = input_prefix(profile) + safe_filename(name or path.name)
    store.upload(path, object_key)
    existing = instance.get_dynamic_partitions(RECORDINGS_PARTITIONS)
    key = assign_partition_keys(profile, list_inputs(store, profile), existing)[object_key]
    register_partitions(instance, [key])
    return Ingested(object_key, key)
