"""The run and backfill tags Stemset sets and reads (no Dagster here: plain strings).

- :data:`GPU_TAG`: on every run that separates stems (``stemset/gpu: "true"``); the production
  run queue caps how many such runs are in progress (``runs.gpu_concurrency``, rendered into
  ``deploy/dagster.yaml`` as a tag concurrency limit).
- :data:`ESTIMATE_TAG`: the estimated US$ of a run Stemset launched; the spend guard counts it as
  committed until the run's materialisations record what it cost.
- :data:`BACKFILL_ESTIMATE_TAG`: the same for a whole backfill (its runs inherit the backfill's
  tags, so the two names differ).
- :data:`HELD_BACK_TAG`: on a backfill, how many partitions the spend guard left out.
"""

GPU_TAG = "stemset/gpu"
GPU_TAG_VALUE = "true"
ESTIMATE_TAG = "stemset/estimated_cost_usd"
BACKFILL_ESTIMATE_TAG = "stemset/backfill_estimated_cost_usd"
HELD_BACK_TAG = "stemset/held_back"
BACKFILL_ID_TAG = "dagster/backfill"  # Dagster's own tag on a backfill's runs
PARTITION_TAG = "dagster/partition"  # Dagster's own: the partition a run materialises
PARTITION_RANGE_TAGS = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")  # or range
STEMS_KEY_PREFIX = "stems"  # stem asset keys are stems/<strategy>/<stem>


def gpu_tags() -> dict[str, str]:
    return {GPU_TAG: GPU_TAG_VALUE}


def estimate_tag(usd: float) -> dict[str, str]:
    return {ESTIMATE_TAG: f"{max(0.0, usd):.6f}"}
