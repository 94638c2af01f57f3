"""A whole status, kept: the one rule's rows over every partition, as of one listing of the bucket.

Listing a bucket of 100,000 recordings takes tens of seconds, so a wide ``stemset status`` reads the
rows of the latest whole listing (the ``stem_set_state`` sensor makes one every tick, and so does a
whole ``stemset status``) and re-reads only the recordings that changed since: those Stemset's own
runs touched, and those registered since. :func:`merge` puts the two together in the order a
whole listing gives.

A snapshot is valid for one set of rule inputs (:func:`rule_digest`: the strategies' fingerprints,
the profiles' formats and strategies, the prices); any change to them makes a new listing
necessary. It holds the :data:`~stemset_assets.core.status.COLUMNS` of each row, column by column
(one JSON list a column, so no key is repeated per row: 21.8 MB at 100,000 rows).

This module imports no Dagster.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from operator import itemgetter

from ..config import StemsetConfig
from .cost import config_prices
from .set_facts import paused_gc
from .status import COLUMNS, SetStatus, status_columns, targets

FORMAT = 1  # bump when COLUMNS or the rule's meaning changes: older snapshots are then ignored


@dataclass(frozen=True)
class StatusSnapshot:
    listed_at: float  # Unix time just before the listing began: later changes may be missing
    digest: str  # rule_digest(config) of the config the rows were decided under
    columns: dict[str, list]  # COLUMNS -> one value per row
    rows_id: str = ""  # content_id of the columns and digest (set by decode and encode)

    @property
    def rows(self) -> int:
        return len(self.columns["partition"])

    def encode(self) -> tuple[str, str]:
        """The snapshot as JSON, and its rows' :func:`content id <content_id>`."""
        with paused_gc():
            cols = json.dumps(self.columns, separators=(",", ":"))
        rows_id = content_id(cols, self.digest)
        head = json.dumps({"format": FORMAT, "listed_at": self.listed_at, "digest": self.digest, "rows_id": rows_id})
        return f'{head[:-1]},"columns":{cols}}}', rows_id

    @classmethod
    def decode(cls, raw: str | None) -> StatusSnapshot | None:
        """The snapshot in ``raw``, or None if there is none or it is not one this code wrote."""
        if not raw:
            return None
        try:
            with paused_gc():
                doc = json.loads(raw)
            columns = doc["columns"]
            ok = (
                doc.get("format") == FORMAT
                and isinstance(columns, dict)
                and list(columns) == COLUMNS
                and all(isinstance(v, list) for v in columns.values())
                and len({len(v) for v in columns.values()}) == 1
            )
            if not ok:
                return None
            return cls(float(doc["listed_at"]), str(doc["digest"]), columns, str(doc["rows_id"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    @classmethod
    def of_rows(cls, rows: Sequence[SetStatus], listed_at: float, digest: str) -> StatusSnapshot:
        return cls(listed_at, digest, status_columns(rows))


def content_id(columns_json: str, digest: str) -> str:
    """Equal for equal rows under equal rule inputs: a later listing that finds the same rows
    need only say when it ran, not store them again."""
    return hashlib.sha256(f"{digest}\n{columns_json}".encode()).hexdigest()[:24]


def rule_digest(config: StemsetConfig) -> str:
    """Changes whenever what the rows depend on besides the bucket changes: each (profile,
    strategy)'s fingerprint and format, each profile's strategies, the strategies' order, the
    prices. (No credentials: nothing secret goes into it.)"""
    goal, wanted = targets(config)
    doc = {
        "format": FORMAT,
        "strategies": list(config.strategies),
        "targets": sorted([p, s, t.fingerprint, t.output_format] for (p, s), t in goal.items()),
        "wanted": {p: sorted(w) for p, w in sorted(wanted.items())},
        "prices": asdict(config_prices(config)),
        "gpu_type": config.gpu.type,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def merge(
    snapshot: StatusSnapshot, partitions: Sequence[str], fresh: Sequence[SetStatus], redone: Iterable[str]
) -> dict[str, list]:
    """The columns of a whole status now: for each of ``partitions`` (in their order), the rows of
    ``fresh`` if it is in ``redone``, else the snapshot's. Partitions no longer registered drop
    out; ``redone`` must hold every partition the snapshot lacks."""
    redone = set(redone)
    kept = snapshot.columns["partition"]
    if not redone and list(dict.fromkeys(kept)) == list(partitions):
        return snapshot.columns  # nothing changed: the snapshot as it is
    at: dict[str, list[int]] = defaultdict(list)
    for i, pk in enumerate(kept):
        at[pk].append(i)
    new = status_columns(fresh)
    new_at: dict[str, list[int]] = defaultdict(list)
    for i, pk in enumerate(new["partition"]):
        new_at[pk].append(i)
    missing = [pk for pk in partitions if pk not in redone and pk not in at]
    if missing:
        raise ValueError(f"{len(missing)} partition(s) neither in the snapshot nor re-read, e.g. {missing[0]!r}")
    offset = len(kept)
    picks: list[int] = []  # row indexes into snapshot rows + fresh rows
    for pk in partitions:
        if pk in redone:
            picks.extend(offset + i for i in new_at.get(pk, ()))
        else:
            picks.extend(at[pk])
    if not picks:
        return {c: [] for c in COLUMNS}
    take = itemgetter(*picks)
    with paused_gc():
        if len(picks) == 1:
            return {c: [take(snapshot.columns[c] + new[c])] for c in COLUMNS}
        return {c: list(take(snapshot.columns[c] + new[c])) for c in COLUMNS}
