"""One object-store interface over a local folder and an S3-compatible bucket.

The GPU worker reads its input and writes its stems through an :class:`ObjectStore`; the
Dagster side wraps the same classes. Keys are ``/``-separated, S3-style: ``inputs/h4n/take3.wav``.

- :class:`LocalObjectStore` keeps each key as a file under a root folder. Every write goes to
  a temporary file in the destination folder and is renamed into place, so a reader never
  sees a half-written object.
- :class:`S3ObjectStore` talks to any S3-compatible service (Cloudflare R2, AWS, MinIO,
  SeaweedFS) through boto3. Every boto3/botocore failure surfaces as a
  :class:`~gpu_worker.errors.StorageError` that says what to check; secrets never appear in
  messages or reprs (access key ids are masked to their last four characters).
- :func:`publish_set` publishes a set of objects so that its manifest exists only when the
  complete set is in place.

This module imports no Dagster.
"""

from __future__ import annotations

import io
import logging
import mimetypes
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, BinaryIO, Iterator, Mapping

from .errors import StorageError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
MIN_PART_SIZE = 5 * MiB  # the S3 minimum for every part but the last
STAGING_DIR = ".staging"

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


def staging_key(final_key: str, job_id: str) -> str:
    """Where a job stages ``final_key`` before :func:`publish_set`:
    ``outputs/h4n/take3/htdemucs/vocals.m4a`` -> ``outputs/h4n/take3/htdemucs/.staging/<job_id>/vocals.m4a``.
    """
    if not job_id or "/" in job_id:
        raise StorageError(f"Invalid job id {job_id!r} for a staging key.", "Use a non-empty id without '/'.")
    head, _, name = final_key.rpartition("/")
    return f"{head}/{STAGING_DIR}/{job_id}/{name}" if head else f"{STAGING_DIR}/{job_id}/{name}"


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


# --------------------------------------------------------------------------------------
# Local folder
# --------------------------------------------------------------------------------------

_TMP_PREFIX = ".stemset-tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)


class LocalObjectStore(ObjectStore):
    """Objects as files under ``root``. Writes are atomic (temporary file + ``os.replace``);
    keys that would escape ``root`` (``..``, absolute paths, NUL) are refused."""

    def __init__(self, root: str | os.PathLike[str], fsync: bool = True):
        self.root = Path(root).expanduser().absolute()
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"LocalObjectStore(root={str(self.root)!r})"

    # -- keys -------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        if not isinstance(key, str) or not key:
            raise StorageError(f"Invalid object key {key!r}.", "Keys are non-empty '/'-separated relative paths.")
        if "\x00" in key:
            raise StorageError(f"Invalid object key {key!r}: it contains a NUL character.")
        parts = key.split("/")
        bad = [p for p in parts if p in ("", ".", "..")]
        seps = [s for s in (os.sep, os.altsep) if s and s != "/"]
        if bad or any(s in key for s in seps) or PurePath(key).is_absolute() or PurePath(key).drive:
            raise StorageError(
                f"Refusing object key {key!r}: it is absolute, has empty, '.' or '..' segments, "
                f"or would otherwise escape the media root {self.root}.",
                "Use a relative '/'-separated key such as 'inputs/h4n/take3.wav'.",
            )
        if parts[-1].startswith(_TMP_PREFIX):
            raise StorageError(f"Refusing object key {key!r}: names starting {_TMP_PREFIX!r} are reserved.")
        return self.root.joinpath(*parts)

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        etag = f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"
        return ObjectInfo(key=key, size=st.st_size, etag=etag, last_modified=st.st_mtime)

    def _missing(self, key: str) -> StorageError:
        return StorageError(f"No object at key {key!r} in {self.root}.", "Check the key and the media root.")

    def _os_error(self, what: str, key: str, err: OSError) -> StorageError:
        if isinstance(err, FileNotFoundError):
            return self._missing(key)
        if isinstance(err, (NotADirectoryError, FileExistsError, IsADirectoryError)):
            return StorageError(
                f"Cannot {what} {key!r} under {self.root}: a file and a folder collide on that path ({err.strerror}).",
                "A local store cannot hold both 'a' and 'a/b'; rename one of them.",
            )
        return StorageError(f"Cannot {what} {key!r} under {self.root}: {err.strerror or err}.",
                            "Check the folder's permissions and free space.")

    # -- reads ------------------------------------------------------------------------
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if "\x00" in prefix:
            raise StorageError(f"Invalid prefix {prefix!r}: it contains a NUL character.")
        folder, _, _ = prefix.rpartition("/")
        start = self._path(folder) if folder else self.root
        found: list[ObjectInfo] = []
        seen: set[tuple[int, int]] = set()

        def walk(directory: Path, rel: str) -> None:
            try:
                st = directory.stat()
                if (st.st_dev, st.st_ino) in seen:  # a symlink loop
                    return
                seen.add((st.st_dev, st.st_ino))
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                return
            except OSError as err:
                raise StorageError(f"Cannot list {directory}: {err.strerror or err}.",
                                   "Check the folder's permissions.") from err
            for entry in entries:
                key = f"{rel}{entry.name}"
                try:
                    if entry.is_dir():
                        if key.startswith(prefix) or prefix.startswith(key + "/"):
                            walk(Path(entry.path), key + "/")
                    elif entry.is_file() and not entry.name.startswith(_TMP_PREFIX) and key.startswith(prefix):
                        found.append(self._info(key, entry.stat()))
                except FileNotFoundError:  # removed while we listed
                    continue

        walk(start, f"{folder}/" if folder else "")
        found.sort(key=lambda info: info.key)
        yield from found

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            raise self._os_error("stat", key, err) from err
        return self._info(key, st) if path.is_file() else None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as err:
            raise self._os_error("read", key, err) from err

    def open_read(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except OSError as err:
            raise self._os_error("read", key, err) from err

    def download(self, key: str, path: str | os.PathLike[str]) -> None:
        src = self._path(key)
        try:
            _atomic_write(Path(path), lambda out: _copy_from(src, out), fsync=self.fsync)
        except OSError as err:
            if isinstance(err, FileNotFoundError) and not src.exists():
                raise self._missing(key) from err
            raise StorageError(f"Cannot download {key!r} from {self.root} to {path}: {err.strerror or err}.") from err

    # -- writes -----------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        try:
            _atomic_write(self._path(key), lambda out: out.write(data), fsync=self.fsync)
        except OSError as err:
            raise self._os_error("write", key, err) from err

    def upload(self, path: str | os.PathLike[str], key: str, content_type: str | None = None) -> None:
        src = Path(path)
        if not src.is_file():
            raise StorageError(f"Cannot upload {src}: no such file.")
        dst = self._path(key)
        try:
            _atomic_write(dst, lambda out: _copy_from(src, out), fsync=self.fsync)
        except OSError as err:
            raise self._os_error("write", key, err) from err

    def copy(self, src_key: str, dst_key: str) -> None:
        src, dst = self._path(src_key), self._path(dst_key)
        if not src.is_file():
            raise self._missing(src_key)
        try:
            _atomic_write(dst, lambda out: _copy_from(src, out), fsync=self.fsync)
        except OSError as err:
            raise self._os_error("copy to", dst_key, err) from err

    def move(self, src_key: str, dst_key: str) -> None:
        src, dst = self._path(src_key), self._path(dst_key)
        if not src.is_file():
            raise self._missing(src_key)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        except OSError as err:
            raise self._os_error("move to", dst_key, err) from err
        self._prune(src.parent)

    _publish_object = move  # a rename is atomic on one filesystem

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as err:
            raise self._os_error("delete", key, err) from err
        self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        """Remove folders left empty by a delete or move, up to (not including) the root."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def url(self, key: str, expires_s: int = 3600) -> str:
        return self._path(key).as_uri()

    def uri(self, key: str) -> str:
        return str(self._path(key))


def _copy_from(src: Path, out: BinaryIO) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, out, 4 * MiB)


def _atomic_write(path: Path, write: Any, fsync: bool = True) -> None:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, then rename it in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            if fsync:
                os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------
# S3-compatible bucket
# --------------------------------------------------------------------------------------

_AUTH_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AuthorizationHeaderMalformed", "InvalidToken",
    "ExpiredToken", "TokenRefreshRequired", "InvalidSecurity", "InvalidArgument_Authorization",
}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_NO_KEY_CODES = {"NoSuchKey", "404", "NotFound"}


class S3ObjectStore(ObjectStore):
    """Objects in one bucket of an S3-compatible service, through a boto3 S3 client."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        public_url: str | None = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int | None = None,
    ):
        if not bucket:
            raise StorageError("No S3 bucket given.", "Set storage.s3.bucket in config.yaml.")
        from boto3.s3.transfer import TransferConfig

        self.client = client
        self.bucket = bucket
        self.public_url = public_url.rstrip("/") if public_url else None
        self.multipart_threshold = int(multipart_threshold)
        chunk = multipart_chunksize or max(MIN_PART_SIZE, min(self.multipart_threshold, 16 * MiB))
        self.multipart_chunksize = int(chunk)
        self._transfer = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=8,
        )

    @classmethod
    def from_settings(
        cls,
        endpoint_url: str | None,
        bucket: str,
        region: str | None = "auto",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        public_url: str | None = None,
        *,
        session_token: str | None = None,
        connect_timeout: float = 10,
        read_timeout: float = 60,
        max_attempts: int = 5,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int | None = None,
    ) -> "S3ObjectStore":
        """A store on a new boto3 client: SigV4, path-style addressing, bounded timeouts and
        standard retries. Empty strings count as unset; unset credentials fall back to
        boto3's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / profiles)."""
        import boto3
        from botocore.config import Config

        options: dict[str, Any] = dict(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": max(1, int(max_attempts)), "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=32,
        )
        try:  # only send/verify checksums where S3 requires them: R2 and others lag behind AWS
            config = Config(**options, request_checksum_calculation="when_required",
                            response_checksum_validation="when_required")
        except TypeError:  # botocore < 1.36
            config = Config(**options)
        session = boto3.session.Session(
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            aws_session_token=session_token or None,
        )
        try:
            client = session.client("s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config)
        except ValueError as err:  # botocore rejects a malformed endpoint URL
            raise StorageError(f"Invalid S3 endpoint URL {endpoint_url!r}: {err}.",
                               "Set storage.s3.endpoint_url to e.g. https://<account>.r2.cloudflarestorage.com.") from None
        return cls(client, bucket, public_url=public_url or None, multipart_threshold=multipart_threshold,
                   multipart_chunksize=multipart_chunksize)

    @property
    def endpoint_url(self) -> str:
        return str(getattr(self.client.meta, "endpoint_url", "") or "")

    def __repr__(self) -> str:
        return (f"S3ObjectStore(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r}, "
                f"public_url={self.public_url!r})")

    # -- error translation ------------------------------------------------------------
    def _credentials(self) -> tuple[str | None, list[str]]:
        """(access key id, every credential string) from the client, for masking only."""
        creds = getattr(getattr(self.client, "_request_signer", None), "_credentials", None)
        if creds is None:
            return None, []
        values = []
        for name in ("access_key", "secret_key", "token"):
            value = getattr(creds, "_" + name, None) or (getattr(creds, name, None) if name in vars(creds) else None)
            values.append(value if isinstance(value, str) and value else None)
        return values[0], [v for v in values if v]

    def _error(self, err: BaseException, action: str, key: str | None = None) -> StorageError:
        """A StorageError saying what failed and what to check, with secrets scrubbed."""
        from botocore import exceptions as bx

        root = _botocore_cause(err) or err
        where = f"s3://{self.bucket}/{key}" if key is not None else f"bucket {self.bucket!r}"
        endpoint = self.endpoint_url or "(the default AWS endpoint)"
        key_id, secrets = self._credentials()
        hint: str | None = None
        if isinstance(root, (bx.ConnectionError, bx.HTTPClientError)):
            message = f"Could not reach the S3 endpoint {endpoint} to {action} {where} ({type(root).__name__})."
            hint = "Check storage.s3.endpoint_url (scheme, host, port) and the network or proxy between here and it."
        elif isinstance(root, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            message = f"No S3 credentials to {action} {where} at {endpoint}."
            hint = ("Set storage.s3.access_key_id and secret_access_key in config.yaml, or the "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY environment variables.")
        elif isinstance(root, bx.ClientError):
            error = root.response.get("Error", {}) if isinstance(root.response, dict) else {}
            code = str(error.get("Code") or "")
            status = (root.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            detail = str(error.get("Message") or root)
            if code in _AUTH_CODES:
                message = f"S3 rejected the credentials ({code}) when trying to {action} {where} at {endpoint}."
                hint = (f"Check the access key id (ending {mask(key_id)}) and its secret access key: "
                        "storage.s3.access_key_id / secret_access_key in config.yaml or AWS_ACCESS_KEY_ID / "
                        "AWS_SECRET_ACCESS_KEY, and that the secret belongs to that key.")
            elif code in _DENIED_CODES:
                message = f"S3 denied access (HTTP {status or 403}) to {action} {where} at {endpoint}."
                hint = (f"Check the access key id (ending {mask(key_id)}) and secret, and that the key is allowed "
                        f"to read and write bucket {self.bucket!r}.")
            elif code == "NoSuchBucket":
                message = f"Bucket {self.bucket!r} does not exist at {endpoint} (while trying to {action} {where})."
                hint = (f"Create it (Cloudflare dashboard > R2 > Create bucket, or "
                        f"`aws s3 mb s3://{self.bucket} --endpoint-url {endpoint}`), or fix storage.s3.bucket.")
            elif code in _NO_KEY_CODES or status == 404:
                message = f"No object at key {key!r} in bucket {self.bucket!r} ({endpoint}); cannot {action} it."
                hint = "Check the key; it may have been deleted or not uploaded yet."
            else:
                message = f"S3 could not {action} {where} at {endpoint}: {code or status}: {detail}"
        elif isinstance(root, bx.ParamValidationError):
            message = f"Invalid S3 request to {action} {where}: {root}"
        elif isinstance(root, bx.BotoCoreError):
            message = f"S3 client error while trying to {action} {where} at {endpoint}: {root}"
        else:
            message = f"Could not {action} {where} at {endpoint}: {type(root).__name__}: {root}"
        message, hint = _scrub(message, secrets), _scrub(hint, secrets) if hint else None
        return StorageError(message, hint)

    def _call(self, action: str, key: str | None, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StorageError:
            raise
        except Exception as err:
            if _botocore_cause(err) is None:
                raise
            raise self._error(err, action, key) from None

    # -- reads ------------------------------------------------------------------------
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=prefix))
        while True:
            page = self._call("list", prefix + "*", next, pages, None)
            if page is None:
                return
            for obj in page.get("Contents", ()):
                yield ObjectInfo(
                    key=obj["Key"],
                    size=int(obj.get("Size", 0)),
                    etag=str(obj.get("ETag", "")).strip('"'),
                    last_modified=obj["LastModified"].timestamp(),
                )

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            r = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in _NO_KEY_CODES or err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise self._error(err, "inspect", key) from None
        except Exception as err:
            if _botocore_cause(err) is None:
                raise
            raise self._error(err, "inspect", key) from None
        return ObjectInfo(key=key, size=int(r.get("ContentLength", 0)), etag=str(r.get("ETag", "")).strip('"'),
                          last_modified=r["LastModified"].timestamp())

    def get_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with body:
                return body.read()

        return self._call("read", key, get)

    def open_read(self, key: str) -> BinaryIO:
        body = self._call("read", key, lambda: self.client.get_object(Bucket=self.bucket, Key=key)["Body"])
        return io.BufferedReader(_S3Reader(self, key, body), buffer_size=MiB)  # type: ignore[return-value]

    def download(self, key: str, path: str | os.PathLike[str]) -> None:
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # s3transfer writes to a temporary name beside ``dest`` and renames it when complete.
        self._call("download", key, self.client.download_file, self.bucket, key, str(dest), Config=self._transfer)

    # -- writes -----------------------------------------------------------------------
    def _extra(self, key: str, content_type: str | None) -> dict[str, str]:
        ctype = content_type or guess_content_type(key)
        return {"ContentType": ctype} if ctype else {}

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        self._call("write", key, self.client.put_object, Bucket=self.bucket, Key=key, Body=data,
                   **self._extra(key, content_type))

    def upload(self, path: str | os.PathLike[str], key: str, content_type: str | None = None) -> None:
        src = Path(path)
        if not src.is_file():
            raise StorageError(f"Cannot upload {src}: no such file.")
        self._call("upload", key, self.client.upload_file, str(src), self.bucket, key,
                   ExtraArgs=self._extra(key, content_type) or None, Config=self._transfer)

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=key)

    def copy(self, src_key: str, dst_key: str) -> None:
        # Managed copy: a single CopyObject below the threshold, UploadPartCopy above (no 5 GB cap).
        self._call(f"copy to s3://{self.bucket}/{dst_key} from", src_key, self.client.copy,
                   {"Bucket": self.bucket, "Key": src_key}, self.bucket, dst_key, Config=self._transfer)

    def url(self, key: str, expires_s: int = 3600) -> str:
        """``public_url/key`` when the bucket has a public URL, else a presigned GET URL."""
        if self.public_url:
            return f"{self.public_url}/{urllib.parse.quote(key, safe='/')}"
        return self._call("sign a URL for", key, self.client.generate_presigned_url, "get_object",
                          Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(expires_s))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


class _S3Reader(io.RawIOBase):
    """A raw stream over a GetObject body whose failures surface as StorageError."""

    def __init__(self, store: S3ObjectStore, key: str, body: Any):
        self._store, self._key, self._body = store, key, body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._store._call("read", self._key, self._body.read, len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._body.close()
            finally:
                super().close()


def _botocore_cause(err: BaseException) -> BaseException | None:
    """The botocore exception behind ``err`` (boto3's transfer layer wraps them), if any."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (BotoCoreError, ClientError)):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, mask(secret))
    return text


# --------------------------------------------------------------------------------------
# Publishing a complete set
# --------------------------------------------------------------------------------------

def publish_set(
    store: ObjectStore,
    staged: Mapping[str, str],
    final: Mapping[str, str],
    manifest_key: str,
    manifest: bytes,
) -> None:
    """Publish the staged objects under their final keys, then the manifest.

    ``staged`` and ``final`` map the same names (e.g. stem names) to a staging key (see
    :func:`staging_key`) and a final key. The steps:

    1. check every staged object exists (nothing published is touched before this passes);
    2. delete the old manifest at ``manifest_key``, if any;
    3. move each staged object to its final key (a rename on a local store, a server-side
       copy on S3);
    4. write the manifest, last;
    5. delete the staged objects (best effort: leftovers are logged, the set stays published).

    Guarantee: a manifest exists at ``manifest_key`` only when its complete set is in place.
    A failure in steps 2-4 leaves no manifest (the old one is already gone), so readers treat
    the set as missing and a retry republishes it; final objects may then be a mix of old and
    new, which is why readers must go through the manifest. The staged copies of a failed
    publish stay where they are. Readers that fetched the old manifest before step 2 may still
    read objects that step 3 is replacing.
    """
    if set(staged) != set(final):
        raise StorageError(
            f"publish_set needs the same names in staged and final; got {sorted(staged)} and {sorted(final)}."
        )
    missing = [key for key in staged.values() if store.head(key) is None]
    if missing:
        raise StorageError(f"Cannot publish {manifest_key!r}: staged objects are missing: {missing}.",
                           "Every object must be staged before the set is published.")
    store.delete(manifest_key)
    for name, src in staged.items():
        if src != final[name]:
            store._publish_object(src, final[name])
    store.put_bytes(manifest_key, manifest, content_type="application/json")
    for name, src in staged.items():
        if src == final[name]:
            continue
        try:
            store.delete(src)
        except StorageError as err:
            log.warning("Published %s but could not delete staged object %s: %s", manifest_key, src, err)


# --------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------

def store_from_uri(uri: str) -> tuple[ObjectStore, str]:
    """``(store, key)`` for an object URI.

    - ``s3://bucket/key``: an :class:`S3ObjectStore` on ``STEMSET_S3_ENDPOINT_URL`` (else
      ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, else AWS itself), region from
      ``AWS_REGION``/``AWS_DEFAULT_REGION`` (else ``auto``, or ``us-east-1`` on AWS), credentials
      from the ``AWS_*`` variables.
    - ``file:///abs/path`` or a plain path: a :class:`LocalObjectStore` rooted at the file's
      folder and the file name as key; for an existing folder or a path ending in ``/``, the
      store is rooted there and the key is ``""``.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "s3":
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        if not bucket:
            raise StorageError(f"No bucket in {uri!r}.", "Write S3 URIs as s3://bucket/key.")
        endpoint = (os.environ.get("STEMSET_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL") or None)
        region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                  or ("auto" if endpoint else "us-east-1"))
        return S3ObjectStore.from_settings(endpoint, bucket, region=region), key
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"Cannot open {uri!r}: file URIs on another host are not supported.")
        raw = urllib.request.url2pathname(parsed.path)
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive
        raise StorageError(f"Unsupported storage URI {uri!r}.", "Use s3://bucket/key, file:///path or a local path.")
    else:
        raw = uri
    path = Path(raw).expanduser().absolute()
    if raw.endswith(("/", os.sep)) or path.is_dir():
        return LocalObjectStore(path), ""
    return LocalObjectStore(path.parent), path.name
