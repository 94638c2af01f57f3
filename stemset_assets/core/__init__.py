"""Stemset's rules, free of Dagster: where things live in the bucket (:mod:`.layout`), partition
keys (:mod:`.partition_keys`), upload names and checks (:mod:`.uploads`), stem-set fingerprints,
data versions and states (:mod:`.stemsets`), cost (:mod:`.cost`), backfill planning
(:mod:`.backfill_plan`, :mod:`.selection`) and the UI's small plots (:mod:`.plots`)."""
