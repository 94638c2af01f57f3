"""Taking in a file from outside the bucket: the upload to ``inputs/<profile>/`` and its
``recordings`` partition key (the same key the new-input sensor would give it).

The name and content checks are :mod:`stemset_assets.core.uploads`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dagster import DagsterInstance

from gpu_worker.hashing import file_sha256
from gpu_worker.stores.base import ObjectStore

from ..core.layout import input_prefix
from ..core.partition_keys import assign_partition_keys, list_inputs
from ..core.uploads import content_named
from .partitions import RECORDINGS_PARTITIONS, register_partitions


@dataclass(frozen=True)
class Ingested:
    object_key: str  # inputs/<profile>/<name>
    partition: str  # <profile>/<slug>


def ingest_file(
    store: ObjectStore, instance: DagsterInstance, profile: str, path: Path, name: str | None = None
) -> Ingested:
    """Upload ``path`` to ``inputs/<profile>/<safe name>-<content hash>.<ext>`` and register its
    partition key. The key is made from the content, so two files whose names normalise alike
    (``coll x.wav``, ``coll  x.wav``) never share an object or a partition, even sent at once,
    and the same file sent again is the same object (not uploaded twice)."""
    object_key = input_prefix(profile) + content_named(name or path.name, file_sha256(path))
    there = store.head(object_key)
    if there is None or there.size != path.stat().st_size:
        store.upload(path, object_key)
    existing = instance.get_dynamic_partitions(RECORDINGS_PARTITIONS)
    key = assign_partition_keys(profile, list_inputs(store, profile), existing)[object_key]
    register_partitions(instance, [key])
    return Ingested(object_key, key)
