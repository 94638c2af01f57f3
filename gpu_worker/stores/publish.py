"""Publishing a complete set of objects so that a kill at any point leaves nothing half-visible.

A set lives under a prefix (``outputs/h4n/take3/htdemucs``) as its objects plus ``manifest.json``,
the only thing readers start from. The new layout (what the worker writes) gives every attempt
its own **set folder** and makes the manifest the single commit point::

    <prefix>/.staging/<job>.<nonce>/vocals.m4a     1. upload every object here (never read, never served)
    <prefix>/v-<job>.<nonce>/vocals.m4a            2. copy (S3) or rename (local) into a fresh set folder
    <prefix>/manifest.json                         3. one PUT that lists the set folder's keys: the commit
                                                   4. delete the old set and the staging copies

A PUT replaces an object atomically on S3 and a rename does locally, so after a kill at any
step the manifest lists either the complete old set or the complete new one: nothing is renamed
on S3, and no reader ever follows a manifest to a missing stem. What a kill leaves behind
(staging objects, a set folder no manifest lists, the old set after step 3) is invisible to
readers and removed by :func:`sweep`, which each publish runs on its prefix once committed: leftovers
of earlier attempts of the same job at once (attempts of one job never overlap: a caller resubmits
a job only when its worker is gone), anything else once it is ``grace_s`` old (another job may
still be between its steps 2 and 3).

The flat layout (``final`` keys that already hold the previous set, as ``stemset separate`` writes
into a plain folder) cannot switch atomically: there the old manifest is deleted first, so a
kill between steps leaves no manifest (the set reads missing; a rerun repairs it).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Mapping

from ..errors import StorageError
from ..job import MANIFEST_NAME
from .base import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

STAGING_DIR = ".staging"
SET_DIR_PREFIX = "v-"
SWEEP_GRACE_ENV = "STEMSET_SWEEP_GRACE_S"
DEFAULT_SWEEP_GRACE_S = 3600.0


def hidden_key(key: str) -> bool:
    """Whether ``key`` is staging, never part of a published set (and never served)."""
    return STAGING_DIR in key.split("/")


def new_attempt(job_id: str) -> str:
    """A name for one attempt of a job: ``<job_id>.<8 hex>`` (a retry of the job gets a new one)."""
    if not job_id or "/" in job_id:
        raise StorageError(f"Invalid job id {job_id!r} for a staging key.", "Use a non-empty id without '/'.")
    return f"{job_id}.{secrets.token_hex(4)}"


def _job_of(attempt: str) -> str:
    return attempt.rsplit(".", 1)[0]


def staging_key(final_key: str, job_id: str) -> str:
    """Where a job stages ``final_key`` before :func:`publish_set`:
    ``outputs/h4n/take3/htdemucs/vocals.m4a`` -> ``outputs/h4n/take3/htdemucs/.staging/<job_id>/vocals.m4a``.
    """
    if not job_id or "/" in job_id:
        raise StorageError(f"Invalid job id {job_id!r} for a staging key.", "Use a non-empty id without '/'.")
    head, _, name = final_key.rpartition("/")
    return f"{head}/{STAGING_DIR}/{job_id}/{name}" if head else f"{STAGING_DIR}/{job_id}/{name}"


def set_key(prefix: str, attempt: str, name: str) -> str:
    """The published key of ``name`` in an attempt's set folder: ``<prefix>/v-<attempt>/<name>``."""
    return f"{prefix.rstrip('/')}/{SET_DIR_PREFIX}{attempt}/{name}"


def manifest_keys(data: bytes | None) -> set[str]:
    """The object keys a manifest lists (``stems.<name>.key``); empty when it lists none or is unreadable."""
    if not data:
        return set()
    try:
        doc = json.loads(data)
        return {str(s["key"]) for s in doc["stems"].values()}
    except (ValueError, TypeError, KeyError, AttributeError):
        return set()


def replaced_keys(data: bytes | None) -> set[str]:
    """The keys a manifest says it replaced (``replaces``): superseded, never to be listed again."""
    try:
        return {str(k) for k in json.loads(data or b"{}").get("replaces") or ()}
    except (ValueError, TypeError, AttributeError):
        return set()


def _read(store: ObjectStore, key: str) -> bytes | None:
    try:
        return store.get_bytes(key) if store.head(key) is not None else None
    except StorageError:
        if store.head(key) is None:
            return None
        raise


def publish_set(
    store: ObjectStore,
    staged: Mapping[str, str],
    final: Mapping[str, str],
    manifest_key: str,
    manifest: bytes,
) -> None:
    """Publish the staged objects under their final keys, then the manifest (the commit point).

    ``staged`` and ``final`` map the same names (e.g. stem names) to a staging key and a final key.

    1. check every staged object exists (nothing published is touched before this passes);
    2. if a final key already holds an object (the flat layout: the old set is overwritten in
       place), delete the old manifest first, so no manifest ever lists a half-replaced set;
       with fresh final keys (a set folder) the old manifest stays until step 5 replaces it;
    3. copy each staged object to its final key (a rename on a local store, a server-side copy
       on S3), then 4. check they all arrived;
    5. write the manifest: from here readers see the new set, complete;
    6. delete the old set's objects the new manifest does not list, the staged copies, and (by
       :func:`sweep`) what earlier attempts of the same job left (best effort: failures are logged,
       the new set stays published).

    A failure in steps 1-4 raises with what is published now: the old set (fresh final keys) or
    no set (in-place publish); staged copies stay for a retry or the sweep.
    """
    if set(staged) != set(final):
        raise StorageError(
            f"publish_set needs the same names in staged and final; got {sorted(staged)} and {sorted(final)}."
        )
    missing = [key for key in staged.values() if store.head(key) is None]
    if missing:
        raise StorageError(
            f"Cannot publish {manifest_key!r}: staged objects are missing: {missing}. Nothing was changed: "
            "the previously published set (if any) is still in place.",
            "Every object must be staged before the set is published; run the job again.",
        )
    old_manifest = _read(store, manifest_key)
    old_keys = manifest_keys(old_manifest)
    in_place = any(src != dst and store.head(dst) is not None for src, dst in zip_names(staged, final))
    if in_place:
        store.delete(manifest_key)
    done: list[str] = []
    try:
        for src, dst in zip_names(staged, final):
            if src != dst:
                store._publish_object(src, dst)
                done.append(dst)
        absent = [dst for dst in final.values() if store.head(dst) is None]
        if absent:
            raise StorageError(f"objects vanished right after they were published: {absent}")
        store.put_bytes(manifest_key, manifest, content_type="application/json")
    except StorageError as err:
        now = (
            "no set is published there now (the old manifest was removed before its objects were replaced)"
            if in_place or old_manifest is None
            else "the previously published set is still the one its manifest lists"
        )
        raise StorageError(
            f"Publishing {manifest_key!r} failed after {len(done)} of {len(final)} object(s) were put in place, "
            f"before its manifest was written: {err.message} So {now}; the new objects are not listed by any "
            "manifest, so no reader sees them.",
            "Run the job again: a retry publishes the complete set and removes these leftovers.",
        ) from err
    home = manifest_key.rpartition("/")[0] + "/"
    stale = sorted(k for k in old_keys - set(final.values()) if k.startswith(home))
    leftovers = [k for k in stale if not hidden_key(k)] + [s for s, d in zip_names(staged, final) if s != d]
    for key in leftovers:
        try:
            store.delete(key)
        except StorageError as err:
            log.warning("Published %s but could not delete %s: %s", manifest_key, key, err)
    attempts = {where[1] for where in map(_set_prefix, staged.values()) if where is not None and where[1]}
    if len(attempts) == 1:  # earlier, interrupted attempts of this job (and old leftovers of others)
        (attempt,) = attempts
        try:
            sweep(store, home, job_id=_job_of(attempt), keep_attempt=attempt)
        except StorageError as err:
            log.warning("Published %s but could not sweep its leftovers: %s", manifest_key, err)


def zip_names(staged: Mapping[str, str], final: Mapping[str, str]) -> list[tuple[str, str]]:
    return [(staged[name], final[name]) for name in sorted(staged)]


def sweep_grace_s() -> float:
    """``$STEMSET_SWEEP_GRACE_S`` (default 3600): how old another job's leftovers must be to sweep."""
    raw = os.environ.get(SWEEP_GRACE_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_SWEEP_GRACE_S
    except ValueError:
        value = -1.0
    if value < 0:
        raise StorageError(f"{SWEEP_GRACE_ENV}={raw!r} must be a number of seconds >= 0.")
    return value


def _set_prefix(key: str) -> tuple[str, str] | None:
    """(set prefix, attempt) for a staging object or a set-folder object, else None."""
    parts = key.split("/")
    if STAGING_DIR in parts:
        i = parts.index(STAGING_DIR)
        return "/".join(parts[:i]), parts[i + 1] if i + 2 < len(parts) else ""
    if len(parts) >= 3 and parts[-2].startswith(SET_DIR_PREFIX):
        return "/".join(parts[:-2]), parts[-2][len(SET_DIR_PREFIX) :]
    return None


def sweep(
    store: ObjectStore,
    prefix: str,
    *,
    job_id: str | None = None,
    keep_attempt: str | None = None,
    grace_s: float | None = None,
    now: float | None = None,
) -> list[str]:
    """Delete what interrupted publishes left under ``prefix`` (one set's prefix, or a whole tree
    such as ``outputs/``): staging objects, and set-folder objects no manifest lists. At once: the
    objects of earlier attempts of ``job_id`` (except ``keep_attempt``, the caller's own) and
    those the manifest says it replaced; any other once it is ``grace_s`` old (default
    :func:`sweep_grace_s`: another job may be between its copies and its manifest). Returns the
    keys deleted."""
    grace = sweep_grace_s() if grace_s is None else grace_s
    now = time.time() if now is None else now
    scope = prefix.rstrip("/") + "/" if prefix else ""
    candidates: dict[str, list[tuple[ObjectInfo, str]]] = {}
    for info in store.list(scope):
        where = _set_prefix(info.key)
        if where is not None:
            candidates.setdefault(where[0], []).append((info, where[1]))
    deleted: list[str] = []
    for set_prefix, infos in sorted(candidates.items()):
        doc = _read(store, f"{set_prefix}/{MANIFEST_NAME}" if set_prefix else MANIFEST_NAME)
        listed, superseded = manifest_keys(doc), replaced_keys(doc)
        for info, attempt in infos:
            if info.key in listed or (keep_attempt is not None and attempt == keep_attempt):
                continue
            mine = job_id is not None and attempt and _job_of(attempt) == job_id
            if mine or info.key in superseded or now - info.last_modified >= grace:
                try:
                    store.delete(info.key)
                    deleted.append(info.key)
                except StorageError as err:
                    log.warning("Sweep could not delete %s: %s", info.key, err)
    return deleted
