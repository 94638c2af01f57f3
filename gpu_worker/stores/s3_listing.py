"""A leaner reader for S3 listings (``ListObjectsV2``), hooked into botocore's own client.

botocore reads every ``<Contents>`` element of a listing through its general, model-driven XML
parser, and a status over 100,000 partitions lists 700,000 objects. On a 2-core AMD EPYC a listed
object cost ~70 µs of CPU that way; building an ElementTree of the page still cost ~29 µs of it
(18 µs in the parse alone, the namespace-qualified tags of every field). Here a ``before-parse``
handler (botocore's documented hook for customising a response before its parser runs) cuts the
page at its ``<Contents>`` tags and reads each entry's five flat fields with one pattern (~12 µs an
object for the whole read, timestamps included), hands them to botocore as the ``Contents`` of the
parsed response, and leaves botocore only the envelope (truncation, continuation token, counts) to
parse. Everything after that is botocore's as before: pagination, retries, errors, and the
``EncodingType=url`` decoding of keys.

Each entry carries what the store reads (``Key``, ``Size``, ``ETag``, ``LastModified``) plus
``StorageClass``; ``Owner`` and checksum fields are not read. The reader takes only what XML's own
rules make unambiguous (markup cannot occur in text, so a ``<Contents>`` tag is an element), and
leaves to botocore's parser, untouched, any response it is not sure of: an error, a body that is
not one whole listing, comments, CDATA, attributes, carriage returns, an entity it does not know,
a field given twice or not readable (``benchmarks/status_s3.py --compare-listing-reader`` times
both).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

EVENT = "before-parse.s3.ListObjectsV2"
UNIQUE_ID = "stemset-lean-listing"
_OPEN, _CLOSE = b"<Contents>", b"</Contents>"
_FIELDS = ("Key", "ETag", "StorageClass", "Size", "LastModified")
_FIELD = re.compile(rb"<(" + "|".join(_FIELDS).encode() + rb")>([^<]*)</\1>")
_NOT_SURE = (b"<!", b"\r")  # comments or CDATA; a CR (XML rewrites line ends in text)
_NAMES = {name.encode(): name for name in _FIELDS}
_ENTITY = re.compile(r"&(?:#x([0-9a-fA-F]+)|#([0-9]+)|(lt|gt|amp|quot|apos));")
_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}


def install_lean_listing(client: Any, timestamp_parser: Callable[[str], datetime]) -> None:
    """Read ``client``'s ListObjectsV2 responses with :func:`read_listing` (this client only)."""

    def handler(response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any) -> None:
        if response_dict.get("status_code") != 200:
            return
        body = response_dict.get("body")
        if not isinstance(body, bytes) or _OPEN not in body:
            return
        read = read_listing(body, timestamp_parser)
        if read is None:
            return
        customized_response_dict["Contents"], response_dict["body"] = read

    client.meta.events.register(EVENT, handler, unique_id=UNIQUE_ID)


def read_listing(body: bytes, timestamp_parser: Callable[[str], datetime]) -> tuple[list[dict[str, Any]], bytes] | None:
    """The listing's ``Contents`` as botocore's parser gives them (the fields above) and the body
    without them (the envelope left to botocore), or None where the body is not a listing this
    reader is sure of."""
    head, *entries = body.split(_OPEN)
    if b"<ListBucketResult" not in head or not body.rstrip().endswith(b"</ListBucketResult>"):
        return None
    if body.count(b"<?") > 1 or any(mark in body for mark in _NOT_SURE):
        return None
    out: list[dict[str, Any]] = []
    envelope = [head]
    try:
        for entry in entries:
            inner, closed, rest = entry.partition(_CLOSE)
            if not closed:
                return None
            envelope.append(rest)
            item = _read_entry(inner, timestamp_parser)
            if item is None:
                return None
            out.append(item)
    except (ValueError, TypeError, OverflowError):
        return None  # botocore's parser words what is wrong with it
    rest = b"".join(envelope)
    if b"<Contents" in rest:  # one written otherwise (attributes, empty): botocore reads them all
        return None
    return out, rest


def _read_entry(inner: bytes, timestamp_parser: Callable[[str], datetime]) -> dict[str, Any] | None:
    item: dict[str, Any] = {}
    for tag, raw in _FIELD.findall(inner):
        name = _NAMES[tag]
        if name in item:
            return None  # a field twice: not a listing entry as S3 writes it
        if name == "Size":
            item[name] = int(raw)
            continue
        text = raw.decode()
        if "&" in text:  # ETags always come quoted: the common entity first, without a pattern
            text = text.replace("&quot;", '"')
            if "&" in text:
                text = _unescape(text)
        item[name] = timestamp_parser(text) if name == "LastModified" else text
    return item if "Key" in item else None


def _unescape(text: str) -> str:
    """XML's five entities and character references; ValueError for anything else after ``&``."""
    plain, found = _ENTITY.subn(_entity, text)
    if found != text.count("&"):
        raise ValueError("an entity the reader does not know")
    return plain


def _entity(match: re.Match[str]) -> str:
    hexa, decimal, named = match.groups()
    return chr(int(hexa, 16)) if hexa else chr(int(decimal)) if decimal else _NAMED[named]
