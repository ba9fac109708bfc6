"""Model registry kept in the storage itself: ``<root>/models/<name>/v<N>/``.

A version is a plain Hugging Face folder plus ``zeroplane_version.json`` (written last). A folder
without that file is an unfinished registration and is ignored (and never reused: numbering skips it).
No ray/torch imports.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import layout
from .errors import NotFoundError, SpecError, ZeroplaneError
from .layout import VERSION_MARKER
from .names import check_name
from .storage import Storage

__all__ = ["VERSION_MARKER", "Registry", "check_model_name", "parse_ref"]


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
        """fs path of a model's folder."""
        return self.storage.path(layout.model_dir(name))

    def version_dir(self, name: str, version: str) -> str:
        """fs path of one version's folder."""
        return self.storage.path(layout.version_dir(name, version))

    def models(self) -> List[str]:
        """Names of models with at least one complete version."""
        return [m for m in self.storage.listdir(self.storage.path(layout.MODELS_DIR)) if self.versions(m)]

    def versions(self, name: str) -> List[Dict[str, Any]]:
        """Complete versions of ``name``, oldest first: the contents of each version's marker."""
        out = []
        for v in self.storage.listdir(self.model_dir(name)):
            if layout.version_number(v) is None:
                continue
            marker = f"{self.version_dir(name, v)}/{VERSION_MARKER}"
            if self.storage.exists(marker):
                rec = self.storage.read_json(marker)
                rec["uri"] = self.storage.uri_of(self.version_dir(name, v))
                out.append(rec)
        return sorted(out, key=lambda r: layout.version_number(r["version"]))

    def get(self, name: str, version: Optional[str] = None) -> Dict[str, Any]:
        """One complete version (the newest when ``version`` is None).

        Raises:
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

    def next_version(self, name: str) -> str:
        """The next free version label (skips folders of unfinished registrations too)."""
        used = [n for v in self.storage.listdir(self.model_dir(name)) if (n := layout.version_number(v)) is not None]
        return f"v{max(used, default=0) + 1}"

    def register(self, name: str, local_dir: str | Path, record: Dict[str, Any]) -> Dict[str, Any]:
        """Upload a verified Hugging Face folder as the next version, marker last.

        Args:
            name: model name.
            local_dir: local folder (config.json, model.safetensors, tokenizer files).
            record: provenance and verification details stored in the marker.

        Returns:
            The marker contents plus ``uri``.

        Raises:
            ZeroplaneError: the upload failed (the partial folder is removed again).
        """
        check_model_name(name)
        version = self.next_version(name)
        dest = self.version_dir(name, version)
        try:
            self.storage.upload_dir(local_dir, dest)
            files = self.storage.list_files(dest)
            rec = {**record, "name": name, "version": version, "files": files,
                   "registered_at": datetime.now(timezone.utc).isoformat()}
            self.storage.write_json(f"{dest}/{VERSION_MARKER}", rec)
        except Exception as e:
            self.storage.delete_dir(dest)
            raise ZeroplaneError(f"registering {name}:{version} in {self.storage.uri} failed: {e}") from e
        rec["uri"] = self.storage.uri_of(dest)
        return rec
