"""The spend guard: which launches fit the GPU budget, without Dagster.

``budget.gpu_usd_per_day`` and ``budget.gpu_usd_per_month`` (config.yaml) cap what separating may
spend per UTC day and calendar month. What has been spent is not kept in a ledger of its own: the
Dagster side (:mod:`stemset_assets.defs.spending`) adds up the ``run_cost_usd`` recorded on the
stems materialisations of the day and month, plus what launched runs and backfills that have not
finished are estimated to cost (their ``stemset/estimated_cost_usd`` tags, less what they have
already recorded). :func:`admit` then takes candidate launches in order and keeps those whose
estimates fit the smaller headroom; the rest are held back, and :meth:`Admission.describe` says
how many, what they would cost and which limit held them.

For a new input nothing is known but its object's size, so :func:`audio_seconds_from_size` guesses
its length from the bytes (PCM-sized for WAV/AIFF, FLAC at about 60 % of that, lossy formats at
128 kbit/s: the guess errs long, so the estimate errs high).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Generic, TypeVar

from ..config import BudgetConfig

T = TypeVar("T")

PCM_BYTES_PER_SECOND = 44_100 * 2 * 2  # 16-bit stereo at 44.1 kHz
BYTES_PER_SECOND = {
    ".wav": PCM_BYTES_PER_SECOND,
    ".wave": PCM_BYTES_PER_SECOND,
    ".aif": PCM_BYTES_PER_SECOND,
    ".aiff": PCM_BYTES_PER_SECOND,
    ".flac": PCM_BYTES_PER_SECOND * 0.6,
}
LOSSY_BYTES_PER_SECOND = 128_000 / 8
EPSILON_USD = 1e-9


def audio_seconds_from_size(name: str, size: int) -> float:
    """A generous guess of the audio length of an input of ``size`` bytes named ``name``."""
    per_second = BYTES_PER_SECOND.get(PurePosixPath(name.lower()).suffix, LOSSY_BYTES_PER_SECOND)
    return max(0.0, float(size)) / per_second


def day_and_month(now: float) -> tuple[float, float]:
    """The UTC start of ``now``'s day and month, as POSIX timestamps."""
    t = datetime.fromtimestamp(now, timezone.utc)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp(), day.replace(day=1).timestamp()


@dataclass(frozen=True)
class Spending:
    """What has been spent (recorded on materialisations) and committed (launched, not yet recorded)."""

    day_usd: float = 0.0
    month_usd: float = 0.0
    committed_usd: float = 0.0
    in_flight: int = 0  # runs and backfills whose estimate is still committed

    @property
    def day_total(self) -> float:
        return self.day_usd + self.committed_usd

    @property
    def month_total(self) -> float:
        return self.month_usd + self.committed_usd

    def add(self, usd: float) -> Spending:
        """This spending with ``usd`` more committed."""
        return Spending(self.day_usd, self.month_usd, self.committed_usd + usd, self.in_flight)

    def describe(self, budget: BudgetConfig) -> str:
        parts = []
        if budget.gpu_usd_per_day is not None:
            parts.append(f"today ${self.day_total:.2f} of ${budget.gpu_usd_per_day:.2f}")
        if budget.gpu_usd_per_month is not None:
            parts.append(f"this month ${self.month_total:.2f} of ${budget.gpu_usd_per_month:.2f}")
        text = "; ".join(parts) or "no budget set"
        if self.committed_usd > 0:
            text += f" (incl. ${self.committed_usd:.2f} estimated for {self.in_flight} run(s)/backfill(s) in flight)"
        return text


def headroom(budget: BudgetConfig, spending: Spending) -> tuple[float, str | None]:
    """``(US$ left, the limit that leaves least)``: ``(inf, None)`` without a budget."""
    room: list[tuple[float, str]] = []
    if budget.gpu_usd_per_day is not None:
        room.append(
            (budget.gpu_usd_per_day - spending.day_total, f"budget.gpu_usd_per_day ${budget.gpu_usd_per_day:g}")
        )
    if budget.gpu_usd_per_month is not None:
        room.append(
            (budget.gpu_usd_per_month - spending.month_total, f"budget.gpu_usd_per_month ${budget.gpu_usd_per_month:g}")
        )
    if not room:
        return float("inf"), None
    left, limit = min(room, key=lambda r: r[0])
    return max(0.0, left), limit


@dataclass
class Admission(Generic[T]):
    """The launches that fit (in order) and those held back, with the numbers that decided it."""

    admitted: list[T] = field(default_factory=list)
    held: list[T] = field(default_factory=list)
    admitted_usd: float = 0.0
    held_usd: float = 0.0
    headroom_usd: float = float("inf")
    limit: str | None = None  # the config key whose limit held launches back
    spending: Spending = field(default_factory=Spending)

    def describe(self, budget: BudgetConfig, what: str = "launch(es)") -> str:
        """One line: what was held back and why, or an empty string when nothing was."""
        if not self.held:
            return ""
        return (
            f"{len(self.held)} {what} held back by the GPU budget: estimated ${self.held_usd:.2f} would pass "
            f"{self.limit} (${self.headroom_usd:.2f} left before these; {self.spending.describe(budget)})"
        )

    def as_dict(self) -> dict:
        return {
            "admitted": len(self.admitted),
            "held_back": len(self.held),
            "admitted_usd": round(self.admitted_usd, 6),
            "held_back_usd": round(self.held_usd, 6),
            "headroom_usd": None if self.headroom_usd == float("inf") else round(self.headroom_usd, 6),
            "limit": self.limit,
            "spent_today_usd": round(self.spending.day_usd, 6),
            "spent_month_usd": round(self.spending.month_usd, 6),
            "committed_usd": round(self.spending.committed_usd, 6),
        }


def admit(items: Sequence[T], cost_of: Callable[[T], float], budget: BudgetConfig, spending: Spending) -> Admission[T]:
    """Take ``items`` in order while their estimated costs fit what the budget leaves after
    ``spending``; an item that does not fit is held back and later (cheaper) ones may still fit.
    Items estimated at $0 always fit. Without a budget everything is admitted."""
    room, limit = headroom(budget, spending)
    out: Admission[T] = Admission(headroom_usd=room, limit=limit, spending=spending)
    left = room
    for item in items:
        cost = max(0.0, float(cost_of(item)))
        if cost <= left + EPSILON_USD:
            out.admitted.append(item)
            out.admitted_usd += cost
            left -= cost
        else:
            out.held.append(item)
            out.held_usd += cost
    return out
