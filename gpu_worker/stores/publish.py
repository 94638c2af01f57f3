"""Publishing a complete set of objects: stage each one, then publish them with the manifest last,
so a reader that finds the manifest finds every object it lists."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ..errors import StorageError
from .base import ObjectStore

log = logging.getLogger(__name__)

STAGING_DIR = ".staging"


def staging_key(final_key: str, job_id: str) -> str:
    """Where a job stages ``final_key`` before :func:`publish_set`:
    ``outputs/h4n/take3/htdemucs/vocals.m4a`` -> ``outputs/h4n/take3/htdemucs/.staging/<job_id>/vocals.m4a``.
    """
    if not job_id or "/" in job_id:
        raise StorageError(f"Invalid job id {job_id!r} for a staging key.", "Use a non-empty id without '/'.")
    head, _, name = final_key.rpartition("/")
    return f"{head}/{STAGING_DIR}/{job_id}/{name}" if head else f"{STAGING_DIR}/{job_id}/{name}"


def publish_set(
    store: ObjectStore,
    staged: Mapping[str, str],
    final: Mapping[str, str],
    manifest_key: str,
    manifest: bytes,
) -> None:
    """Publish the staged objects under their final keys, then the manifest.

    ``staged`` and ``final`` map the same names (e.g. stem names) to a staging key (see
    :func:`staging_key`) and a final key. The steps:

    1. check every staged object exists (nothing published is touched before this passes);
    2. delete the old manifest at ``manifest_key``, if any;
    3. move each staged object to its final key (a rename on a local store, a server-side
       copy on S3);
    4. write the manifest, last;
    5. delete the staged objects (best effort: leftovers are logged, the set stays published).

    Guarantee: a manifest exists at ``manifest_key`` only when its complete set is in place.
    A failure in steps 2-4 leaves no manifest (the old one is already gone), so readers treat
    the set as missing and a retry republishes it; final objects may then be a mix of old and
    new, which is why readers must go through the manifest. The staged copies of a failed
    publish stay where they are. Readers that fetched the old manifest before step 2 may still
    read objects that step 3 is replacing.
    """
    if set(staged) != set(final):
        raise StorageError(
            f"publish_set needs the same names in staged and final; got {sorted(staged)} and {sorted(final)}."
        )
    missing = [key for key in staged.values() if store.head(key) is None]
    if missing:
        raise StorageError(
            f"Cannot publish {manifest_key!r}: staged objects are missing: {missing}.",
            "Every object must be staged before the set is published.",
        )
    store.delete(manifest_key)
    for name, src in staged.items():
        if src != final[name]:
            store._publish_object(src, final[name])
    store.put_bytes(manifest_key, manifest, content_type="application/json")
    for name, src in staged.items():
        if src == final[name]:
            continue
        try:
            store.delete(src)
        except StorageError as err:
            log.warning("Published %s but could not delete staged object %s: %s", manifest_key, src, err)
