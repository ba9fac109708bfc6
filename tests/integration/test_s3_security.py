"""The conditional writes behind version claims and key-file updates, on ``s3://`` storage served by a
real moto S3 server over HTTP (see ``tests/conftest.py``). No Ray."""

from __future__ import annotations

import json

import pytest

from zeroplane import layout, serve_keys
from zeroplane.registry import VERSION_MARKER, Registry
from zeroplane.storage import Storage

pytestmark = pytest.mark.integration


@pytest.fixture
def s3(s3_bucket) -> Storage:
    return Storage.from_uri(f"s3://{s3_bucket}/root")


def test_create_exclusive_on_s3_creates_once(s3):
    p = s3.path(layout.version_claim("tiny", "v1"))
    assert s3.create_exclusive(p, b"first") is True
    assert s3.create_exclusive(p, b"second") is False
    assert s3.read_bytes(p) == b"first"


def test_registration_on_s3_skips_a_claimed_number_and_cleans_up_only_its_own(s3, tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text("{}")
    reg = Registry(s3)
    assert s3.create_exclusive(s3.path(layout.version_claim("tiny", "v1")), b"{}")  # a promotion in flight
    rec = reg.register("tiny", src, {"who": "me"})
    assert rec["version"] == "v2"
    assert set(s3.list_files(reg.version_dir("tiny", "v2"))) == {"config.json", VERSION_MARKER}
    assert [v["version"] for v in reg.versions("tiny")] == ["v2"] and reg.next_version("tiny") == "v3"


def test_update_json_on_s3_retries_when_another_writer_came_first(s3):
    p = s3.path("serve", "doc.json")
    s3.write_json(p, {"items": []})
    calls = []

    def add_mine(doc):
        calls.append(json.dumps(doc))
        if len(calls) == 1:  # another writer changes the object between this read and this write
            s3.write_json(p, {"items": [*doc["items"], "theirs"]})
        return {"items": [*doc["items"], "mine"]}

    assert s3.update_json(p, add_mine) == {"items": ["theirs", "mine"]}
    assert len(calls) == 2  # the first conditional write was refused (412), the second read saw "theirs"
    assert s3.read_json(p) == {"items": ["theirs", "mine"]}


def test_update_json_on_s3_creates_only_if_absent(s3):
    p = s3.path("serve", "new.json")

    def create(doc):
        if doc is None and not s3.exists(p):
            s3.write_json(p, {"n": 10})  # created by someone else after this read
        return {"n": (doc or {"n": 0})["n"] + 1}

    assert s3.update_json(p, create) == {"n": 11}


def test_key_create_and_revoke_on_s3(s3):
    keys = [serve_keys.create_key(s3.uri, name=f"k{i}") for i in range(3)]
    serve_keys.revoke_key(s3.uri, keys[1][1]["id"])
    records = serve_keys.load_records(s3.uri)
    assert [r["revoked"] for r in records] == [False, True, False]
    assert serve_keys.verify_key(records, keys[0][0]) and not serve_keys.verify_key(records, keys[1][0])
