"""`stemset catalog`: every recording x strategy with its state, stems and cost, as a table, CSV or JSON."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import load_config
from .common import format_table


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", "-f", choices=["table", "csv", "json"], default="table")


def run(args: argparse.Namespace) -> int:
    """Print the catalog: every recording x strategy with its state, stems and cost."""
    # Dagster and pandas load only when a command runs, so `stemset --help` stays fast.
    from ..core.catalog import build_catalog, totals
    from ..defs.partitions import RECORDINGS_PARTITIONS
    from ..defs.resources.media_store import open_store
    from ..defs.runs import dagster_instance

    config = load_config(args.config)
    store = open_store(config)
    keys = dagster_instance(config).get_dynamic_partitions(RECORDINGS_PARTITIONS)
    df = build_catalog(store, config, keys)
    if args.format == "csv":
        sys.stdout.write(df.to_csv(index=False))
    elif args.format == "json":
        print(
            json.dumps(
                {"rows": json.loads(df.to_json(orient="records", date_format="iso")), "totals": totals(df)}, indent=1
            )
        )
    else:
        cols = ["partition", "strategy", "state", "duration_s", "stems", "cost_usd"]
        table = [tuple(cols)] + [
            tuple("" if v is None or v != v else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row)
            for row in df[cols].itertuples(index=False)
        ]
        print(format_table(table))
        t = totals(df)
        states = " / ".join(
            f"{t[s]} {s}" for s in ("current", "stale", "missing", "failed", "broken", "unused") if t[s]
        )
        print(
            f"\n{t['recordings']} recordings, {t['audio_hours'] * 60:.1f} min of audio, stem sets: {states or 'none'}, "
            f"{t['gpu_hours']:.3f} GPU-hours, ${t['cost_usd']:.2f}"
        )
    return 0
