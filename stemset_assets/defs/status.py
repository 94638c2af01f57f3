"""The state of every stem set, as Dagster's side reads it: partitions from the instance, facts
from the store (:mod:`stemset_assets.core.status`), and the parsed small documents cached in the
instance's key-value store so a warm call reads only what changed.

The cache is one value per media store under :data:`CACHE_KEY`: ``{object key: [etag, facts]}``.
An entry is used only while the listing shows the same ETag, so it can be stale only in the
sense of costing a re-read, never of hiding a change. In production (Postgres) the webserver,
daemon and CLI share it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dagster import DagsterInstance

from gpu_worker.stores.base import ObjectStore

from ..config import StemsetConfig
from ..core.layout import OUTPUTS
from ..core.set_facts import MemoryFactCache, paused_gc
from ..core.status import SetStatus, status_rows
from .partitions import RECORDINGS_PARTITIONS
from .resources.media_store import open_store

CACHE_KEY = "stemset/set_facts/v1/"


class InstanceFactCache(MemoryFactCache):
    """A :class:`MemoryFactCache` loaded from and saved to the instance's key-value store."""

    def __init__(self, instance: DagsterInstance, store: ObjectStore):
        self.instance, self.key = instance, CACHE_KEY + store.uri(OUTPUTS)
        try:
            raw = instance.daemon_cursor_storage.get_cursor_values({self.key}).get(self.key)
            stored = json.loads(raw) if raw else {}
        except Exception:  # noqa: BLE001 - a cache: an instance without a usable store just reads the objects
            stored = {}
        super().__init__()
        # Entries stay the [etag, facts] lists JSON gave (checked as they are used, in get): at
        # 100,000 partitions, rebuilding 200,000 of them as tuples cost a warm status ~0.5 s.
        self.entries = stored if isinstance(stored, dict) else {}

    def get(self, key: str, etag: str) -> dict[str, Any] | None:
        hit = self.entries.get(key)
        if isinstance(hit, (list, tuple)) and len(hit) == 2 and hit[0] == etag and isinstance(hit[1], dict):
            return hit[1]
        return None

    def save(self) -> None:
        if not self.changed:
            return
        try:
            data = json.dumps(self.entries, separators=(",", ":"))  # tuples from put() are lists in JSON
            self.instance.daemon_cursor_storage.set_cursor_values({self.key: data})
        except Exception:  # noqa: BLE001 - failing to store it costs the next call time, not correctness
            return
        self.changed = False


def read_status(
    instance: DagsterInstance,
    config: StemsetConfig,
    strategies: Sequence[str] | None = None,
    profile: str | None = None,
    *,
    store: ObjectStore | None = None,
    partitions: Sequence[str] | None = None,
    also_wanted: Sequence[str] = (),
) -> list[SetStatus]:
    """:func:`~stemset_assets.core.status.status_rows` over the instance's ``recordings`` partitions
    (or ``partitions``), with the instance's fact cache."""
    store = store if store is not None else open_store(config)
    keys = list(partitions) if partitions is not None else list(instance.get_dynamic_partitions(RECORDINGS_PARTITIONS))
    with paused_gc():  # the cache's JSON is ~200,000 small objects at 100,000 partitions: see paused_gc
        cache = InstanceFactCache(instance, store)
        rows = status_rows(store, config, keys, strategies, profile, cache, also_wanted=also_wanted)
        cache.save()
    return rows
