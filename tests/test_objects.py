"""The object store: one behaviour, two backends (a local folder and a real SeaweedFS S3)."""

from __future__ import annotations

import os
import socket
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gpu_worker.errors import StorageError
from gpu_worker.stores.base import MiB, ObjectStore
from gpu_worker.stores.local import LocalObjectStore
from gpu_worker.stores.publish import publish_set, staging_key
from gpu_worker.stores.s3 import S3ObjectStore

HOSTILE_KEYS = [
    "with space/a take.wav",
    "comma,separated,name.wav",
    "ünïcødé/曲 – Ωmega.flac",
    "hash#tag/x.wav",
    "question?mark.wav",
    "plus+sign+name.wav",
    "mixed %20 & = ; @ ~ ' (1) [2] {3}.wav",
]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    return request.getfixturevalue(f"{request.param}_store")


def small_parts(store: ObjectStore) -> ObjectStore:
    """The same store, with multipart uploads from 5 MiB in 5 MiB parts."""
    if isinstance(store, S3ObjectStore):
        return S3ObjectStore(store.client, store.bucket, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    return store


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keys(store: ObjectStore, prefix: str = "") -> list[str]:
    """The listed keys, sorted: S3 servers differ in listing order (SeaweedFS goes folder by folder)."""
    return sorted(o.key for o in store.list(prefix))


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=15) as r:
        return r.read()


# -- basics --------------------------------------------------------------------------------


def test_put_get_head(store: ObjectStore) -> None:
    assert store.head("a/b.txt") is None
    assert not store.exists("a/b.txt")
    before = time.time()
    store.put_bytes("a/b.txt", b"hello", content_type="text/plain")
    info = store.head("a/b.txt")
    assert info is not None and info.key == "a/b.txt" and info.size == 5 and info.etag
    assert before - 5 <= info.last_modified <= time.time() + 5
    assert store.get_bytes("a/b.txt") == b"hello"
    store.put_bytes("a/b.txt", b"hello, again")
    again = store.head("a/b.txt")
    assert again is not None and again.size == 12 and again.etag != info.etag
    assert store.get_bytes("a/b.txt") == b"hello, again"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b"" and store.head("empty").size == 0  # type: ignore[union-attr]


def test_list_paginates_past_1000(store: ObjectStore) -> None:
    many = [f"many/{i // 100:02d}/obj-{i:05d}.bin" for i in range(1100)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda k: store.put_bytes(k, k.encode()), many, timeout=120))
    store.put_bytes("many-not/x.bin", b"x")
    store.put_bytes("other/y.bin", b"y")
    listed = list(store.list("many/"))
    assert len(listed) == 1100
    assert sorted(o.key for o in listed) == sorted(many)
    assert all(o.size == len(o.key) for o in listed)
    if isinstance(store, S3ObjectStore):  # the server does page at 1000: a continuation was needed
        first = store.client.list_objects_v2(Bucket=store.bucket, Prefix="many/")
        assert first["IsTruncated"] and len(first["Contents"]) == 1000
    assert len(list(store.list(""))) == 1102


def test_prefix_filtering(store: ObjectStore) -> None:
    written = [
        "inputs/h4n/a.wav",
        "inputs/h4n/sub/b.wav",
        "inputs/h4nx/c.wav",
        "inputs/phone/d.m4a",
        "inputs-x.txt",
        "outputs/e.flac",
    ]
    for k in written:
        store.put_bytes(k, b"1")
    assert keys(store, "inputs/h4n/") == ["inputs/h4n/a.wav", "inputs/h4n/sub/b.wav"]
    assert keys(store, "inputs/h4n") == ["inputs/h4n/a.wav", "inputs/h4n/sub/b.wav", "inputs/h4nx/c.wav"]
    assert keys(store, "inputs") == sorted(k for k in written if k.startswith("inputs"))
    assert keys(store) == sorted(written)
    assert list(store.list("nothing/")) == []
    if isinstance(store, LocalObjectStore):  # local listings come in key order ('-' sorts before '/')
        assert [o.key for o in store.list("")] == sorted(written)
    assert list(store.list("inputs/h4n/a.wav")) == [store.head("inputs/h4n/a.wav")]


# -- streaming -------------------------------------------------------------------------


def test_streaming_upload_download(store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 123)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    store.upload(src, "stream/big.bin")
    assert store.head("stream/big.bin").size == len(data)  # type: ignore[union-attr]
    dest = tmp_path / "deep" / "er" / "out.bin"
    store.download("stream/big.bin", dest)
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["out.bin"]  # no temp file left behind
    with store.open_read("stream/big.bin") as f:
        chunks = []
        while chunk := f.read(256 * 1024):
            chunks.append(chunk)
    assert b"".join(chunks) == data
    with store.open_read("stream/big.bin") as f:
        assert f.read(10) == data[:10]
        assert f.read(5) == data[10:15]
        assert f.read() == data[15:]


def test_multipart_upload(store: ObjectStore, tmp_path: Path) -> None:
    small = small_parts(store)
    data = os.urandom(12 * MiB + 7)
    src = tmp_path / "take.wav"
    src.write_bytes(data)
    small.upload(src, "mp/take.wav", content_type="audio/wav")
    info = small.head("mp/take.wav")
    assert info is not None and info.size == len(data)
    if isinstance(store, S3ObjectStore):
        assert info.etag.endswith("-3"), info.etag  # 5 + 5 + 2 MiB parts
        meta = store.client.head_object(Bucket=store.bucket, Key="mp/take.wav")
        assert meta["ContentType"] == "audio/wav"
    dest = tmp_path / "back.wav"
    small.download("mp/take.wav", dest)
    assert dest.read_bytes() == data
    small.copy("mp/take.wav", "mp/copy.wav")  # a multipart server-side copy on S3
    assert small.get_bytes("mp/copy.wav") == data


# -- copy, delete, missing -------------------------------------------------------------


def test_copy_move_delete(store: ObjectStore) -> None:
    store.put_bytes("x/src.flac", b"stem")
    store.copy("x/src.flac", "y/dst.flac")
    assert store.get_bytes("y/dst.flac") == b"stem" and store.exists("x/src.flac")
    store.move("y/dst.flac", "z/moved.flac")
    assert store.get_bytes("z/moved.flac") == b"stem" and not store.exists("y/dst.flac")
    store.delete("x/src.flac")
    assert store.head("x/src.flac") is None
    store.delete("x/src.flac")  # deleting a missing key is fine
    store.delete("never/was.here")
    assert keys(store) == ["z/moved.flac"]


def test_missing_key_errors_name_the_key(store: ObjectStore, tmp_path: Path) -> None:
    for call in (
        lambda: store.get_bytes("no/such key.wav"),
        lambda: store.open_read("no/such key.wav"),
        lambda: store.download("no/such key.wav", tmp_path / "x.wav"),
        lambda: store.copy("no/such key.wav", "dst.wav"),
    ):
        with pytest.raises(StorageError) as info:
            call()
        assert "no/such key.wav" in str(info.value)
    assert not (tmp_path / "x.wav").exists()
    with pytest.raises(StorageError, match="no such file"):
        store.upload(tmp_path / "absent.wav", "k.wav")


# -- urls ------------------------------------------------------------------------------


def test_url_fetches_the_bytes(store: ObjectStore) -> None:
    data = os.urandom(1000)
    for key in ["plain/url.bin", "ünï code/a b#c?d+e,f.bin"]:
        store.put_bytes(key, data)
        url = store.url(key, expires_s=120)
        if isinstance(store, LocalObjectStore):
            assert url.startswith("file://")
            assert Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)).is_file()
            assert store.uri(key) == str(store.root / key)
        else:
            assert url.startswith("http://127.0.0.1:") and "X-Amz-Signature=" in url
            assert store.uri(key) == f"s3://{store.bucket}/{key}"
        assert fetch(url) == data


@pytest.mark.s3
def test_public_url_is_not_presigned(s3_store: S3ObjectStore) -> None:
    public = S3ObjectStore(s3_store.client, s3_store.bucket, public_url="https://media.example.com/")
    assert public.url("outputs/h4n/a b/vocals.m4a") == "https://media.example.com/outputs/h4n/a%20b/vocals.m4a"


# -- keys --------------------------------------------------------------------------------


def test_hostile_keys_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    for i, key in enumerate(HOSTILE_KEYS):
        store.put_bytes(key, f"{i}".encode())
    assert keys(store) == sorted(HOSTILE_KEYS)
    for i, key in enumerate(HOSTILE_KEYS):
        assert store.get_bytes(key) == f"{i}".encode()
        assert store.head(key).key == key  # type: ignore[union-attr]
        assert [o.key for o in store.list(key)] == [key]
        store.copy(key, "copies/" + key)
        store.download("copies/" + key, tmp_path / f"{i}.bin")
        assert (tmp_path / f"{i}.bin").read_bytes() == f"{i}".encode()
        assert fetch(store.url(key)) == f"{i}".encode()
        store.delete(key)
        assert store.head(key) is None
    assert keys(store) == sorted("copies/" + k for k in HOSTILE_KEYS)


@pytest.mark.parametrize(
    "key", ["../escape.txt", "a/../../escape.txt", "/etc/passwd", "a\x00b", "", "a//b", "./a", "a/.", "trailing/"]
)
def test_local_refuses_escaping_keys(local_store: LocalObjectStore, key: str) -> None:
    for call in (
        lambda: local_store.put_bytes(key, b"x"),
        lambda: local_store.get_bytes(key),
        lambda: local_store.head(key),
        lambda: local_store.delete(key),
    ):
        with pytest.raises(StorageError):
            call()
    assert not (local_store.root.parent / "escape.txt").exists()


def test_local_writes_are_atomic_and_temp_files_hidden(local_store: LocalObjectStore) -> None:
    local_store.put_bytes("d/a.txt", b"a")
    folder = local_store.root / "d"
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt"]
    (folder / ".stemset-tmp-abc123").write_bytes(b"half")  # a write in progress
    assert keys(local_store) == ["d/a.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (folder / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


# -- publishing a set ------------------------------------------------------------------


def _stage(store: ObjectStore, job: str, prefix: str, content: bytes) -> tuple[dict, dict]:
    final = {name: f"{prefix}/{name}.flac" for name in ("vocals", "drums", "bass", "other")}
    staged = {name: staging_key(key, job) for name, key in final.items()}
    for name, key in staged.items():
        store.put_bytes(key, content + name.encode())
    return staged, final


def test_publish_set(store: ObjectStore) -> None:
    prefix = "outputs/h4n/take3/htdemucs"
    store.put_bytes(f"{prefix}/manifest.json", b'{"old": true}')
    staged, final = _stage(store, "job-1", prefix, b"new-")
    assert all(".staging/job-1/" in k for k in staged.values())
    publish_set(store, staged, final, f"{prefix}/manifest.json", b'{"new": true}')
    assert store.get_bytes(f"{prefix}/manifest.json") == b'{"new": true}'
    for name, key in final.items():
        assert store.get_bytes(key) == b"new-" + name.encode()
    listed = keys(store)
    assert not [k for k in listed if ".staging" in k], listed
    assert listed == sorted([*final.values(), f"{prefix}/manifest.json"])
    if isinstance(store, LocalObjectStore):
        assert not (store.root / prefix / ".staging").exists()


def test_publish_set_failure_leaves_no_manifest(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = "outputs/h4n/take4/htdemucs"
    manifest_key = f"{prefix}/manifest.json"
    old_staged, final = _stage(store, "job-old", prefix, b"old-")
    publish_set(store, old_staged, final, manifest_key, b'{"v": 1}')
    staged, _ = _stage(store, "job-new", prefix, b"new-")

    calls = []
    real = store._publish_object

    def flaky(src: str, dst: str) -> None:
        calls.append(src)
        if len(calls) == 2:
            raise StorageError("simulated failure midway")
        real(src, dst)

    monkeypatch.setattr(store, "_publish_object", flaky)
    with pytest.raises(StorageError, match="simulated"):
        publish_set(store, staged, final, manifest_key, b'{"v": 2}')
    assert store.head(manifest_key) is None  # the old manifest is gone, the new one never written
    monkeypatch.undo()

    # A missing staged object fails before anything published is touched.
    store.put_bytes(manifest_key, b'{"v": 1}')
    with pytest.raises(StorageError, match="missing"):
        publish_set(
            store, {"vocals": "nope/.staging/j/vocals.flac"}, {"vocals": final["vocals"]}, manifest_key, b'{"v": 3}'
        )
    assert store.get_bytes(manifest_key) == b'{"v": 1}'

    # A retry with a fresh staging publishes the complete set.
    staged, _ = _stage(store, "job-retry", prefix, b"retry-")
    publish_set(store, staged, final, manifest_key, b'{"v": 2}')
    assert store.get_bytes(manifest_key) == b'{"v": 2}'
    assert all(store.get_bytes(k) == b"retry-" + n.encode() for n, k in final.items())


def test_staging_key() -> None:
    assert staging_key("outputs/p/s/htdemucs/vocals.m4a", "j1") == "outputs/p/s/htdemucs/.staging/j1/vocals.m4a"
    assert staging_key("vocals.m4a", "j1") == ".staging/j1/vocals.m4a"
    with pytest.raises(StorageError):
        staging_key("a/b", "x/y")


# -- errors ------------------------------------------------------------------------------


def test_unreachable_endpoint_is_quick_and_clear() -> None:
    secret = "UNREACHABLE-SECRET-value-0123456789"
    port = closed_port()
    store = S3ObjectStore.from_settings(
        f"http://127.0.0.1:{port}",
        "media",
        region="auto",
        access_key_id="AKIAUNREACHABLE0001",
        secret_access_key=secret,
        connect_timeout=1,
        read_timeout=2,
        max_attempts=1,
    )
    t0 = time.monotonic()
    for call in (
        lambda: store.get_bytes("k.wav"),
        lambda: list(store.list("inputs/")),
        lambda: store.head("k.wav"),
        lambda: store.put_bytes("k.wav", b"x"),
    ):
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert f"http://127.0.0.1:{port}" in message and "endpoint_url" in message
        assert secret not in message and secret not in repr(info.value)
    assert time.monotonic() - t0 < 20
    assert secret not in repr(store)


@pytest.mark.s3
def test_bad_secret_is_reported_without_leaking(seaweed, tmp_path: Path) -> None:
    bucket = seaweed.make_bucket()
    secret = "SUPER-SECRET-should-never-leak-9f8e7d6c5b4a"
    store = S3ObjectStore.from_settings(
        seaweed.endpoint_url,
        bucket,
        region=seaweed.region,
        access_key_id=seaweed.access_key_id,
        secret_access_key=secret,
        connect_timeout=2,
        max_attempts=1,
    )
    src = tmp_path / "f.bin"
    src.write_bytes(b"data")
    calls = [
        lambda: store.get_bytes("k"),
        lambda: list(store.list("")),
        lambda: store.head("k"),
        lambda: store.put_bytes("k", b"x"),
        lambda: store.upload(src, "k"),
        lambda: store.download("k", tmp_path / "out.bin"),
        lambda: store.copy("k", "k2"),
    ]
    for call in calls:
        with pytest.raises(StorageError) as info:
            call()
        text = str(info.value) + repr(info.value) + repr(info.value.__cause__)
        assert secret not in text
        assert seaweed.access_key_id not in text
        assert "secret" in text.lower() and seaweed.access_key_id[-4:] in text
    assert secret not in repr(store)
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.s3
def test_unknown_access_key_is_masked(seaweed) -> None:
    key_id = "AKIANOTAREALKEY7766"
    store = S3ObjectStore.from_settings(
        seaweed.endpoint_url,
        seaweed.make_bucket(),
        region=seaweed.region,
        access_key_id=key_id,
        secret_access_key="whatever-secret-000",
        max_attempts=1,
    )
    with pytest.raises(StorageError) as info:
        store.put_bytes("k", b"x")
    message = str(info.value)
    assert "InvalidAccessKeyId" in message and "****7766" in message
    assert key_id not in message and "whatever-secret-000" not in message


@pytest.mark.s3
def test_missing_bucket_says_create_it(seaweed) -> None:
    store = S3ObjectStore.from_settings(
        seaweed.endpoint_url,
        "stemset-no-such-bucket",
        region=seaweed.region,
        access_key_id=seaweed.access_key_id,
        secret_access_key=seaweed.secret_access_key,
        max_attempts=1,
    )
    for call in (lambda: store.put_bytes("k", b"x"), lambda: list(store.list("")), lambda: store.get_bytes("k")):
        with pytest.raises(StorageError) as info:
            call()
        assert "stemset-no-such-bucket" in str(info.value) and "Create it" in str(info.value)
