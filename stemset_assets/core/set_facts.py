"""The facts the state rule looks at, read from the bucket (or the local media folder).

Per profile, three listings (``inputs/``, ``recordings/``, ``outputs/``) give every object's
key, size and ETag; then the small JSON documents that carry meaning (``recording.json``,
``manifest.json``, ``failure.json``) are read, in parallel, unless a :class:`FactCache` already
holds them under the same key and ETag (an object's ETag changes whenever its bytes do, so a
cached entry is valid exactly while the listing shows the same ETag). Staging objects
(``.staging/``) are never facts: they are not part of any set until published; objects of a
set folder (``v-<attempt>/``) count only when the manifest lists them.

This module imports no Dagster.
"""

from __future__ import annotations

import gc
import json
import os
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from gpu_worker.errors import StorageError
from gpu_worker.job import MANIFEST_NAME
from gpu_worker.stores.base import ObjectInfo, ObjectStore
from gpu_worker.stores.local import TMP_PREFIX as LOCAL_TMP_PREFIX
from gpu_worker.stores.local import LocalObjectStore
from gpu_worker.stores.publish import SET_DIR_PREFIX, STAGING_DIR

from .layout import FAILURE_NAME, INPUTS, OUTPUTS, RECORD_NAME, RECORDINGS
from .prefix_listing import list_prefixes, shard_prefixes
from .state import FailureFacts, ManifestFacts, RecordingFacts, SetFacts, SetState, Target, decide_state

READ_THREADS = 16  # small GETs: on S3 each is a round trip, so overlap them
NARROW_MAX = 20  # up to this many partitions, list their folders instead of whole profiles
# The fields of each document the rule and its readers use: all a cache entry keeps.
KEPT_FIELDS = frozenset(
    {
        "fingerprint",
        "input_sha256",
        "stems",
        "billed_seconds",
        "backend",
        "gpu_type",
        "device",
        "input_duration_s",
        "source_sha256",
        "input_etag",
        "duration_s",
        "original_key",
        "sha256",
        "error",
        "failed_at",
        "cpu_seconds",
    }
)
STEM_FIELDS = ("key", "bytes", "format")


class FactCache(Protocol):
    """Parsed JSON documents keyed by (object key, ETag)."""

    def get(self, key: str, etag: str) -> dict[str, Any] | None: ...

    def put(self, key: str, etag: str, value: dict[str, Any]) -> None: ...


class MemoryFactCache:
    """A :class:`FactCache` in a dict (one process; the Dagster side keeps a durable one)."""

    def __init__(self, entries: Mapping[str, tuple[str, dict[str, Any]]] | None = None):
        self.entries: dict[str, tuple[str, dict[str, Any]]] = dict(entries or {})
        self.changed = False

    def get(self, key: str, etag: str) -> dict[str, Any] | None:
        hit = self.entries.get(key)
        return hit[1] if hit is not None and hit[0] == etag else None

    def put(self, key: str, etag: str, value: dict[str, Any]) -> None:
        self.entries[key] = (etag, value)
        self.changed = True

    def keep_only(self, keys: Iterable[str]) -> None:
        """Drop entries for objects no longer listed."""
        live = set(keys)
        for key in [k for k in self.entries if k not in live]:
            del self.entries[key]
            self.changed = True


@dataclass(frozen=True)
class PairFacts:
    """One (recording, strategy) pair: its facts and the state the rule gives them."""

    partition: str
    strategy: str
    facts: SetFacts
    state: SetState


@dataclass
class _Listed:
    inputs: dict[str, ObjectInfo]  # object key -> info
    records: dict[str, ObjectInfo]  # partition -> recording.json info
    manifests: dict[tuple[str, str], ObjectInfo]  # (partition, strategy) -> manifest.json info
    failures: dict[tuple[str, str], ObjectInfo]
    stems: dict[tuple[str, str], dict[str, int]]  # (partition, strategy) -> {stem key: size}
    in_set_folders: dict[tuple[str, str], dict[str, int]]  # the same, for objects in v-<attempt>/ folders


def _list(store: ObjectStore, partitions: Sequence[str]) -> _Listed:
    """The ``recordings/`` and ``outputs/`` objects of the partitions' folders, and for a local
    folder the profiles' inputs too (:func:`_find_inputs` finds them otherwise). A few partitions:
    their own folders. Many, in a local folder: every profile walked (:func:`_list_local`). Many,
    in a remote bucket: the profiles listed under prefixes of the partitions' slugs, in parallel
    (:mod:`.prefix_listing`), as one listing per profile would be a long run of round trips."""
    out = _Listed({}, {}, {}, {}, defaultdict(dict), defaultdict(dict))
    threads = _threads(store)
    if len(partitions) <= NARROW_MAX:
        scopes = [f"{pk}/" for pk in sorted(set(partitions))]
    elif threads <= 1:  # a local folder: reads are cheap, walk each profile
        scopes = []
        for profile in sorted({pk.partition("/")[0] for pk in partitions}):
            for info in store.list(f"{INPUTS}/{profile}/"):
                out.inputs[info.key] = info
            if not (isinstance(store, LocalObjectStore) and _list_local(store, profile, out)):
                scopes.append(f"{profile}/")
    else:
        scopes = _scopes(partitions, threads)
    prefixes = [f"{area}/{scope}" for area in (RECORDINGS, OUTPUTS) for scope in scopes]
    for info in list_prefixes(store, prefixes, threads):
        (_add_record if info.key.startswith(f"{RECORDINGS}/") else _add_output)(out, info)
    return out


def _threads(store: ObjectStore) -> int:
    return int(getattr(store, "read_concurrency", READ_THREADS))


def _scopes(keys: Iterable[str], threads: int) -> list[str]:
    """``<profile>/<prefix>`` scopes that start every ``<profile>/<name>`` key (names without a
    ``/`` give disjoint scopes; see :func:`.prefix_listing.shard_prefixes`)."""
    by_profile: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        profile, _, name = key.partition("/")
        by_profile[profile].add(name)
    return [
        f"{profile}/{prefix}"
        for profile, names in sorted(by_profile.items())
        for prefix in shard_prefixes(names, threads)
    ]


def _add_record(out: _Listed, info: ObjectInfo) -> None:
    parts = info.key.split("/")
    if len(parts) == 4 and parts[3] == RECORD_NAME:
        out.records[f"{parts[1]}/{parts[2]}"] = info


def _add_output(out: _Listed, info: ObjectInfo) -> None:
    """File one listed ``outputs/`` object (:func:`_list_set_folder` applies the same rule)."""
    parts = info.key.split("/")
    if len(parts) == 6 and parts[4].startswith(SET_DIR_PREFIX):
        # a set folder's object: part of a set only if the manifest lists it (collect_states)
        out.in_set_folders[(f"{parts[1]}/{parts[2]}", parts[3])][info.key] = info.size
        return
    if len(parts) != 5 or STAGING_DIR in parts:
        return  # staged objects and anything not <profile>/<slug>/<strategy>/<name>
    pair = (f"{parts[1]}/{parts[2]}", parts[3])
    if parts[4] == MANIFEST_NAME:
        out.manifests[pair] = info
    elif parts[4] == FAILURE_NAME:
        out.failures[pair] = info
    else:
        out.stems[pair][info.key] = info.size


def _list_local(store: LocalObjectStore, profile: str, out: _Listed) -> bool:
    """``recordings/`` and ``outputs/`` of one profile in a local folder, walking only the depths
    the facts live at (``<slug>/recording.json``; ``<slug>/<strategy>/<name>`` and
    ``<slug>/<strategy>/v-<attempt>/<name>``) with one stat per file and no ObjectInfo per stem:
    the same facts as ``store.list`` + :func:`_add_output` (a test holds them equal) at a fraction
    of the cost, since 100,000 partitions are ~700,000 files. Returns False, having added nothing,
    where it cannot promise that sameness (a symlinked folder, which the store's walk
    de-duplicates; an unreadable one, whose error the store's walk reports): the caller then
    lists through the store."""
    found = _Listed({}, {}, {}, {}, defaultdict(dict), defaultdict(dict))
    root = str(store.root)

    def entries(folder: str) -> list[os.DirEntry]:
        try:
            with os.scandir(folder) as it:
                listed = list(it)
        except (FileNotFoundError, NotADirectoryError):
            return []  # gone since its parent was listed, or never there
        for e in listed:
            if e.is_symlink() and e.is_dir():
                raise _NotPlain
        return listed

    try:
        for slug in entries(f"{root}/{RECORDINGS}/{profile}"):
            if not slug.is_dir():
                continue
            try:
                st = os.stat(f"{slug.path}/{RECORD_NAME}")
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISREG(st.st_mode):
                key = f"{RECORDINGS}/{profile}/{slug.name}/{RECORD_NAME}"
                found.records[f"{profile}/{slug.name}"] = store.info(key, st)
        for slug in entries(f"{root}/{OUTPUTS}/{profile}"):
            for strategy in entries(slug.path) if slug.is_dir() else ():
                if strategy.is_dir():
                    _list_set_folder(store, found, profile, slug.name, strategy, entries)
    except (_NotPlain, OSError):
        return False
    out.records.update(found.records)
    out.manifests.update(found.manifests)
    out.failures.update(found.failures)
    for src, dst in ((found.stems, out.stems), (found.in_set_folders, out.in_set_folders)):
        for pair, objects in src.items():
            dst[pair].update(objects)
    return True


def _list_set_folder(
    store: LocalObjectStore,
    found: _Listed,
    profile: str,
    slug: str,
    strategy: os.DirEntry,
    entries: Callable[[str], list[os.DirEntry]],
) -> None:
    """One ``<slug>/<strategy>/`` folder, filed as :func:`_add_output` files its objects (this is
    the hot loop of a local listing, so the rule is spelled out rather than called per file)."""
    pair, prefix = (f"{profile}/{slug}", strategy.name), f"{OUTPUTS}/{profile}/{slug}/{strategy.name}/"
    staged = STAGING_DIR in (profile, slug, strategy.name)
    stems: dict[str, int] = {}
    for entry in entries(strategy.path):
        name = entry.name
        try:
            if entry.is_file():
                if staged or name == STAGING_DIR or name.startswith(LOCAL_TMP_PREFIX):  # in-progress writes
                    continue
                st = entry.stat()
                if name == MANIFEST_NAME:
                    found.manifests[pair] = store.info(prefix + name, st)
                elif name == FAILURE_NAME:
                    found.failures[pair] = store.info(prefix + name, st)
                else:
                    stems[prefix + name] = st.st_size
            elif name.startswith(SET_DIR_PREFIX) and entry.is_dir():
                for leaf in entries(entry.path):
                    try:
                        if leaf.is_file() and not leaf.name.startswith(LOCAL_TMP_PREFIX):
                            found.in_set_folders[pair][f"{prefix}{name}/{leaf.name}"] = leaf.stat().st_size
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            continue  # removed while we listed
    if stems:
        found.stems[pair].update(stems)


class _NotPlain(Exception):
    """A folder the local fast path leaves to the store's own walk."""


def _read_json(store: ObjectStore, infos: Sequence[ObjectInfo], cache: FactCache | None) -> dict[str, dict]:
    """``{key: parsed document}`` for the objects that parse as a JSON object (others are left out:
    an unreadable manifest is as good as none)."""
    out: dict[str, dict] = {}
    todo = []
    for info in infos:
        hit = cache.get(info.key, info.etag) if cache is not None else None
        if hit is not None:
            out[info.key] = hit
        else:
            todo.append(info)

    local = str(store.root) if isinstance(store, LocalObjectStore) else None

    def get(key: str) -> bytes:
        if local is not None:  # a key from our own listing: no need for the store's key checks
            try:
                with open(f"{local}/{key}", "rb") as f:
                    return f.read()
            except OSError:
                pass  # the store's own read words the error
        return store.get_bytes(key)

    def read(info: ObjectInfo) -> tuple[ObjectInfo, dict | None]:
        try:
            data = json.loads(get(info.key))
        except StorageError as err:
            if store.head(info.key) is None:
                return info, None  # deleted between the listing and the read
            raise err
        except ValueError:
            return info, None
        return info, _slim(data) if isinstance(data, dict) else None

    # Remote stores pay a round trip per GET, so overlap them; a local folder reads faster in line.
    threads = min(_threads(store), len(todo))
    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(read, todo))
    else:
        results = [read(info) for info in todo]
    for info, data in results:
        if data is not None:
            out[info.key] = data
            if cache is not None:
                cache.put(info.key, info.etag, data)
    return out


def _slim(doc: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in doc.items() if k in KEPT_FIELDS}
    if isinstance(out.get("stems"), dict):
        out["stems"] = {
            name: {f: stem.get(f) for f in STEM_FIELDS} if isinstance(stem, dict) else stem
            for name, stem in out["stems"].items()
        }
    return out


def manifest_facts(data: Mapping[str, Any], made_at: float | None = None) -> ManifestFacts | None:
    """The facts of a manifest document (a SeparationResult), or None if it is not one."""
    try:
        stems = {name: (str(f["key"]), int(f["bytes"])) for name, f in data["stems"].items()}
        formats = {str(f["format"]) for f in data["stems"].values()}
        return ManifestFacts(
            fingerprint=str(data["fingerprint"]),
            input_sha256=str(data["input_sha256"]),
            output_format=formats.pop() if len(formats) == 1 else ",".join(sorted(formats)),
            stems=stems,
            billed_seconds=float(data.get("billed_seconds") or 0.0),
            backend=str(data.get("backend") or "local"),
            gpu_type=data.get("gpu_type"),
            duration_s=_float(data.get("input_duration_s")),
            made_at=made_at,
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def recording_facts(data: Mapping[str, Any]) -> RecordingFacts | None:
    try:
        return RecordingFacts(
            source_sha256=str(data["source_sha256"]),
            input_etag=str(data["input_etag"]),
            duration_s=_float(data.get("duration_s")),
            original_key=data.get("original_key"),
        )
    except (KeyError, TypeError):
        return None


def failure_facts(data: Mapping[str, Any]) -> FailureFacts | None:
    try:
        return FailureFacts(
            fingerprint=str(data["fingerprint"]),
            input_sha256=data.get("input_sha256"),
            error=str(data.get("error") or "separation failed"),
            failed_at=float(data.get("failed_at") or 0.0),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _stem_objects(listed: _Listed, pair: tuple[str, str], manifest: ManifestFacts | None) -> dict[str, int]:
    """The set's objects: flat ones beside the manifest, and those of set folders the manifest
    lists. A set folder no manifest lists is an interrupted (or superseded) publish: not part of
    any set, invisible to the rule, removed by the sweep (``gpu_worker.stores.publish.sweep``)."""
    objects = listed.stems.get(pair, {})
    in_folders = listed.in_set_folders.get(pair)
    if manifest is None or not in_folders:
        return objects
    listed_keys = {key for key, _ in manifest.stems.values()}
    return {**objects, **{k: v for k, v in in_folders.items() if k in listed_keys}}


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


@contextmanager
def paused_gc() -> Iterator[None]:
    """Cyclic GC off while building facts for many partitions: the objects made hold no cycles,
    and with hundreds of thousands of them alive each full collection walks them all (about a
    fifth of a warm status at 10,000 partitions). Nests; the outermost restores the setting."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _find_inputs(store: ObjectStore, listed: _Listed, docs: Mapping[str, dict], narrow: bool) -> None:
    """The inputs the recordings name, where :func:`_list` left them to be found: for a few
    partitions one lookup each, otherwise listed under prefixes of their names."""
    threads = _threads(store)
    if threads <= 1 and not narrow:
        return  # a local folder's inputs were listed with the rest
    named = {doc.get("original_key") for info in listed.records.values() if (doc := docs.get(info.key))}
    keys = sorted(k for k in named if isinstance(k, str))
    under = [k for k in keys if k.startswith(f"{INPUTS}/")] if not narrow else []
    scopes = _scopes((k.removeprefix(f"{INPUTS}/") for k in under), threads)
    for info in list_prefixes(store, [f"{INPUTS}/{scope}" for scope in scopes], threads):
        listed.inputs[info.key] = info
    for found in map(store.head, sorted(set(keys) - set(under))):
        if found is not None:
            listed.inputs[found.key] = found


@paused_gc()
def collect_states(
    store: ObjectStore,
    partitions: Sequence[str],
    strategies: Sequence[str],
    targets: Mapping[tuple[str, str], Target],
    wanted: Mapping[str, frozenset[str]],
    cache: FactCache | None = None,
) -> list[PairFacts]:
    """Facts and state of every ``partition x strategy``.

    ``targets[(profile, strategy)]``: what the profile's output format and the strategy's
    fingerprint ask for; ``wanted[profile]``: the strategies the profile runs (others are
    ``unused``). Partitions are ``<profile>/<slug>`` keys.
    """
    listed = _list(store, partitions)
    docs = _read_json(store, [*listed.records.values(), *listed.manifests.values(), *listed.failures.values()], cache)
    if isinstance(cache, MemoryFactCache) and len(partitions) > NARROW_MAX:
        cache.keep_only(docs)
    _find_inputs(store, listed, docs, len(partitions) <= NARROW_MAX)
    rows: list[PairFacts] = []
    for pk in partitions:
        profile = pk.partition("/")[0]
        rec_info = listed.records.get(pk)
        rec = recording_facts(docs.get(rec_info.key, {})) if rec_info is not None else None
        input_info = listed.inputs.get(rec.original_key) if rec is not None and rec.original_key else None
        for name in strategies:
            pair = (pk, name)
            m_info, f_info = listed.manifests.get(pair), listed.failures.get(pair)
            manifest = manifest_facts(docs.get(m_info.key, {}), m_info.last_modified) if m_info is not None else None
            failure = failure_facts(docs.get(f_info.key, {})) if f_info is not None else None
            facts = SetFacts(
                wanted=name in wanted.get(profile, frozenset()),
                recording=rec,
                input_etag=input_info.etag if input_info is not None else None,
                manifest=manifest,
                failure=failure,
                stem_objects=_stem_objects(listed, pair, manifest),
            )
            target = targets.get((profile, name))
            state = (
                decide_state(facts, target)
                if target is not None
                else decide_state(SetFacts(False, rec, facts.input_etag, manifest), Target("", ""))
            )
            rows.append(PairFacts(pk, name, facts, state))
    return rows
