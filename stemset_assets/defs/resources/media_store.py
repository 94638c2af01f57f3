"""``media_store``: the Dagster resource that opens the media store (a local folder or a bucket).

It hands out a :class:`gpu_worker.stores.base.ObjectStore`, the same interface the GPU worker
uses (paginated ``list``, ``head``, streaming ``open_read`` / ``download`` / ``upload``,
``put_bytes``, ``get_bytes``, ``delete``, ``copy``, ``url`` for playback, ``uri``):

- ``backend: local``: a :class:`~gpu_worker.stores.local.LocalObjectStore` on ``root``;
- ``backend: s3``: the boto3 client of dagster-aws' ``S3Resource`` (``endpoint_url``,
  ``region_name``, credentials) wrapped in an :class:`~gpu_worker.stores.s3.S3ObjectStore`, so
  Cloudflare R2 (region ``auto``), MinIO, SeaweedFS and AWS all work.

:meth:`MediaStoreResource.storage_ref` describes the same store for a separation job without
any secret (the worker brings its own credentials). :func:`open_store` opens the configured store
outside a run (the CLI, the web API).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, EnvVar
from pydantic import Field, PrivateAttr

from gpu_worker.errors import StorageError
from gpu_worker.job import StorageRef
from gpu_worker.stores.base import ObjectStore
from gpu_worker.stores.local import LocalObjectStore
from gpu_worker.stores.s3 import S3ObjectStore

from ...config import StemsetConfig, raw_section

MAX_PRESIGN_S = 7 * 24 * 3600  # the SigV4 maximum
_WHOLE_VAR = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}$")


class MediaStoreResource(ConfigurableResource):
    """Inputs, canonical recordings, stems and the catalog, in a folder or an S3-compatible bucket."""

    backend: str = Field(default="local", description="local | s3")
    root: str = Field(default="./media", description="local: the media folder (inputs/, recordings/, ...)")
    endpoint_url: str | None = Field(default=None, description="s3: e.g. https://<account>.r2.cloudflarestorage.com")
    bucket: str | None = Field(default=None, description="s3: the bucket")
    region: str | None = Field(default="auto", description="s3: region (`auto` for R2)")
    access_key_id: str | None = Field(default=None, description="s3: access key id (None: boto3's chain)")
    secret_access_key: str | None = Field(default=None, description="s3: secret access key")
    public_url: str | None = Field(default=None, description="s3: public base URL for playable links")
    max_attempts: int = Field(default=5, description="s3: attempts per request (standard retries)")
    url_expiry_s: int = Field(default=MAX_PRESIGN_S, description="lifetime of presigned playback URLs")

    _store: ObjectStore | None = PrivateAttr(default=None)

    # ------------------------------------------------------------------ the store

    def get_store(self) -> ObjectStore:
        """The object store (made once per resource instance)."""
        if self._store is None:
            self._store = self._open()
        return self._store

    def _open(self) -> ObjectStore:
        if self.backend == "local":
            return LocalObjectStore(Path(self.root).expanduser())
        if self.backend == "s3":
            if not self.bucket:
                raise StorageError(
                    "The media_store resource has backend s3 but no bucket.", "Set storage.s3.bucket in config.yaml."
                )
            from dagster_aws.s3 import S3Resource  # lazy: dagster-aws and boto3 load only for an s3 store

            client = S3Resource(
                endpoint_url=self.endpoint_url or None,
                region_name=self.region or None,
                aws_access_key_id=self.access_key_id or None,
                aws_secret_access_key=self.secret_access_key or None,
                max_attempts=self.max_attempts,
            ).get_client()
            return S3ObjectStore(client, self.bucket, public_url=self.public_url or None)
        raise StorageError(f"Unknown media_store backend {self.backend!r}.", "Use local or s3 (storage.backend).")

    def storage_ref(self) -> StorageRef:
        """This store as a job's storage reference: where, never the credentials."""
        if self.backend == "local":
            return StorageRef("local", root=str(Path(self.root).expanduser().absolute()))
        return StorageRef(
            "s3",
            bucket=self.bucket,
            endpoint_url=self.endpoint_url or None,
            region=self.region or None,
            public_url=self.public_url or None,
        )

    def playback_url(self, key: str) -> str:
        """A URL a browser can play ``key`` from (public URL, presigned GET, or ``file://``)."""
        return self.get_store().url(key, expires_s=min(self.url_expiry_s, MAX_PRESIGN_S))

    # ------------------------------------------------------------------ from config.yaml

    @classmethod
    def from_config(cls, config: StemsetConfig) -> MediaStoreResource:
        """The resource ``config.yaml``'s ``storage`` section describes.

        Credentials written as a bare ``${VAR}`` in the file become ``EnvVar("VAR")``, so the
        Dagster UI shows the variable's name instead of the secret.
        """
        storage = config.storage
        if storage.backend == "local":
            return cls(backend="local", root=str(storage.local.root))
        s3 = storage.s3
        assert s3 is not None
        raw = raw_section(config, "storage", "s3")
        return cls(
            backend="s3",
            root=str(storage.local.root),
            endpoint_url=s3.endpoint_url,
            bucket=s3.bucket,
            region=s3.region,
            access_key_id=env_or_value(raw.get("access_key_id"), s3.access_key_id),
            secret_access_key=env_or_value(raw.get("secret_access_key"), s3.secret_access_key),
            public_url=s3.public_url,
        )


def env_or_value(raw: Any, value: str | None) -> Any:
    """``EnvVar(VAR)`` when the file says just ``${VAR}`` (or ``${VAR:-...}`` and VAR holds the
    value), so the Dagster UI shows the variable's name instead of the secret; else ``value``."""
    match = _WHOLE_VAR.match(raw) if isinstance(raw, str) else None
    if match and value and (match.group(2) is None or os.environ.get(match.group(1)) == value):
        return EnvVar(match.group(1))
    return value


def open_store(config: StemsetConfig) -> ObjectStore:
    """The configured media store for use outside a Dagster run (the CLI, the web API): the
    same resource the assets use, with credentials as values rather than ``EnvVar`` (which only
    a run can resolve)."""
    if config.storage.backend != "s3" or config.storage.s3 is None:
        return MediaStoreResource.from_config(config).get_store()
    s3 = config.storage.s3
    return MediaStoreResource(
        backend="s3",
        root=str(config.storage.local.root),
        endpoint_url=s3.endpoint_url,
        bucket=s3.bucket,
        region=s3.region,
        access_key_id=s3.access_key_id,
        secret_access_key=s3.secret_access_key,
        public_url=s3.public_url,
    ).get_store()
