"""Listing a large part of a remote bucket in parallel: one LIST per key prefix.

An S3 listing returns 1,000 keys a page, and each page needs the previous page's continuation
token, so listing 700,000 objects under one prefix is 700 round trips in a row (a minute and a
half at ~130 ms a page). The objects a status needs live under names it already knows (the
partitions' slugs, the inputs the recordings name), so :func:`prefixes_for` turns those names into
a few dozen prefixes that start every one of them, and :func:`list_prefixes` lists those prefixes
on a thread pool. Objects whose names start with none of the prefixes are not listed: no row is
about them.

This module imports no Dagster.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from gpu_worker.stores.base import ObjectInfo, ObjectStore

NAMES_PER_PREFIX = 250  # below this many names a prefix, more LIST calls cost more than they overlap
MAX_PREFIXES = 256


def prefixes_for(names: Collection[str], want: int, most: int | None = None) -> list[str]:
    """Prefixes (sorted) such that every name, followed by ``/``, starts with one of them: each
    name's first ``n`` characters, or the whole name and a ``/`` when it is shorter, for the
    smallest ``n`` that gives at least ``want`` prefixes (or one per name, if fewer). Where that
    ``n`` gives more than ``most``, the ``n`` before it: names with a long common start jump from a
    few prefixes to many (``take_1`` ... ``take_5000``: 9, then 100), and 100 LISTs of 50 names
    cost more CPU than 9 of 550. Names without ``/`` (slugs) give prefixes none of which starts
    another, so no object is listed twice; other names (input keys in folders) may overlap,
    which only lists some objects twice."""
    if not names:
        return []
    longest = max(map(len, names))
    fewer: set[str] | None = None
    for n in range(1, longest + 1):
        found = {name[:n] if len(name) >= n else f"{name}/" for name in names}
        if len(found) >= want:
            return sorted(fewer if fewer and most is not None and len(found) > most else found)
        fewer = found
    return sorted(f"{name}/" for name in set(names))


def shard_prefixes(names: Collection[str], threads: int) -> list[str]:
    """:func:`prefixes_for` the names, as many as keep ``threads`` busy and no more than pay for
    their calls (at least :data:`NAMES_PER_PREFIX` names a prefix where the names allow)."""
    return prefixes_for(names, shard_count(len(names), threads), most=min(MAX_PREFIXES, len(names) // NAMES_PER_PREFIX))


def shard_count(names: int, threads: int) -> int:
    """How many prefixes to list ``names`` names under: enough to keep ``threads`` busy, and no
    more than pays for its extra calls."""
    return max(1, min(MAX_PREFIXES, 2 * threads, names // NAMES_PER_PREFIX))


def list_prefixes(store: ObjectStore, prefixes: Sequence[str], threads: int) -> Iterator[ObjectInfo]:
    """Every object under each prefix, the prefixes listed ``threads`` at a time (a prefix's
    objects together, in the store's order)."""
    if threads <= 1 or len(prefixes) <= 1:
        for prefix in prefixes:
            yield from store.list(prefix)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(prefixes))) as pool:
        for listed in pool.map(lambda prefix: list(store.list(prefix)), prefixes):
            yield from listed
