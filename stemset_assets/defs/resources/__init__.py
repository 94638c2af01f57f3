"""Dagster resources: the media store and the separator."""

from .media_store import MediaStoreResource
from .separator import SeparatorResource

__all__ = ["MediaStoreResource", "SeparatorResource"]
