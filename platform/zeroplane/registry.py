"""Model registry kept in the storage itself: ``<root>/models/<name>/v<N>/``.

A version is a plain Hugging Face folder plus ``zeroplane_version.json`` (written last). A folder
without that file is an unfinished registration and is ignored (and never reused: numbering skips it).

Promotions of one model may run at once (two operators, two CI jobs). Each takes its version number
by creating ``models/<name>/.claims/v<N>`` if absent (:meth:`zeroplane.storage.Storage.create_exclusive`:
``O_EXCL`` locally, a conditional PUT on S3) before it uploads anything, so no two promotions ever
write the same folder, and a failed one removes only the version it claimed. No ray/torch imports.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import layout
from .digests import check_folder, folder_digests, sha256_map, size_map
from .errors import NotFoundError, SpecError, ZeroplaneError
from .layout import VERSION_MARKER
from .names import NAME_RE, check_name
from .storage import Storage

__all__ = ["VERSION_MARKER", "Registry", "check_model_name", "parse_ref", "check_version_folder"]


def check_model_name(name: str) -> str:
    """Validate a model name given as ``--name`` (:data:`zeroplane.names.NAME_RE`: [a-z0-9-], 1-48 chars).

    Raises:
        SpecError: the name is not valid (names the value and the rule).
    """
    return check_name(name, "--name")


def parse_ref(ref: str) -> tuple[str, Optional[str]]:
    """Split ``name`` or ``name:v3`` into ``(name, "v3" | None)``.

    Raises:
        SpecError: a malformed reference.
    """
    name, _, ver = ref.partition(":")
    check_model_name(name)
    if ver and layout.version_number(ver) is None:
        raise SpecError(f"model reference {ref!r}: the version must look like v1, v2, …")
    return name, ver or None


class Registry:
    """Versions of named models in one storage root."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def model_dir(self, name: str) -> str:
        """fs path of a model's folder.

        Raises:
            SpecError: ``name`` is not a model name (:func:`check_model_name`), e.g. ``..``.
        """
        return self.storage.path(layout.model_dir(check_model_name(name)))

    def version_dir(self, name: str, version: str) -> str:
        """fs path of one version's folder.

        Raises:
            SpecError: ``name`` is not a model name, or ``version`` is not ``vN``.
        """
        if not isinstance(version, str) or layout.version_number(version) is None:
            raise SpecError(f"model version {version!r}: the version must look like v1, v2, …")
        return self.storage.path(layout.version_dir(check_model_name(name), version))

    def models(self) -> List[str]:
        """Names of models with at least one complete version (folders that are no model name are skipped)."""
        return [m for m in self.storage.listdir(self.storage.path(layout.MODELS_DIR))
                if NAME_RE.fullmatch(m) and self.versions(m)]

    def versions(self, name: str) -> List[Dict[str, Any]]:
        """Complete versions of ``name``, oldest first: the contents of each version's marker.

        A marker that is not JSON, or does not name this model and version, makes its version count as not
        registered (a warning names it) instead of breaking every listing.

        Raises:
            SpecError: ``name`` is not a model name.
        """
        out = []
        for v in self.storage.listdir(self.model_dir(name)):
            if layout.version_number(v) is None:
                continue
            marker = f"{self.version_dir(name, v)}/{VERSION_MARKER}"
            if self.storage.exists(marker):
                try:
                    rec = self.storage.read_json(marker)
                except ValueError:  # not JSON (UnicodeDecodeError and JSONDecodeError are ValueErrors)
                    rec = None
                if not isinstance(rec, dict) or rec.get("name") != name or rec.get("version") != v:
                    warnings.warn(f"ignoring {self.storage.uri_of(marker)}: not a registration marker of {name}:{v}")
                    continue
                rec["uri"] = self.storage.uri_of(self.version_dir(name, v))
                out.append(rec)
        return sorted(out, key=lambda r: layout.version_number(r["version"]))

    def get(self, name: str, version: Optional[str] = None) -> Dict[str, Any]:
        """One complete version (the newest when ``version`` is None).

        Raises:
            SpecError: ``name`` is not a model name.
            NotFoundError: no such model or version.
        """
        vs = self.versions(name)
        if not vs:
            raise NotFoundError(f"model {name!r} has no registered versions in {self.storage.uri}; run `zeroplane promote`")
        if version is None:
            return vs[-1]
        for rec in vs:
            if rec["version"] == version:
                return rec
        raise NotFoundError(f"model {name}:{version} not found; versions: {', '.join(r['version'] for r in vs)}")

    def check_files(self, rec: Dict[str, Any]) -> None:
        """Check a version's files in storage against its marker, before any replica is asked to load it.

        Sizes are checked by listing (no read); on local storage each file's SHA-256 is checked too (S3
        objects would have to be downloaded: the replica checks its copy, :func:`check_version_folder`).

        Args:
            rec: the version's marker as :meth:`get` returns it.

        Raises:
            ZeroplaneError: a file is missing, of another size, or (local storage) of another content;
                the message names the files.
        """
        dest = self.version_dir(rec["name"], rec["version"])
        what = f"model {rec['name']}:{rec['version']} at {self.storage.uri_of(dest)}"
        sizes = rec.get("files") or {}
        if self.storage.is_local:
            check_folder(dest, rec.get("sha256") or {}, what, sizes=sizes)
            return
        landed = self.storage.list_files(dest)
        bad = [f"{rel} ({landed.get(rel)} bytes, marker says {size})" for rel, size in sorted(sizes.items())
               if landed.get(rel) != size]
        if bad:
            raise ZeroplaneError(f"{what}: {'; '.join(bad[:5])} does not match its completion marker; the data "
                                 "was altered or landed short after the marker was written. Deploy another "
                                 "version, or promote the checkpoint again")

    def next_version(self, name: str) -> str:
        """The next free version label: above every version folder (unfinished ones too) and every claim.

        A promotion running at the same time may still take it first; :meth:`register` claims its number.

        Raises:
            SpecError: ``name`` is not a model name.
        """
        return f"v{self._next_number(name)}"

    def _next_number(self, name: str) -> int:
        claims = self.storage.path(layout.claims_dir(check_model_name(name)))
        used = [n for v in self.storage.listdir(self.model_dir(name)) + self.storage.listdir(claims)
                if (n := layout.version_number(v)) is not None]
        return max(used, default=0) + 1

    def _claim(self, name: str) -> str:
        """Take the lowest free version number of ``name`` for this process; returns ``vN``.

        Creating ``.claims/vN`` if absent is the one atomic step: of promotions that race for N,
        exactly one creates it and the others move on to N+1.
        """
        n = self._next_number(name)
        doc = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                          "claimed_at": datetime.now(timezone.utc).isoformat()}).encode()
        while not self.storage.create_exclusive(self.storage.path(layout.version_claim(name, f"v{n}")), doc):
            n += 1
        return f"v{n}"

    def register(self, name: str, local_dir: str | Path, record: Dict[str, Any]) -> Dict[str, Any]:
        """Upload a verified Hugging Face folder as the next version, marker last.

        Args:
            name: model name.
            local_dir: local folder (config.json, model.safetensors, tokenizer files).
            record: provenance and verification details stored in the marker.

        The marker records each file's size and SHA-256 as hashed from ``local_dir`` before the upload
        (``files``, ``sha256``), and the seconds spent hashing and uploading (``registration``).

        Returns:
            The marker contents plus ``uri``.

        Raises:
            SpecError: ``name`` is not a model name (nothing is written).
            ZeroplaneError: the upload failed or landed short (the partial folder and the claim of its
                number are removed again; nothing else is touched).
        """
        check_model_name(name)
        started = time.perf_counter()
        digests = folder_digests(local_dir)
        hashed = time.perf_counter()
        version = self._claim(name)
        dest = self.version_dir(name, version)
        try:
            self.storage.upload_dir(local_dir, dest)
            meant, landed = size_map(digests), self.storage.list_files(dest)
            short = sorted(rel for rel, size in meant.items() if landed.get(rel) != size)
            if short:
                raise ZeroplaneError(f"{', '.join(short[:5])} did not land with the size uploaded")
            rec = {**record, "name": name, "version": version, "files": meant, "sha256": sha256_map(digests),
                   "registration": {"bytes": sum(meant.values()), "hash_s": round(hashed - started, 4),
                                    "upload_s": round(time.perf_counter() - hashed, 4)},
                   "registered_at": datetime.now(timezone.utc).isoformat()}
            self.storage.write_json(f"{dest}/{VERSION_MARKER}", rec)
        except Exception as e:
            # dest is ours alone (the claim keeps every other promotion out), so removing it removes
            # nothing anyone else wrote; the claim goes last, once the folder is gone, to free the number
            self.storage.delete_dir(dest)
            self.storage.delete_file(self.storage.path(layout.version_claim(name, version)))
            raise ZeroplaneError(f"registering {name}:{version} in {self.storage.uri} failed: {e}") from e
        rec["uri"] = self.storage.uri_of(dest)
        return rec


def check_version_folder(local_dir: str | Path, uri: str) -> int:
    """Check a version folder about to be loaded (a replica's download, or the local storage folder)
    against the marker inside it: every recorded file present with its size and SHA-256.

    Args:
        local_dir: the folder holding ``zeroplane_version.json`` and the model files.
        uri: where it came from, for the message.

    Returns:
        Bytes hashed (0 for a folder without a marker or with a marker that records no hashes: a plain
        Hugging Face folder served directly, or a version registered before hashes were recorded).

    Raises:
        ZeroplaneError: a file differs from the marker (named; see :func:`zeroplane.digests.check_folder`).
    """
    marker = Path(local_dir) / VERSION_MARKER
    if not marker.is_file():
        return 0
    rec = json.loads(marker.read_text())
    return check_folder(local_dir, rec.get("sha256") or {}, f"model version {uri}", sizes=rec.get("files") or {})
