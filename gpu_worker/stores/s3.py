"""An S3-compatible bucket (Cloudflare R2, AWS, MinIO, SeaweedFS) as an object store, through boto3.

Every boto3/botocore failure surfaces as a :class:`~gpu_worker.errors.StorageError` that says
what to check; secrets never appear in messages or reprs (access key ids are masked to their
last four characters).
"""

from __future__ import annotations

import io
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import StorageError
from .base import MiB, ObjectInfo, ObjectStore, guess_content_type, mask

DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
MIN_PART_SIZE = 5 * MiB  # the S3 minimum for every part but the last

_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AuthorizationHeaderMalformed",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidSecurity",
    "InvalidArgument_Authorization",
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
        from boto3.s3.transfer import TransferConfig  # boto3 is lazy: ~0.2 s that local-only users skip

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
    ) -> S3ObjectStore:
        """A store on a new boto3 client: SigV4, path-style addressing, bounded timeouts and
        standard retries. Empty strings count as unset; unset credentials fall back to
        boto3's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / profiles)."""
        import boto3  # lazy, as above
        import botocore.session
        from botocore.config import Config

        from .s3_listing import install_lean_listing
        from .s3_timestamps import parse_s3_timestamp

        options: dict[str, Any] = dict(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": max(1, int(max_attempts)), "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=32,
        )
        try:  # only send/verify checksums where S3 requires them: R2 and others lag behind AWS
            config = Config(
                **options, request_checksum_calculation="when_required", response_checksum_validation="when_required"
            )
        except TypeError:  # botocore < 1.36
            config = Config(**options)
        core_session = botocore.session.get_session()
        # dateutil reads every listed object's timestamp: most of a listing's CPU (s3_timestamps)
        core_session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_s3_timestamp)
        session = boto3.session.Session(
            botocore_session=core_session,
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            aws_session_token=session_token or None,
        )
        try:
            client = session.client("s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config)
        except ValueError as err:  # botocore rejects a malformed endpoint URL
            raise StorageError(
                f"Invalid S3 endpoint URL {endpoint_url!r}: {err}.",
                "Set storage.s3.endpoint_url to e.g. https://<account>.r2.cloudflarestorage.com.",
            ) from None
        install_lean_listing(client, parse_s3_timestamp)  # ~30% less CPU per listed object (s3_listing)
        return cls(
            client,
            bucket,
            public_url=public_url or None,
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
        )

    @property
    def endpoint_url(self) -> str:
        return str(getattr(self.client.meta, "endpoint_url", "") or "")

    def __repr__(self) -> str:
        return (
            f"S3ObjectStore(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r}, public_url={self.public_url!r})"
        )

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
        from botocore import exceptions as bx  # lazy, as above

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
            hint = (
                "Set storage.s3.access_key_id and secret_access_key in config.yaml, or the "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY environment variables."
            )
        elif isinstance(root, bx.ClientError):
            error = root.response.get("Error", {}) if isinstance(root.response, dict) else {}
            code = str(error.get("Code") or "")
            status = (root.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            detail = str(error.get("Message") or root)
            if code in _AUTH_CODES:
                message = f"S3 rejected the credentials ({code}) when trying to {action} {where} at {endpoint}."
                hint = (
                    f"Check the access key id (ending {mask(key_id)}) and its secret access key: "
                    "storage.s3.access_key_id / secret_access_key in config.yaml or AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY, and that the secret belongs to that key."
                )
            elif code in _DENIED_CODES:
                message = f"S3 denied access (HTTP {status or 403}) to {action} {where} at {endpoint}."
                hint = (
                    f"Check the access key id (ending {mask(key_id)}) and secret, and that the key is allowed "
                    f"to read and write bucket {self.bucket!r}."
                )
            elif code == "NoSuchBucket":
                message = f"Bucket {self.bucket!r} does not exist at {endpoint} (while trying to {action} {where})."
                hint = (
                    f"Create it (Cloudflare dashboard > R2 > Create bucket, or "
                    f"`aws s3 mb s3://{self.bucket} --endpoint-url {endpoint}`), or fix storage.s3.bucket."
                )
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
        from botocore.exceptions import ClientError  # lazy, as above

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
        return ObjectInfo(
            key=key,
            size=int(r.get("ContentLength", 0)),
            etag=str(r.get("ETag", "")).strip('"'),
            last_modified=r["LastModified"].timestamp(),
        )

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
        self._call(
            "write",
            key,
            self.client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=data,
            **self._extra(key, content_type),
        )

    def upload(self, path: str | os.PathLike[str], key: str, content_type: str | None = None) -> None:
        src = Path(path)
        if not src.is_file():
            raise StorageError(f"Cannot upload {src}: no such file.")
        self._call(
            "upload",
            key,
            self.client.upload_file,
            str(src),
            self.bucket,
            key,
            ExtraArgs=self._extra(key, content_type) or None,
            Config=self._transfer,
        )

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=key)

    def copy(self, src_key: str, dst_key: str) -> None:
        # Managed copy: a single CopyObject below the threshold, UploadPartCopy above (no 5 GB cap).
        self._call(
            f"copy to s3://{self.bucket}/{dst_key} from",
            src_key,
            self.client.copy,
            {"Bucket": self.bucket, "Key": src_key},
            self.bucket,
            dst_key,
            Config=self._transfer,
        )

    def url(self, key: str, expires_s: int = 3600) -> str:
        """``public_url/key`` when the bucket has a public URL, else a presigned GET URL."""
        if self.public_url:
            return f"{self.public_url}/{urllib.parse.quote(key, safe='/')}"
        return self._call(
            "sign a URL for",
            key,
            self.client.generate_presigned_url,
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=int(expires_s),
        )

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
    from botocore.exceptions import BotoCoreError, ClientError  # lazy, as above

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
