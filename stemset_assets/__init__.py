"""Stemset's Dagster side, in layers that import one way only:

``config`` (typed config) -> ``core`` (rules, no Dagster) -> ``defs`` (Dagster definitions and
the operations on Dagster) -> ``cli`` and ``api`` (interfaces). :mod:`stemset_assets.definitions`
is the Dagster code location. Importing this package imports nothing.
"""
