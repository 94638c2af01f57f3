"""Reading what a published ``manifest.json`` says: the set it lists, and what a new set replaces."""

from __future__ import annotations

from .errors import JobError
from .job import SeparationResult
from .stores.base import ObjectStore


def read_manifest(
    store: ObjectStore, key: str, unreadable: tuple[type[Exception], ...] = (JobError,)
) -> SeparationResult | None:
    """The published result at ``key``, or None when there is none (or reading it after the
    listing raised one of ``unreadable``: by default, only a document that is not a result).
    A store that is down raises. Fields a later version added are ignored, so an older worker
    still sees the set."""
    if store.head(key) is None:
        return None
    try:
        return SeparationResult.from_json(store.get_bytes(key), strict=False)
    except unreadable:
        return None


def superseded(store: ObjectStore, prefix: str, mkey: str, new_keys: set[str]) -> list[str]:
    """What the new manifest replaces: the stems the current one lists, and what it said it
    replaced that a kill left in place (so a sweep can delete them however the kill fell)."""
    before = read_manifest(store, mkey)
    if before is None:
        return []
    old = {f.key for f in before.stems.values()} | set(before.replaces)
    present = {info.key for info in store.list(prefix + "/")} if before.replaces else old
    return sorted((old & present) - new_keys)
