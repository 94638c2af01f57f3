"""The ``recordings`` dynamic partitions (one per input file; keys from
:mod:`stemset_assets.core.partition_keys`) and registering new keys on an instance."""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg

RECORDINGS_PARTITIONS = "recordings"
recordings = dg.DynamicPartitionsDefinition(name=RECORDINGS_PARTITIONS)


def register_partitions(instance: dg.DagsterInstance, keys: Iterable[str]) -> list[str]:
    """Add the keys not yet in ``recordings`` in one request; returns those added."""
    existing = set(instance.get_dynamic_partitions(RECORDINGS_PARTITIONS))
    new = list(dict.fromkeys(k for k in keys if k not in existing))
    if new:
        instance.add_dynamic_partitions(RECORDINGS_PARTITIONS, new)
    return new
