"""The spend guard's rule (core, no Dagster): what fits the day's and month's budget."""

from __future__ import annotations

import pytest

from stemset_assets.config import BudgetConfig
from stemset_assets.core.backfill_plan import BackfillPlan, CostModel, within_budget
from stemset_assets.core.spend_guard import Spending, admit, audio_seconds_from_size, day_and_month, headroom


def test_headroom_is_the_smaller_limit_and_counts_what_is_in_flight():
    budget = BudgetConfig(gpu_usd_per_day=10.0, gpu_usd_per_month=100.0)
    assert headroom(budget, Spending(day_usd=4.0, month_usd=50.0)) == (6.0, "budget.gpu_usd_per_day $10")
    assert headroom(budget, Spending(day_usd=1.0, month_usd=97.0)) == (3.0, "budget.gpu_usd_per_month $100")
    assert headroom(budget, Spending(day_usd=4.0, month_usd=50.0, committed_usd=5.0))[0] == pytest.approx(1.0)
    assert headroom(budget, Spending(day_usd=12.0, month_usd=50.0))[0] == 0.0
    assert headroom(BudgetConfig(), Spending(day_usd=1e9)) == (float("inf"), None)


def test_admit_takes_in_order_what_fits_and_holds_the_rest():
    budget = BudgetConfig(gpu_usd_per_day=1.0)
    costs = {"a": 0.4, "b": 0.5, "c": 0.3, "d": 0.05, "free": 0.0}
    out = admit(list(costs), costs.get, budget, Spending(day_usd=0.2))
    assert out.admitted == ["a", "c", "d", "free"] and out.held == ["b"]  # b does not fit; cheaper ones still do
    assert out.admitted_usd == pytest.approx(0.75) and out.held_usd == pytest.approx(0.5)
    text = out.describe(budget, "new input(s)")
    assert text.startswith(
        "1 new input(s) held back by the GPU budget: estimated $0.50 would pass budget.gpu_usd_per_day $1"
    )
    assert "today $0.20 of $1.00" in text
    everything = admit(list(costs), costs.get, BudgetConfig(), Spending(day_usd=99))
    assert everything.held == [] and everything.describe(budget) == ""


def test_size_guesses_err_long():
    assert audio_seconds_from_size("a.wav", 176_400 * 60) == pytest.approx(60.0)
    assert audio_seconds_from_size("a.FLAC", 176_400 * 60) == pytest.approx(100.0)
    assert audio_seconds_from_size("a.m4a", 16_000 * 60) == pytest.approx(60.0)


def test_day_and_month_are_utc():
    day, month = day_and_month(1_780_000_000.0)  # 2026-05-28 20:26:40 UTC
    assert day == 1_779_926_400.0 and month == 1_777_593_600.0


def test_a_backfill_plan_is_cut_to_the_budget():
    class Config:  # only what within_budget reads
        budget = BudgetConfig(gpu_usd_per_day=0.25, gpu_usd_per_month=None)

    model = CostModel("modal", "A100-40GB", 3.6, 1.0, "test")  # $0.001 per audio second
    durations = {"p/a": 100.0, "p/b": 100.0, "p/c": None, "p/d": 100.0}
    plan = BackfillPlan("htdemucs", "redo", None, list(durations), 300.0, model, False, {}, 1, durations)
    cut = within_budget(plan, Config, Spending(day_usd=0.05))
    assert cut.partitions == ["p/a", "p/b", "p/c"] and cut.held_back == ["p/d"]
    assert cut.audio_seconds == 200.0 and cut.unknown_duration == 1
    assert "1 partition(s) held back by the GPU budget" in cut.describe()
    assert cut.as_dict()["held_back"] == ["p/d"] and cut.as_dict()["budget"]["held_back_usd"] == pytest.approx(0.1)
