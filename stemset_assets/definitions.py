"""Stemset's Dagster code location (workspace.yaml: ``python_module: stemset_assets.definitions``).

Dagster's lazy form: nothing is built at import. Loading the location calls :func:`defs`, which
reads the config (``$STEMSET_CONFIG``, else ``./config.yaml``, else the built-in default) and
builds the definitions (:func:`stemset_assets.defs.build.build_definitions`).
"""

import dagster as dg

from stemset_assets.config import load_config
from stemset_assets.defs.build import build_definitions


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_config())
