"""Stemset's typed, strict config: ``config.yaml`` read into frozen dataclasses.

- :mod:`.schema`: the dataclasses (one per section) and fixed vocabularies;
- :mod:`.loading`: finding the file (``--config``, ``$STEMSET_CONFIG``, ``./config.yaml``, the
  embedded default) and parsing its YAML;
- :mod:`.sections` reads each section, on :mod:`.values` (typed values) and :mod:`.env`
  (``${VAR}`` and ``${VAR:-default}`` substitution).

Every error is a :class:`~gpu_worker.errors.ConfigError` naming the file and the key path, e.g.
``config.yaml: gpu.backend must be one of local, modal, http (got 'cuda')``. This package
imports neither Dagster nor torch.
"""

from .loading import (
    CONFIG_ENV,
    DEFAULT_CONFIG_NAME,
    DEFAULT_CONFIG_YAML,
    load_config,
    parse_config,
    raw_section,
)
from .schema import (
    AAC_CODERS,
    DEFAULT_PRICES,
    EMBEDDED_SOURCE,
    FINISH_ON,
    GPU_BACKENDS,
    MODEL_REPO_ENV,
    NAME,
    NAME_HINT,
    OUTPUT_FORMATS,
    SECRET_FIELDS,
    STORAGE_BACKENDS,
    ApiConfig,
    AutoReprocess,
    BackfillConfig,
    BudgetConfig,
    CostConfig,
    DagsterConfig,
    GpuConfig,
    LocalStorage,
    ModelsConfig,
    OutputSpec,
    Profile,
    RunsConfig,
    S3Storage,
    SensorsConfig,
    StemsetConfig,
    StorageConfig,
)

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_NAME",
    "DEFAULT_CONFIG_YAML",
    "DEFAULT_PRICES",
    "EMBEDDED_SOURCE",
    "FINISH_ON",
    "GPU_BACKENDS",
    "MODEL_REPO_ENV",
    "NAME",
    "NAME_HINT",
    "OUTPUT_FORMATS",
    "AAC_CODERS",
    "SECRET_FIELDS",
    "STORAGE_BACKENDS",
    "ApiConfig",
    "AutoReprocess",
    "BackfillConfig",
    "BudgetConfig",
    "CostConfig",
    "DagsterConfig",
    "GpuConfig",
    "LocalStorage",
    "ModelsConfig",
    "OutputSpec",
    "Profile",
    "RunsConfig",
    "S3Storage",
    "SensorsConfig",
    "StemsetConfig",
    "StorageConfig",
    "load_config",
    "parse_config",
    "raw_section",
]
