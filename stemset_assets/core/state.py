"""The one rule for the state of a stem set: a (recording, strategy) pair.

Every reader of state (the catalog asset, ``stemset status``, backfill selection, the sensors,
the web API and the player, the stems asset's reuse decision) calls :func:`decide_state` on
facts read from the bucket (:mod:`stemset_assets.core.set_facts`). Nothing else decides.

States, in the order the rule tests them:

- ``unused``: the recording's profile does not ask for the strategy and nothing of it is stored
  (nothing to do). A set made on request (``stemset process --strategy``) is judged like any
  other, so it reads current, stale or broken, and a backfill redoes it when it goes stale;
- ``broken``: objects of the set are there but the set is not whole: stems without their
  ``manifest.json``, or a stem the manifest lists that is gone or has another size;
- ``failed``: the latest attempt to make the set the strategy asks for now failed
  (``failure.json`` for the current fingerprint and recording), and no current set exists;
- ``missing``: nothing stored (``not_separated``), or the recording was never made
  (``recording_not_materialised``);
- ``stale``: a whole set made with another fingerprint (``strategy_changed``), from another
  canonical recording (``recording_changed``), in another output format (``format_changed``),
  or the input object was rewritten since the recording was made (``input_changed``);
- ``current``: a whole set matching all of the above.

``input_missing`` (the input object is gone) is reported beside any state: the set may still
be current, but it can no longer be redone from its input.

This module imports neither Dagster nor the bucket: it is a pure function of its facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

CURRENT = "current"
STALE = "stale"
MISSING = "missing"
FAILED = "failed"
BROKEN = "broken"
UNUSED = "unused"
STATES = (CURRENT, STALE, MISSING, FAILED, BROKEN, UNUSED)
TO_REDO = frozenset({STALE, MISSING, FAILED, BROKEN})
"""States a default backfill makes current again."""

# Reason tokens (several may apply; ``reasons`` keeps them in this order).
NOT_WANTED = "not_in_profile"
MANIFEST_MISSING = "manifest_missing"
STEM_MISSING = "stem_missing"
STEM_SHORT = "stem_size_mismatch"
SEPARATION_FAILED = "separation_failed"
NOT_SEPARATED = "not_separated"
NOT_RECORDED = "recording_not_materialised"
STRATEGY_CHANGED = "strategy_changed"
RECORDING_CHANGED = "recording_changed"
FORMAT_CHANGED = "format_changed"
INPUT_CHANGED = "input_changed"
INPUT_MISSING = "input_missing"
UP_TO_DATE = "up_to_date"


@dataclass(frozen=True)
class ManifestFacts:
    """What a stored ``manifest.json`` says about its set."""

    fingerprint: str
    input_sha256: str  # sha256 of the canonical FLAC the set was made from
    output_format: str
    stems: Mapping[str, tuple[str, int]]  # stem name -> (object key, bytes)
    billed_seconds: float = 0.0
    backend: str = "local"
    gpu_type: str | None = None
    duration_s: float | None = None
    made_at: float | None = None


@dataclass(frozen=True)
class FailureFacts:
    """What a stored ``failure.json`` says about the latest failed attempt."""

    fingerprint: str
    input_sha256: str | None
    error: str
    failed_at: float


@dataclass(frozen=True)
class RecordingFacts:
    """What ``recording.json`` says, and what the input listing says now."""

    source_sha256: str  # of the canonical FLAC
    input_etag: str  # the input's ETag when the recording read it
    duration_s: float | None = None
    original_key: str | None = None


@dataclass(frozen=True)
class SetFacts:
    """Everything the rule looks at for one (recording, strategy) pair."""

    wanted: bool  # the recording's profile lists the strategy
    recording: RecordingFacts | None  # None: the recording was never made
    input_etag: str | None  # the input object's ETag in the listing now; None: input gone
    manifest: ManifestFacts | None
    failure: FailureFacts | None = None
    stem_objects: Mapping[str, int] = field(default_factory=dict)  # stem object key -> size, as listed


@dataclass(frozen=True)
class Target:
    """What the strategy and the profile ask for now."""

    fingerprint: str
    output_format: str


@dataclass(frozen=True)
class SetState:
    state: str
    reasons: tuple[str, ...]
    detail: str  # one line for people: what is wrong and, for broken sets, which object

    @property
    def reason(self) -> str:
        return ";".join(self.reasons)


def decide_state(facts: SetFacts, target: Target) -> SetState:
    """The state of one stem set (see the module doc for the rule)."""
    extra = (INPUT_MISSING,) if facts.recording is not None and facts.input_etag is None else ()
    if not facts.wanted and facts.manifest is None and not facts.stem_objects:
        # The recording's own facts still ride along: the catalog shows them on every row.
        return SetState(
            UNUSED, (NOT_WANTED, *_recording_reasons(facts)), "no profile of this recording asks for the strategy"
        )

    manifest = facts.manifest
    if manifest is None and facts.stem_objects:
        names = ", ".join(sorted(k.rsplit("/", 1)[-1] for k in facts.stem_objects))
        return SetState(BROKEN, (MANIFEST_MISSING, *extra), f"manifest.json is missing beside {names}")
    if manifest is not None:
        broken = _incomplete(manifest, facts.stem_objects)
        if broken is not None:
            return SetState(BROKEN, (broken[0], *extra), broken[1])

    rec = facts.recording
    failure = facts.failure
    stale = _stale_reasons(manifest, rec, facts.input_etag, target) if manifest is not None else ()
    # A failure counts only for what is asked now, and only while no current set exists.
    if (
        failure is not None
        and rec is not None
        and failure.fingerprint == target.fingerprint
        and failure.input_sha256 == rec.source_sha256
        and (manifest is None or stale)
    ):
        return SetState(FAILED, (SEPARATION_FAILED, *stale, *extra), failure.error)
    if manifest is None:
        if rec is None:
            return SetState(MISSING, (NOT_RECORDED, *extra), "the recording was never made")
        return SetState(MISSING, (NOT_SEPARATED, *extra), "never separated with this strategy")
    if stale:
        return SetState(STALE, (*stale, *extra), ", ".join(r.replace("_", " ") for r in stale))
    return SetState(CURRENT, (UP_TO_DATE, *extra), "up to date")


def reusable(state: SetState) -> bool:
    """Whether the stored set is what separating the recording as it stands would make: current,
    or stale only because the input changed (which redoing the recording, not the stems, resolves)."""
    return state.state == CURRENT or (state.state == STALE and set(state.reasons) <= {INPUT_CHANGED, INPUT_MISSING})


def _recording_reasons(facts: SetFacts) -> tuple[str, ...]:
    rec = facts.recording
    if rec is None:
        return (NOT_RECORDED,)
    if facts.input_etag is None:
        return (INPUT_MISSING,)
    return (INPUT_CHANGED,) if facts.input_etag != rec.input_etag else ()


def _incomplete(manifest: ManifestFacts, present: Mapping[str, int]) -> tuple[str, str] | None:
    """(reason, detail) for the first stem the manifest lists that is gone or of another size."""
    if all(present.get(key) == size for key, size in manifest.stems.values()):
        return None  # whole, the usual case: no need to sort to find the first gap
    for name, (key, size) in sorted(manifest.stems.items()):
        got = present.get(key)
        if got is None:
            return STEM_MISSING, f"stem {name!r} ({key}) is gone"
        if got != size:
            return STEM_SHORT, f"stem {name!r} ({key}) has {got} bytes, the manifest says {size}"
    return None


def _stale_reasons(
    manifest: ManifestFacts, rec: RecordingFacts | None, input_etag: str | None, target: Target
) -> tuple[str, ...]:
    reasons = []
    if manifest.fingerprint != target.fingerprint:
        reasons.append(STRATEGY_CHANGED)
    if rec is not None and manifest.input_sha256 != rec.source_sha256:
        reasons.append(RECORDING_CHANGED)
    if manifest.output_format != target.output_format:
        reasons.append(FORMAT_CHANGED)
    if rec is not None and input_etag is not None and input_etag != rec.input_etag:
        reasons.append(INPUT_CHANGED)
    return tuple(reasons)
