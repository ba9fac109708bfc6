"""API key store: create, list, revoke and verify against a real local storage folder."""

from __future__ import annotations

import json
import sys

import pytest

from zeroplane import serve_keys
from zeroplane.errors import NotFoundError, ZeroplaneError
from zeroplane.storage import Storage


def _key_file(root) -> str:
    return str(root / "serve" / "api_keys.json")


def test_create_key_stores_only_the_hash(tmp_path):
    key, record = serve_keys.create_key(str(tmp_path), name="ci")

    assert key.startswith("zp-") and len(key) == len("zp-") + 43  # 32 bytes, urlsafe base64 unpadded
    assert set(record) == {"id", "name", "created_at", "revoked"}
    assert record["name"] == "ci" and record["revoked"] is False
    assert record["id"] == serve_keys.hash_key(key)[:8]

    raw = open(_key_file(tmp_path)).read()
    assert key not in raw
    assert key[len("zp-"):] not in raw
    data = json.loads(raw)
    assert data["keys"][0]["sha256"] == serve_keys.hash_key(key)


def test_keys_are_random_and_listed_without_hashes(tmp_path):
    key1, rec1 = serve_keys.create_key(str(tmp_path), name="a")
    key2, rec2 = serve_keys.create_key(str(tmp_path))
    assert key1 != key2 and rec1["id"] != rec2["id"]

    listed = serve_keys.list_keys(str(tmp_path))
    assert [r["id"] for r in listed] == [rec1["id"], rec2["id"]]
    assert [r["name"] for r in listed] == ["a", None]
    assert all("sha256" not in r for r in listed)


def test_list_keys_empty_storage(tmp_path):
    assert serve_keys.list_keys(str(tmp_path)) == []
    assert serve_keys.load_records(str(tmp_path)) == []
    assert not serve_keys.verify_key([], "zp-anything")


def test_verify_key_accepts_records_or_file_data(tmp_path):
    key, _ = serve_keys.create_key(str(tmp_path))
    records = serve_keys.load_records(str(tmp_path))
    file_data = Storage.from_uri(str(tmp_path)).read_json(_key_file(tmp_path))

    assert serve_keys.verify_key(records, key)
    assert serve_keys.verify_key(file_data, key)
    assert not serve_keys.verify_key(records, key + "x")
    assert not serve_keys.verify_key(records, "zp-" + "A" * 43)
    assert not serve_keys.verify_key(records, "")
    assert not serve_keys.verify_key(records, None)


def test_revoke_key(tmp_path):
    key1, rec1 = serve_keys.create_key(str(tmp_path), name="old")
    key2, _ = serve_keys.create_key(str(tmp_path), name="new")

    revoked = serve_keys.revoke_key(str(tmp_path), rec1["id"])
    assert revoked["id"] == rec1["id"] and revoked["revoked"] is True and "revoked_at" in revoked
    assert "sha256" not in revoked

    records = serve_keys.load_records(str(tmp_path))
    assert not serve_keys.verify_key(records, key1)
    assert serve_keys.verify_key(records, key2)
    assert [r["revoked"] for r in serve_keys.list_keys(str(tmp_path))] == [True, False]

    again = serve_keys.revoke_key(str(tmp_path), rec1["id"])  # idempotent
    assert again["revoked_at"] == revoked["revoked_at"]


def test_revoke_unknown_key_names_the_id(tmp_path):
    serve_keys.create_key(str(tmp_path))
    with pytest.raises(NotFoundError, match="deadbeef"):
        serve_keys.revoke_key(str(tmp_path), "deadbeef")


def test_malformed_key_file_is_reported(tmp_path):
    path = tmp_path / "serve" / "api_keys.json"
    path.parent.mkdir(parents=True)
    path.write_text("[1, 2]")
    with pytest.raises(ZeroplaneError, match="malformed"):
        serve_keys.list_keys(str(tmp_path))


def test_module_imports_neither_ray_nor_torch():
    import subprocess

    code = (
        "import sys, zeroplane.serve_keys; "
        "bad = [m for m in ('ray', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
