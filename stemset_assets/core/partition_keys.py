"""Partition keys of the ``recordings`` dynamic partitions: one per input file, ``<profile>/<slug>``.

The slug is made from the file's path below ``inputs/<profile>/`` (extension dropped):
Unicode is decomposed (NFKD) and reduced to ASCII (``Café`` -> ``cafe``; letters without an
ASCII decomposition are dropped), lower-cased, and every run of other characters becomes one
``_``. A slug holds only ``a-z 0-9 . _ -``, never ``..``, and does not start or end with
``. _ -``; so a partition key has none of the characters the Dagster UI or a path trips on
(``, | [ ] /`` in the slug, whitespace, ``...``).

Uploads (``stemset process``, the web API) are stored as ``<name>-<12 hex digits of the content's
sha256>.<ext>`` (:func:`stemset_assets.core.uploads.content_named`), and that suffix is always kept
in the slug, so two different files never race for one key whatever their names.

Keys are stable and collision-free: a file keeps the key it was first given, and when another
file's slug is already taken (``Take 1.wav`` after ``take_1.wav``) the newcomer gets the slug
plus ``-`` and the first 8 hex digits of the sha256 of its full object key
(``h4n/take_1-3f0c9a2e``). :func:`assign_partition_keys` hands out bare slugs in arrival
order (oldest object first), and :func:`resolve_input` maps a key back to its object the
same way, so both sides agree without any extra state.

The Dagster partitions definition itself is :mod:`stemset_assets.defs.partitions`; this module
imports no Dagster.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath

from gpu_worker.errors import StorageError
from gpu_worker.stores.base import ObjectInfo, ObjectStore

from .layout import INPUTS, input_prefix, read_record

MAX_SLUG = 80
HASH_LEN = 8
_UNSAFE = re.compile(r"[^a-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")
_EDGES = "._-"
_CONTENT_HASH = re.compile(r"^(.*)-([0-9a-f]{12})$")  # core.uploads.content_named's suffix


def slugify(name: str, max_len: int = MAX_SLUG) -> str:
    """A UI- and path-safe slug of ``name`` (``"Böse Take, #1 [final].wav"`` -> ``"bose_take_1_final.wav"``)."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").lower()
    text = _UNSAFE.sub("_", text)
    text = _DOTS.sub(".", text)
    text = text.strip(_EDGES)[:max_len].rstrip(_EDGES)
    return text or "recording"


def short_hash(object_key: str) -> str:
    return hashlib.sha256(object_key.encode("utf-8")).hexdigest()[:HASH_LEN]


def relative_name(profile: str, object_key: str) -> str:
    """The object's path below ``inputs/<profile>/`` (the whole key if it is elsewhere)."""
    prefix = input_prefix(profile)
    return object_key[len(prefix) :] if object_key.startswith(prefix) else object_key


def base_slug(profile: str, object_key: str) -> str:
    """The slug before any collision suffix: the relative path without its extension."""
    rel = PurePosixPath(relative_name(profile, object_key))
    stem = str(rel.with_suffix("")) if rel.suffix and len(rel.suffix) <= 5 else str(rel)
    hashed = _CONTENT_HASH.match(stem)
    if hashed:  # an upload's content hash survives however long the name: it is what keeps keys apart
        return f"{slugify(hashed.group(1), MAX_SLUG - 13)}-{hashed.group(2)}"
    return slugify(stem)


def hashed_key(profile: str, object_key: str) -> str:
    """The collision form of the key: ``<profile>/<slug>-<hash of the object key>``."""
    base = slugify(base_slug(profile, object_key), MAX_SLUG - HASH_LEN - 1)
    return f"{profile}/{base}-{short_hash(object_key)}"


def partition_key(profile: str, object_key: str, existing_keys: Mapping[str, str | None] | Iterable[str] = ()) -> str:
    """The partition key for ``object_key`` under ``profile``: ``<profile>/<slug>``.

    ``existing_keys`` are the partition keys in use, either as a mapping to the object key
    each was made for (best: a key this object already owns is returned as is) or as plain
    keys (then a taken bare key counts as someone else's; pass only other objects' keys, or
    use :func:`assign_partition_keys`). Same inputs, same answer.
    """
    owners: Mapping[str, str | None] = (
        existing_keys if isinstance(existing_keys, Mapping) else dict.fromkeys(existing_keys)
    )
    bare = f"{profile}/{base_slug(profile, object_key)}"
    hashed = hashed_key(profile, object_key)
    if hashed in owners:  # clashed before: keep the key it got then
        return hashed
    if bare not in owners or owners[bare] == object_key:
        return bare
    return hashed


def split_partition_key(key: str) -> tuple[str, str]:
    """``"h4n/take_1"`` -> ``("h4n", "take_1")``."""
    profile, sep, slug = key.partition("/")
    if not sep or not profile or not slug or "/" in slug:
        raise ValueError(f"Partition key {key!r} is not of the form <profile>/<slug>.")
    return profile, slug


def list_inputs(store: ObjectStore, profile: str) -> list[ObjectInfo]:
    """Every input object of a profile (one paginated list), hidden names (``.x``) skipped,
    oldest first (ties by key): the order in which bare slugs are handed out."""
    infos = [
        info
        for info in store.list(input_prefix(profile))
        if not any(part.startswith(".") for part in relative_name(profile, info.key).split("/"))
    ]
    infos.sort(key=lambda info: (info.last_modified, info.key))
    return infos


def assign_partition_keys(
    profile: str,
    objects: Iterable[ObjectInfo | str],
    existing_keys: Mapping[str, str | None] | Iterable[str] = (),
) -> dict[str, str]:
    """``{object key: partition key}`` for ``objects`` of one profile, given the keys in use.

    Objects are taken oldest first (:class:`ObjectInfo` order; plain keys in the order given),
    each one's key joining the used set before the next, so the first arrival of a slug keeps
    it bare and later ones get the hash suffix. ``existing_keys`` may map keys to the objects
    they were made for; given as plain keys (e.g. the instance's dynamic partitions), the owners
    are inferred as :func:`resolve_input` does, so a sensor can call this on every tick with
    the full listing and get the same keys back.
    """
    items = list(objects)
    if items and all(isinstance(o, ObjectInfo) for o in items):
        items.sort(key=lambda o: (o.last_modified, o.key))  # type: ignore[union-attr]
    keys = [obj.key if isinstance(obj, ObjectInfo) else obj for obj in items]
    if isinstance(existing_keys, Mapping):
        owners: dict[str, str | None] = dict(existing_keys)
    else:
        # Plain keys: infer the owners the way resolve_input does. A hashed key names its
        # object; a bare key belongs to the oldest object with that slug not owning a hashed key.
        owners = dict.fromkeys(existing_keys)
        hashed_owners = {k for k in keys if hashed_key(profile, k) in owners}
        for k in keys:
            if k in hashed_owners:
                owners[hashed_key(profile, k)] = k
                continue
            bare = f"{profile}/{base_slug(profile, k)}"
            if bare in owners and owners[bare] is None:
                owners[bare] = k
    out: dict[str, str] = {}
    for key in keys:
        pk = partition_key(profile, key, owners)
        owners.setdefault(pk, key)
        out[key] = pk
    return out


def resolve_input(store: ObjectStore, key: str, existing_keys: Iterable[str] = ()) -> str:
    """The input object key behind partition ``key``.

    The recording's ``recording.json`` names it once the partition has been materialised (if
    that object still exists). Otherwise one listing of ``inputs/<profile>/`` is matched
    against the key: a hashed key names its object exactly; a bare key goes to the oldest
    object with that slug whose hashed key is not among ``existing_keys``.
    """
    profile, slug = split_partition_key(key)
    record = read_record(store, key)
    if record is not None and store.head(record.original_key) is not None:
        return record.original_key
    existing = set(existing_keys)
    bare: list[str] = []
    for info in list_inputs(store, profile):
        if hashed_key(profile, info.key) == key:
            return info.key
        if f"{profile}/{base_slug(profile, info.key)}" == key and hashed_key(profile, info.key) not in existing:
            bare.append(info.key)
    if bare:
        return bare[0]
    raise StorageError(
        f"No input object under {INPUTS}/{profile}/ matches partition {key!r}.",
        f"Upload the recording to {INPUTS}/{profile}/ again, or delete the partition if the file was removed.",
    )
