"""The ``catalog`` asset: every recording x strategy, with its state, stems and cost.

The table is :func:`stemset_assets.core.catalog.build_catalog` over the instance's ``recordings``
partitions: the one state rule's rows (state and reason, stems, duration, the GPU or CPU seconds
the worker billed, the cost in US$), read from the bucket with the instance's fact cache. The
asset writes ``catalog/catalog.csv``, ``catalog/catalog.parquet`` and
``catalog/cost_over_time.png`` and shows a Markdown preview and totals. The ``stem_set_state``
sensor re-materialises it whenever any set's state changes.
"""

# No `from __future__ import annotations`: Dagster reads the context and resource annotations at runtime.

from dagster import AssetExecutionContext, AssetsDefinition, MaterializeResult, MetadataValue, asset

from ...config import StemsetConfig
from ...core.catalog import catalog_frame, markdown_table, save_catalog, totals
from ...core.layout import CATALOG_COST_PLOT, CATALOG_CSV, CATALOG_PARQUET
from ...core.plots import cost_over_time_png, inline_markdown_image
from ..asset_keys import CATALOG_KEY, stem_keys
from ..resources.media_store import MediaStoreResource
from ..status import read_status


def build_catalog_asset(config: StemsetConfig) -> AssetsDefinition:
    @asset(
        name=CATALOG_KEY.path[-1],
        deps=stem_keys(config),
        group_name="catalog",
        kinds={"pandas", "parquet"},
        description=(
            "Every recording x strategy: state (current / stale / missing / failed / broken / unused), stems, duration, GPU "
            "seconds and cost; saved as catalog/catalog.csv and catalog/catalog.parquet."
        ),
    )
    def catalog(context: AssetExecutionContext, media_store: MediaStoreResource) -> MaterializeResult:
        store = media_store.get_store()
        df = catalog_frame(store, read_status(context.instance, config, store=store))
        save_catalog(store, df)
        sums = totals(df)
        metadata = {
            "preview": MetadataValue.md(markdown_table(df)),
            "dagster/row_count": len(df),
            **{k: v for k, v in sums.items()},
            "csv": store.uri(CATALOG_CSV),
            "parquet": store.uri(CATALOG_PARQUET),
            "csv_url": MetadataValue.url(media_store.playback_url(CATALOG_CSV)),
        }
        made = df[df["manifest_fingerprint"].notna()]
        if len(made):
            png = cost_over_time_png(
                [t.timestamp() for t in made["made_at"]], list(made["cost_usd"]), list(made["gpu_seconds"])
            )
            store.put_bytes(CATALOG_COST_PLOT, png, content_type="image/png")
            metadata["cost_over_time"] = MetadataValue.md(inline_markdown_image(png, "cost over time"))
            metadata["cost_over_time_url"] = MetadataValue.url(media_store.playback_url(CATALOG_COST_PLOT))
        context.log.info(f"catalog: {sums}")
        return MaterializeResult(metadata=metadata)

    return catalog
