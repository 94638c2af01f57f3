"""The store reads S3 listings with its own ``<Contents>`` reader (gpu_worker.stores.s3_listing):
the same objects, fields and pages as botocore's parser gives, on a real SeaweedFS server, and
botocore's parser untouched wherever the reader is not sure."""

import pytest

from gpu_worker.stores import s3_listing
from gpu_worker.stores.s3 import S3ObjectStore
from gpu_worker.stores.s3_timestamps import parse_s3_timestamp

# Names a listing must carry through XML escaping and EncodingType=url decoding.
KEYS = [
    "k/plain.wav",
    "k/with space.m4a",
    "k/amp&lt<gt>.wav",
    "k/quote\"apos'.wav",
    "k/plus+percent%20.wav",
    "k/ünïcødé/テイク.flac",
    "k/tab\tand~tilde.wav",
    "k/deep/er/still.json",
]
FIELDS = ("Key", "Size", "ETag", "LastModified", "StorageClass")


def _store(seaweed, bucket: str) -> S3ObjectStore:
    return S3ObjectStore.from_settings(
        seaweed.endpoint_url, bucket, seaweed.region, seaweed.access_key_id, seaweed.secret_access_key
    )


@pytest.fixture
def filled(seaweed):
    bucket = seaweed.make_bucket()
    store = _store(seaweed, bucket)
    for i, key in enumerate(KEYS):
        store.put_bytes(key, b"x" * (i + 1))
    store.put_bytes("other/outside.wav", b"y")
    return store, bucket


def _pages(client, bucket: str, page_size: int) -> list[dict]:
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="k/", PaginationConfig={"PageSize": page_size}
    )
    return [
        {
            "Contents": [{f: obj.get(f) for f in FIELDS} for obj in page.get("Contents", [])],
            "IsTruncated": page.get("IsTruncated"),
            "KeyCount": page.get("KeyCount"),
            "NextContinuationToken": page.get("NextContinuationToken"),
        }
        for page in pages
    ]


@pytest.mark.parametrize("page_size", [3, 1000])
def test_lean_listing_gives_botocores_pages_and_objects(seaweed, filled, monkeypatch, page_size):
    store, bucket = filled
    read = []
    real = s3_listing.read_listing
    monkeypatch.setattr(s3_listing, "read_listing", lambda body, parse: read.append(1) or real(body, parse))
    plain = seaweed.client()  # botocore's own parser, nothing hooked
    lean_pages = _pages(store.client, bucket, page_size)
    assert read, "the store's client did not read its listings with the lean reader"
    assert lean_pages == _pages(plain, bucket, page_size)
    assert len(lean_pages) == (3 if page_size == 3 else 1)
    assert [o["Key"] for p in lean_pages for o in p["Contents"]] == sorted(KEYS)

    listed = list(store.list("k/"))
    want = [
        obj
        for page in plain.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="k/")
        for obj in page["Contents"]
    ]
    assert [(i.key, i.size, i.etag, i.last_modified) for i in listed] == [
        (o["Key"], o["Size"], o["ETag"].strip('"'), o["LastModified"].timestamp()) for o in want
    ]
    assert {i.key: i.size for i in listed}["k/with space.m4a"] == 2


def test_an_empty_listing_and_a_missing_bucket_are_botocores(seaweed, filled):
    store, bucket = filled
    assert list(store.list("nothing/here/")) == []
    gone = _store(seaweed, "no-such-bucket-" + bucket[-6:])
    with pytest.raises(Exception, match="does not exist"):
        list(gone.list("k/"))


NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'
GOOD = (
    f"<?xml version='1.0' encoding='UTF-8'?><ListBucketResult {NS}><Name>b</Name><KeyCount>1</KeyCount>"
    "<IsTruncated>false</IsTruncated><Contents><Key>a&amp;b</Key><LastModified>2026-12-02T18:20:00.000Z"
    "</LastModified><ETag>&quot;e1&quot;</ETag><Size>12</Size><StorageClass>STANDARD</StorageClass>"
    "<Owner><ID>x</ID></Owner></Contents></ListBucketResult>"
).encode()


def test_reader_reads_one_listing():
    (item,), envelope = s3_listing.read_listing(GOOD, parse_s3_timestamp)
    assert b"<Contents>" not in envelope and envelope.startswith(GOOD[: GOOD.index(b"<Contents>")])
    assert item == {
        "Key": "a&b",
        "LastModified": parse_s3_timestamp("2026-12-02T18:20:00.000Z"),
        "ETag": '"e1"',
        "Size": 12,
        "StorageClass": "STANDARD",
    }


def test_reader_unescapes_what_xml_escapes():
    body = GOOD.replace(b"a&amp;b", b"&lt;&#x41;&#66;&apos;&gt;&quot;&amp;amp;")
    ((item,), _) = s3_listing.read_listing(body, parse_s3_timestamp)
    assert item["Key"] == "<AB'>\"&amp;"


@pytest.mark.parametrize(
    "body",
    [
        b"<Error><Code>AccessDenied</Code></Error>",  # not a listing
        GOOD.replace(b"<Size>12</Size>", b"<Size>twelve</Size>"),  # a field it cannot read
        GOOD.replace(b"<Key>a&amp;b</Key>", b""),  # an entry without a key
        GOOD.replace(b"<Contents>", b'<Contents a="1">'),  # an element the stripping pattern would miss
        GOOD.replace(b"</ListBucketResult>", b'<Contents\n a="1"></Contents></ListBucketResult>'),  # one of each
        GOOD[:-20],  # cut short
        GOOD.replace(b"</Contents>", b""),  # an entry never closed
        GOOD.replace(b"<Size>12</Size>", b"<Size>12</Size><Size>13</Size>"),  # a field twice
        GOOD.replace(b"a&amp;b", b"a&eacute;b"),  # an entity XML does not define
        GOOD.replace(b"a&amp;b", b"a<!-- c -->b"),  # a comment inside a field
        GOOD.replace(b"a&amp;b", b"<![CDATA[a&b]]>"),  # CDATA
        GOOD.replace(b"a&amp;b", b"a\r\nb"),  # a carriage return XML would rewrite
        GOOD.replace(b"<Key>", b"<Key xml:space='preserve'>"),  # an attribute on a field
    ],
)
def test_reader_leaves_what_it_is_not_sure_of_to_botocore(body):
    assert s3_listing.read_listing(body, parse_s3_timestamp) is None


def test_handler_leaves_an_unread_body_as_it_was():
    handlers = []

    class Events:
        def register(self, event, handler, unique_id=None):
            handlers.append((event, handler))

    class Client:
        class meta:
            events = Events()

    s3_listing.install_lean_listing(Client(), parse_s3_timestamp)
    ((event, handler),) = handlers
    assert event == "before-parse.s3.ListObjectsV2"
    bad = GOOD.replace(b"<Size>12</Size>", b"<Size>x</Size>")
    for status, body in ((200, bad), (403, GOOD)):
        response, custom = {"status_code": status, "body": body}, {}
        handler(response_dict=response, customized_response_dict=custom)
        assert response["body"] == body and custom == {}
    response, custom = {"status_code": 200, "body": GOOD}, {}
    handler(response_dict=response, customized_response_dict=custom)
    assert b"<Contents>" not in response["body"] and b"<KeyCount>1</KeyCount>" in response["body"]
    assert [c["Key"] for c in custom["Contents"]] == ["a&b"]
