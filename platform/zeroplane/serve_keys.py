"""API keys for the serving endpoints, kept as hashes in the storage root.

The key file lives at ``<storage root>/serve/api_keys.json`` and looks like::

    {
      "version": 1,
      "keys": [
        {"id": "3f9a1c0d", "name": "ci", "created_at": "2025-01-01T00:00:00+00:00",
         "revoked": false, "sha256": "3f9a1c0d…"}
      ]
    }

Only the SHA-256 hex digest of a key is stored; the plaintext ``zp-…`` key is shown once, by
:func:`create_key`. A key's ``id`` is the first 8 hex characters of its hash, so it can be printed and
used to revoke the key without revealing it. Serve replicas read the file through :func:`load_records`
and check a presented bearer key with :func:`verify_key`.

Creates and revokes go through :meth:`zeroplane.storage.Storage.update_json`: readers see the old or
the new file, never a part, and two writers at the same instant (a revoke racing a create, from two
operators or two machines) never lose one another's update (a file lock next to the key file locally, a
conditional write on S3). Each update reads the file back and checks its change is there.

This module imports neither ray nor torch.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from .errors import NotFoundError, ZeroplaneError
from .layout import KEYS_FILE  # path of the key file relative to the storage root (re-exported)
from .storage import Storage

#: Prefix of every generated key.
KEY_PREFIX = "zp-"
#: Length of a key id in hex characters (a prefix of the SHA-256 digest).
KEY_ID_LENGTH = 8
_FILE_VERSION = 1
_HASH_FIELD = "sha256"


def hash_key(key: str) -> str:
    """SHA-256 hex digest of a plaintext key.

    Args:
        key: the plaintext key, e.g. ``"zp-…"``.

    Returns:
        64 lowercase hex characters.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _open(storage_uri: Union[str, Storage]) -> Storage:
    return storage_uri if isinstance(storage_uri, Storage) else Storage.from_uri(storage_uri)


def _read_file(storage: Storage) -> dict:
    path = storage.path(KEYS_FILE)
    try:
        data = storage.read_json(path) if storage.exists(path) else None
    except FileNotFoundError:  # deleted between the two calls
        data = None
    return _checked(storage, data)


def _checked(storage: Storage, data: Any) -> dict:
    """The key file's content, or an empty one for None (no file yet).

    Raises:
        ZeroplaneError: not a JSON object with a ``keys`` list.
    """
    if data is None:
        return {"version": _FILE_VERSION, "keys": []}
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ZeroplaneError(
            f"API key file {storage.uri_of(storage.path(KEYS_FILE))} is malformed: expected a JSON object with a 'keys' list"
        )
    return data


def _update(storage: Storage, change: Callable[[dict], Optional[dict]]) -> dict:
    """Apply ``change`` to the key file as one update that no concurrent create or revoke can undo
    (:meth:`~zeroplane.storage.Storage.update_json`); returns the file as read back afterwards."""
    return _checked(storage, storage.update_json(storage.path(KEYS_FILE), lambda d: change(_checked(storage, d))))


def _read_back_error(storage: Storage, what: str) -> ZeroplaneError:
    return ZeroplaneError(f"{what} was written to {storage.uri_of(storage.path(KEYS_FILE))} but is not there when "
                          "read back; another tool may have rewritten the file: check `zeroplane serve keys list`")


def _public(record: Mapping[str, Any]) -> dict:
    return {k: v for k, v in record.items() if k != _HASH_FIELD}


def load_records(storage_uri: Union[str, Storage]) -> list[dict]:
    """Read every key record, hashes included (for servers that verify keys).

    Args:
        storage_uri: the storage root (local folder or ``s3://bucket/prefix``) or an open
            :class:`~zeroplane.storage.Storage`.

    Returns:
        The records as stored (``id``, ``name``, ``created_at``, ``revoked``, ``sha256``, and
        ``revoked_at`` once revoked); ``[]`` when no key file exists yet.

    Raises:
        ZeroplaneError: the key file exists but is not a JSON object with a ``keys`` list, or the
            storage root is unsupported.
        OSError: the storage could not be read (e.g. S3 unreachable).
    """
    return list(_read_file(_open(storage_uri))["keys"])


def create_key(storage_uri: str, name: Optional[str] = None) -> tuple[str, dict]:
    """Generate a new API key and store its hash.

    Args:
        storage_uri: the storage root (local folder or ``s3://bucket/prefix``).
        name: an optional label for people (e.g. ``"ci"``); not secret, not unique.

    Returns:
        ``(key, record)``: the plaintext key ``zp-<43 urlsafe base64 chars>`` (32 random bytes),
        shown only here, and its record without the hash: ``id`` (8 hex chars), ``name``,
        ``created_at`` (ISO 8601, UTC) and ``revoked`` (``False``).

    Raises:
        ZeroplaneError: the existing key file is malformed, the storage root is unsupported, or the new
            record is missing when the file is read back.
        OSError: the storage could not be read or written.
    """
    storage = _open(storage_uri)
    made: dict = {}

    def add(data: dict) -> dict:  # may run again on S3 when another writer came first: draws anew then
        taken = {r.get("id") for r in data["keys"]}
        while True:  # an 8-hex-char id collides with odds ~n/4e9; draw again if it does
            key = KEY_PREFIX + secrets.token_urlsafe(32)
            digest = hash_key(key)
            if digest[:KEY_ID_LENGTH] not in taken:
                break
        made.update(key=key, record={
            "id": digest[:KEY_ID_LENGTH],
            "name": name,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "revoked": False,
            _HASH_FIELD: digest,
        })
        return {**data, "version": _FILE_VERSION, "keys": [*data["keys"], made["record"]]}

    stored = _update(storage, add)
    if made["record"] not in stored["keys"]:
        raise _read_back_error(storage, f"API key {made['record']['id']}")
    return made["key"], _public(made["record"])


def list_keys(storage_uri: str) -> list[dict]:
    """List the stored keys without their hashes.

    Args:
        storage_uri: the storage root (local folder or ``s3://bucket/prefix``).

    Returns:
        One dict per key in creation order: ``id``, ``name``, ``created_at``, ``revoked`` and, for a
        revoked key, ``revoked_at``. ``[]`` when no key was ever created.

    Raises:
        ZeroplaneError: the key file is malformed, or the storage root is unsupported.
    """
    return [_public(r) for r in load_records(storage_uri)]


def revoke_key(storage_uri: str, key_id: str) -> dict:
    """Mark a key revoked; servers reject it once they re-read the file (within ~5 s).

    Revoking an already revoked key changes nothing and returns its record.

    Args:
        storage_uri: the storage root (local folder or ``s3://bucket/prefix``).
        key_id: the 8-hex-character id printed by :func:`create_key` / :func:`list_keys`.

    Returns:
        The key's record without the hash, with ``revoked=True`` and ``revoked_at`` (ISO 8601, UTC).

    Raises:
        NotFoundError: no key has this id.
        ZeroplaneError: the key file is malformed, the storage root is unsupported, or the key is not
            revoked when the file is read back.
    """
    storage = _open(storage_uri)

    def revoke(data: dict) -> Optional[dict]:
        for record in data["keys"]:
            if record.get("id") == key_id:
                if record.get("revoked"):
                    return None  # nothing to write
                record.update(revoked=True, revoked_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
                return data
        known = ", ".join(str(r.get("id")) for r in data["keys"]) or "none"
        raise NotFoundError(f"API key id {key_id!r} not found under {storage.uri}; known ids: {known}")

    for record in _update(storage, revoke)["keys"]:
        if record.get("id") == key_id and record.get("revoked"):
            return _public(record)
    raise _read_back_error(storage, f"the revocation of API key {key_id}")


def verify_key(
    records_or_file_data: Union[Mapping[str, Any], Iterable[Mapping[str, Any]]],
    presented_key: Optional[str],
) -> bool:
    """Whether a presented key matches a stored, non-revoked key.

    The presented key is hashed and compared with every stored hash using
    :func:`hmac.compare_digest` (constant time per comparison).

    Args:
        records_or_file_data: the parsed key file (a dict with ``keys``) or a list of records as
            returned by :func:`load_records`.
        presented_key: the plaintext key from the ``Authorization: Bearer`` header; ``None`` or an
            empty string never matches.

    Returns:
        ``True`` when a non-revoked record has the presented key's hash.
    """
    if not isinstance(presented_key, str) or not presented_key:
        return False
    if isinstance(records_or_file_data, Mapping):
        records = records_or_file_data.get("keys") or []
    else:
        records = records_or_file_data
    digest = hash_key(presented_key)
    matched = False
    for record in records:
        stored = record.get(_HASH_FIELD) if isinstance(record, Mapping) else None
        if not isinstance(stored, str):
            continue
        if hmac.compare_digest(stored.encode("ascii", "replace"), digest.encode("ascii")) and not record.get(
            "revoked", False
        ):
            matched = True
    return matched
