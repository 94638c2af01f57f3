"""Issue 14, deliver 2: upload names that cannot collide. ``coll x.wav`` and ``coll  x.wav`` (two
spaces) normalise to the same name; sent at once they must still be two objects, two partitions
and two jobs, each returning its own file's stems."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from dagster import instance_for_test

from gpu_worker.stores.base import ObjectStore
from stemset_assets.core.partition_keys import base_slug, partition_key
from stemset_assets.core.uploads import content_named, safe_filename
from stemset_assets.defs.intake import ingest_file
from tests.api_server import api_server, wait_for_job
from tests.audio_fixtures import music_like, write_audio
from tests.model_fixtures import make_model_repo

NAMES = ("coll x.wav", "coll  x.wav")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def takes(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in range(len(NAMES)):
        path = folder / f"file{seed}.wav"
        write_audio(path, music_like(1.0, seed=seed + 1), 44100)
        out.append(path)
    return out


def test_content_named_keeps_the_name_and_adds_the_content_hash():
    a, b = sha(b"a"), sha(b"b")
    assert safe_filename(NAMES[0]) == safe_filename(NAMES[1])  # the names collide once normalised...
    assert content_named(NAMES[0], a) == f"coll x-{a[:12]}.wav"
    assert content_named(NAMES[1], b) != content_named(NAMES[0], a)  # ...the object names do not
    assert content_named(NAMES[1], a) == content_named(NAMES[0], a)  # the same file twice: one object
    assert content_named("../../etc/passwd.wav", a) == f"passwd-{a[:12]}.wav"
    assert content_named("no extension", a) == f"no extension-{a[:12]}"
    long = content_named("ä" * 300 + ".flac", a)
    assert len(long.encode()) <= 120 and long.endswith(f"-{a[:12]}.flac")
    # the slug keeps the hash however long the name, so partitions stay apart too
    key_a = "inputs/h4n/" + content_named("x" * 200 + ".wav", a)
    key_b = "inputs/h4n/" + content_named("x" * 200 + ".wav", b)
    assert base_slug("h4n", key_a).endswith(a[:12]) and base_slug("h4n", key_a) != base_slug("h4n", key_b)
    assert partition_key("h4n", key_a) != partition_key("h4n", key_b)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_same_normalised_name_at_once_gives_two_objects_and_partitions(tmp_path, backend, request):
    store: ObjectStore = request.getfixturevalue("local_store" if backend == "local" else "s3_store")
    files = takes(tmp_path / "takes")
    with instance_for_test() as instance:
        with ThreadPoolExecutor(2) as pool:
            got = list(
                pool.map(lambda pn: ingest_file(store, instance, "h4n", pn[0], pn[1]), zip(files, NAMES, strict=True))
            )
        assert len({g.object_key for g in got}) == 2, got
        assert len({g.partition for g in got}) == 2, got
        for ingested, path in zip(got, files, strict=True):
            assert store.get_bytes(ingested.object_key) == path.read_bytes()  # each object holds its own file
        assert sorted(instance.get_dynamic_partitions("recordings")) == sorted(g.partition for g in got)
        # the same file again: the same object and partition, not uploaded a second time
        etag = store.head(got[0].object_key).etag
        again = ingest_file(store, instance, "h4n", files[0], NAMES[1])
        assert again == got[0] and store.head(got[0].object_key).etag == etag


def test_api_uploads_at_once_each_job_returns_its_own_stems(tmp_path_factory):
    repo = make_model_repo(tmp_path_factory.mktemp("models"))
    files = takes(tmp_path_factory.mktemp("takes"))
    with api_server(tmp_path_factory.mktemp("api"), repo) as server:

        def send(pair: tuple[Path, str]) -> dict:
            path, name = pair
            resp = httpx.post(
                f"{server.url}/api/upload/h4n",
                files={"file": (name, path.read_bytes(), "audio/wav")},
                headers=server.headers(),
                timeout=60,
            )
            assert resp.status_code == 202, resp.text
            return resp.json()

        with ThreadPoolExecutor(2) as pool:
            bodies = list(pool.map(send, zip(files, NAMES, strict=True)))
        assert len({b["object_key"] for b in bodies}) == 2 and len({b["partition"] for b in bodies}) == 2
        for body, path in zip(bodies, files, strict=True):
            job = wait_for_job(server, body["job_id"])
            assert job["status"] == "complete", job
            record = json.loads((server.media / "recordings" / body["partition"] / "recording.json").read_text())
            assert record["sha256"] == sha(path.read_bytes())  # its own file was separated...
            assert record["original_key"] == body["object_key"]
            for url in job["stems"].values():  # ...and its stems are that partition's
                assert f"/api/media/outputs/{body['partition']}/" in url
                assert httpx.get(server.url + url, headers=server.headers(), timeout=10).status_code == 200
        # staging objects are never served (issue 14, deliver 3)
        staged = server.media / "outputs" / bodies[0]["partition"] / "htdemucs" / ".staging" / "j.0" / "vocals.flac"
        staged.parent.mkdir(parents=True)
        staged.write_bytes(b"fLaC half")
        url = f"{server.url}/api/media/outputs/{bodies[0]['partition']}/htdemucs/.staging/j.0/vocals.flac"
        assert httpx.get(url, headers=server.headers(), timeout=10).status_code == 404
