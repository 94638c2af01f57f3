"""The object-store interface every backend implements, and what it says about an object.

Keys are ``/``-separated, S3-style: ``inputs/h4n/take3.wav``.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath
from typing import BinaryIO

MiB = 1024 * 1024

# Content types that Python's mimetypes table lacks or gets wrong on some platforms; a
# correct type matters for stems played straight from a public bucket URL.
_CONTENT_TYPES = {
    ".flac": "audio/flac",
    ".m4a": "audio/mp4",
    ".mp4": "audio/mp4",
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",
    ".json": "application/json",
    ".csv": "text/csv",
    ".parquet": "application/vnd.apache.parquet",
    ".md": "text/markdown",
}


def guess_content_type(key: str) -> str | None:
    """The MIME type for a key, from its extension; None when unknown."""
    suffix = PurePath(key).suffix.lower()
    return _CONTENT_TYPES.get(suffix) or mimetypes.guess_type(key)[0]


def mask(secret: str | None) -> str:
    """``'****abcd'``: only the last four characters of a credential, for messages."""
    if not secret:
        return "(none)"
    return "****" + secret[-4:] if len(secret) > 8 else "****"


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object. ``etag`` changes whenever the content is rewritten: the S3 ETag
    (an MD5 for single-part uploads, ``<md5>-<parts>`` for multipart ones), or for local
    files a token made from size, modification time and inode (not a content hash)."""

    key: str
    size: int
    etag: str
    last_modified: float  # epoch seconds


class ObjectStore:
    """The interface both backends implement. Keys are ``/``-separated relative paths."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a string prefix, not a folder:
        ``inputs/h4`` matches ``inputs/h4n/a.wav``), recursively. Local stores yield in key
        order; S3 stores in the server's order (key order on AWS and R2, folder by folder on
        SeaweedFS), page by page without buffering: sort when order matters."""
        raise NotImplementedError

    def head(self, key: str) -> ObjectInfo | None:
        """The object's info, or None when there is no object at ``key``."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def download(self, key: str, path: str | os.PathLike[str]) -> None:
        """Stream the object into the file ``path`` (parent folders are created); the file
        appears complete or not at all."""
        raise NotImplementedError

    def open_read(self, key: str) -> BinaryIO:
        """A streaming, buffered binary reader; close it (or use ``with``)."""
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        raise NotImplementedError

    def upload(self, path: str | os.PathLike[str], key: str, content_type: str | None = None) -> None:
        """Stream the file at ``path`` to ``key`` (multipart above the store's threshold)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        raise NotImplementedError

    def copy(self, src_key: str, dst_key: str) -> None:
        raise NotImplementedError

    def move(self, src_key: str, dst_key: str) -> None:
        """Copy then delete the source (a rename where the backend has one)."""
        self.copy(src_key, dst_key)
        self.delete(src_key)

    def url(self, key: str, expires_s: int = 3600) -> str:
        """A URL a client can GET the object from."""
        raise NotImplementedError

    def uri(self, key: str) -> str:
        """Where the object lives, for people and metadata: ``s3://bucket/key`` or a path."""
        raise NotImplementedError

    # publish_set's hook: how a staged object becomes final. Copy by default (the staged
    # copy is deleted only after the manifest is written); a rename where that is atomic.
    def _publish_object(self, src_key: str, dst_key: str) -> None:
        self.copy(src_key, dst_key)
