"""`stemset status` and `stemset backfill`: per-file staleness and strategy backfills from the CLI.

Both read the Dagster instance of :func:`stemset_assets.defs.runs.dagster_instance` (``$DAGSTER_HOME``,
else ``./.dagster_home``) and the media store of config.yaml. A wide status reads the rows the
latest listing kept, plus what runs changed since (:mod:`stemset_assets.defs.status_snapshot`);
``--fresh`` lists the bucket.
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from ..config import load_config


def add_status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", "-p", default=None, help="only this profile's recordings")
    p.add_argument("--strategy", "-s", action="append", default=None, help="only this strategy (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable: summary and one row per file x strategy")
    p.add_argument("--files", action="store_true", help="also list every stale or missing file")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="list the whole bucket now, even where a recent listing (by the stem_set_state sensor or an "
        "earlier status) and the runs since would do",
    )


def run_status(args: argparse.Namespace) -> int:
    """Per profile x strategy: how many stem sets are in each state (the one state rule, over the bucket)."""
    from ..core.set_facts import paused_gc

    with paused_gc():  # Dagster's imports and the rows make many objects and no cycles: ~10% faster without GC
        return _status(args)


def _status(args: argparse.Namespace) -> int:
    # Dagster and pandas load only when a command runs, so `stemset --help` stays fast.
    from ..core.selection import check_profile, check_strategies
    from ..core.status import summary
    from ..defs.runs import dagster_instance
    from ..defs.status_snapshot import whole_status

    config = load_config(args.config)
    strategies = check_strategies(config, args.strategy)
    check_profile(config, args.profile)
    instance = dagster_instance(config)
    df, source = whole_status(instance, config, fresh=args.fresh)
    df = df[df["strategy"].isin(strategies)]
    if args.profile is not None:
        df = df[df["profile"] == args.profile]
    df = df.reset_index(drop=True)
    table = summary(df)
    if args.json:
        rows = json.loads(df.to_json(orient="records"))
        doc = {"summary": json.loads(table.to_json(orient="records")), "files": rows}
        doc["source"] = {"listed_at": source.listed_at, "from_snapshot": source.from_snapshot, "reread": source.reread}
        print(json.dumps(doc, indent=1))
        return 0
    if table.empty:
        print(
            "No recordings registered yet: drop files into inputs/<profile>/ (the new_recordings sensor "
            "picks them up) or run `stemset process`."
        )
        return 0
    print(table.to_string(index=False))
    if source.from_snapshot:
        print(f"\nStates {source.describe()}.")
    lost = df[df["input_present"] == False]  # noqa: E712
    if not lost.empty:
        print(f"\n{lost['partition'].nunique()} recording(s) whose input file is gone (partition kept).")
    todo = df[~df["state"].isin(["current", "unused"])]
    if args.files and not todo.empty:
        print()
        print(todo[["partition", "strategy", "state", "reason", "detail"]].to_string(index=False))
    return 0


def add_backfill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", "-s", required=True, help="the strategy whose stem sets to redo")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--stale-only", dest="mode", action="store_const", const="stale", help="only stale stem sets")
    which.add_argument(
        "--missing-only",
        dest="mode",
        action="store_const",
        const="missing",
        help="only recordings never separated with the strategy",
    )
    which.add_argument(
        "--broken-only",
        dest="mode",
        action="store_const",
        const="broken",
        help="only sets with a missing manifest or a missing or short stem object",
    )
    which.add_argument(
        "--failed-only",
        dest="mode",
        action="store_const",
        const="failed",
        help="only sets whose last separation failed",
    )
    which.add_argument("--all", dest="mode", action="store_const", const="all", help="every set, current ones too")
    p.set_defaults(mode="redo")  # stale, missing, broken and failed: every set that is not current
    p.add_argument("--profile", "-p", default=None, help="only this profile's recordings")
    p.add_argument("--dry-run", "-n", action="store_true", help="print the count and estimate; launch nothing")
    p.add_argument(
        "--webserver",
        default=None,
        help="dagster-webserver URL to launch through (default: dagster.webserver_url in config.yaml)",
    )
    p.add_argument("--json", action="store_true", help="print the plan (and result) as JSON")
    p.add_argument(
        "--ignore-budget",
        action="store_true",
        help="launch every planned partition even past budget.gpu_usd_per_day / per_month",
    )


def run_backfill(args: argparse.Namespace) -> int:
    """Redo a strategy's sets that are not current (or one state's): count, audio hours and cost first, then a
    Dagster backfill."""
    # Dagster loads only when a command runs, so `stemset --help` stays fast.
    from ..defs.backfill import launch_backfill, plan_backfill
    from ..defs.runs import dagster_instance

    config = load_config(args.config)
    instance = dagster_instance(config)
    plan = plan_backfill(instance, config, args.strategy, args.mode, args.profile, budget=not args.ignore_budget)
    if args.json and args.dry_run:
        print(json.dumps({**plan.as_dict(), "dry_run": True}, indent=1))
        return 0
    if not args.json:
        print(plan.describe())
    if args.dry_run:
        print("dry run: nothing launched")
        return 0
    if not plan.partitions:
        if not args.json:
            print("nothing launched: the GPU budget leaves no room" if plan.held_back else "nothing to do")
        else:
            print(json.dumps({**plan.as_dict(), "dry_run": False, "path": "nothing"}, indent=1))
        return 0
    bar = tqdm(total=plan.count, unit="file", desc=f"backfill {args.strategy}", disable=True if args.quiet else None)

    def progress(done: int, total: int, outcome) -> None:
        bar.update(1)
        if not outcome.success:
            bar.write(f"failed: {outcome.partition}: {outcome.error}")

    try:
        result = launch_backfill(
            plan, config, instance, url=args.webserver, progress=progress, say=lambda m: print(m, file=sys.stderr)
        )
    finally:
        bar.close()
    if args.json:
        print(
            json.dumps(
                {
                    **plan.as_dict(),
                    "dry_run": False,
                    "path": result.path,
                    "backfill_id": result.backfill_id,
                    "failed": [o.partition for o in result.outcomes if not o.success],
                },
                indent=1,
            )
        )
    else:
        print(result.message)
    return 1 if result.failed else 0
