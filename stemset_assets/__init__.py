"""Stemset's Dagster side: config, assets, checks, sensors, resources, CLI and web API.

Importing this package imports nothing heavy (no Dagster, no torch); the Dagster
``Definitions`` live in :mod:`stemset_assets.definitions`.
"""
