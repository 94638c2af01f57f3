"""Stemset's Dagster definitions and the operations that talk to Dagster.

:func:`stemset_assets.defs.build.build_definitions` turns a config into ``Definitions``: assets
(``assets/``: recording, stems, catalog), checks, sensors, resources (``resources/``: media store,
separator) and the ``recordings`` dynamic partitions. Beside them: the status over Dagster's
records (:mod:`.staleness`), launching runs and backfills (:mod:`.runs`, :mod:`.webserver`,
:mod:`.backfill`) and taking in uploads (:mod:`.intake`).
"""
