"""A local folder as an object store: one file per key, every write atomic."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any, BinaryIO

from ..errors import StorageError
from .base import MiB, ObjectInfo, ObjectStore

TMP_PREFIX = ".stemset-tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)


class LocalObjectStore(ObjectStore):
    read_concurrency = 1  # reads are local file reads: threads would only add overhead (core.set_facts)
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
        if parts[-1].startswith(TMP_PREFIX):
            raise StorageError(f"Refusing object key {key!r}: names starting {TMP_PREFIX!r} are reserved.")
        return self.root.joinpath(*parts)

    def info(self, key: str, st: os.stat_result) -> ObjectInfo:
        """The ObjectInfo of ``key`` from its file's stat (a fast lister may stat files itself)."""
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
        return StorageError(
            f"Cannot {what} {key!r} under {self.root}: {err.strerror or err}.",
            "Check the folder's permissions and free space.",
        )

    # -- reads ------------------------------------------------------------------------
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if "\x00" in prefix:
            raise StorageError(f"Invalid prefix {prefix!r}: it contains a NUL character.")
        folder, _, _ = prefix.rpartition("/")
        start = self._path(folder) if folder else self.root
        found: list[ObjectInfo] = []
        seen: set[tuple[int, int]] = set()

        # Plain strings and os.scandir, not Path objects: a listing of 10,000 partitions walks ~30,000 folders.
        def walk(directory: str, rel: str) -> None:
            try:
                st = os.stat(directory)
                if (st.st_dev, st.st_ino) in seen:  # a symlink loop
                    return
                seen.add((st.st_dev, st.st_ino))
                with os.scandir(directory) as it:
                    entries = list(it)
            except (FileNotFoundError, NotADirectoryError):
                return
            except OSError as err:
                raise StorageError(
                    f"Cannot list {directory}: {err.strerror or err}.", "Check the folder's permissions."
                ) from err
            for entry in entries:
                key = f"{rel}{entry.name}"
                try:
                    if entry.is_dir():
                        if key.startswith(prefix) or prefix.startswith(key + "/"):
                            walk(entry.path, key + "/")
                    elif entry.is_file() and not entry.name.startswith(TMP_PREFIX) and key.startswith(prefix):
                        found.append(self.info(key, entry.stat()))
                except FileNotFoundError:  # removed while we listed
                    continue

        walk(str(start), f"{folder}/" if folder else "")
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
        return self.info(key, st) if path.is_file() else None

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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
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
