"""One object-store interface over a local folder and an S3-compatible bucket.

The GPU worker reads its input and writes its stems through an :class:`~.base.ObjectStore`; the
Dagster side wraps the same classes. Modules, by idea (this package re-exports nothing):

- :mod:`.base`: the :class:`~.base.ObjectStore` interface, :class:`~.base.ObjectInfo`, content types;
- :mod:`.local`: :class:`~.local.LocalObjectStore` keeps each key as a file under a root folder.
  Every write goes to a temporary file in the destination folder and is renamed into place, so a
  reader never sees a half-written object;
- :mod:`.s3`: :class:`~.s3.S3ObjectStore` talks to any S3-compatible service through boto3;
- :mod:`.publish`: :func:`~.publish.publish_set` publishes a set of objects so that its manifest
  exists only when the complete set is in place.

This package imports no Dagster.
"""
