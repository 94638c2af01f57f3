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
from ..core.set_facts import MemoryFactCache
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
        entries = (
            {k: (v[0], v[1]) for k, v in stored.items() if isinstance(v, list) and len(v) == 2}
            if isinstance(stored, dict)
            else {}
        )
        super().__init__(entries)

    def save(self) -> None:
        if not self.changed:
            return
        data: dict[str, Any] = {k: [etag, value] for k, (etag, value) in self.entries.items()}
        try:
            self.instance.daemon_cursor_storage.set_cursor_values({self.key: json.dumps(data, separators=(",", ":"))})
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
    cache = InstanceFactCache(instance, store)
    rows = status_rows(store, config, keys, strategies, profile, cache, also_wanted=also_wanted)
    cache.save()
    return rows
