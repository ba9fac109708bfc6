"""Checkpoints in storage: the completion marker, and listing complete checkpoints. No ray/torch imports.

A zeroplane checkpoint is one Ray Train checkpoint folder ``<root>/jobs/<job_id>/checkpoint_<tag>``
(tag ``step_0000100``); its folder and file names, and what each holds, are :mod:`zeroplane.layout`'s.
It counts only when the marker (:data:`MARKER`, written last) exists and every file it lists is present
with that size. The marker also records each file's SHA-256, hashed on the worker before the upload
(:mod:`zeroplane.digests`); listings check sizes only, and whoever downloads a checkpoint (promotion,
resume) checks its copy against the hashes with :func:`check_local_copy`. Markers of format 1 (before
hashes were recorded) are checked by size alone.

``MARKER``, ``tag_for_step``, ``dir_name_for_step`` and ``step_of`` are re-exported from
:mod:`zeroplane.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from . import layout
from .digests import check_folder
from .layout import CHECKPOINT_MARKER as MARKER
from .layout import dir_name_for_step, step_of, tag_for_step
from .storage import Storage

__all__ = ["MARKER", "tag_for_step", "dir_name_for_step", "step_of", "CheckpointInfo", "build_marker",
           "inspect_checkpoint", "list_checkpoints", "latest_complete", "check_local_copy"]


@dataclass
class CheckpointInfo:
    """One checkpoint of a job as found in storage.

    Attributes:
        job_id: the job (Ray Train run name).
        step: optimizer step at which it was taken.
        path: its folder inside ``storage.fs``.
        uri: user-facing location (``s3://…`` or a local path).
        complete: marker present and every listed file present with its recorded size.
        metrics: the metrics recorded in the marker (train_loss, val_loss, …).
        reason: why it is incomplete (empty when complete).
    """

    job_id: str
    step: int
    path: str
    uri: str
    complete: bool
    metrics: Dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0
    created_at: Optional[str] = None
    reason: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly form (for ``-o json``)."""
        return {
            "job_id": self.job_id,
            "step": self.step,
            "uri": self.uri,
            "complete": self.complete,
            "metrics": self.metrics,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            "reason": self.reason,
        }


def build_marker(files: Dict[str, int], meta: Dict[str, Any],
                 sha256: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """The marker document: ``files`` ({relative path: bytes}), ``sha256`` ({relative path: hex}, format
    2; files without one, e.g. the digest files themselves, are checked by size), step and metrics from
    ``meta``."""
    return {
        "format": 2 if sha256 is not None else 1,
        "step": meta.get("step"),
        "tag": meta.get("tag"),
        "metrics": meta.get("metrics", {}),
        "created_at": meta.get("created_at"),
        "files": dict(sorted(files.items())),
        "sha256": dict(sorted((sha256 or {}).items())),
    }


def check_local_copy(storage: Storage, path: str, local: str) -> int:
    """Check a downloaded checkpoint folder ``local`` against the marker of ``path`` in ``storage``.

    Every file with a recorded SHA-256 must be in ``local`` with the recorded size and hash.

    Returns:
        Bytes hashed (0 for a format-1 marker, which records no hashes).

    Raises:
        ZeroplaneError: a file differs (named; see :func:`zeroplane.digests.check_folder`).
    """
    marker = storage.read_json(f"{path.rstrip('/')}/{MARKER}")
    return check_folder(local, marker.get("sha256") or {}, f"checkpoint {storage.uri_of(path)}",
                        sizes=marker.get("files") or {})


def inspect_checkpoint(storage: Storage, job_id: str, path: str) -> CheckpointInfo:
    """Check one checkpoint folder against its marker (see the module docstring)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    step = step_of(name)
    info = CheckpointInfo(job_id=job_id, step=step if step is not None else -1, path=path,
                          uri=storage.uri_of(path), complete=False)
    files = storage.list_files(path)
    info.size_bytes = sum(files.values())
    if MARKER not in files:
        info.reason = "no completion marker (still being written, or left by a failed save)"
        return info
    try:
        marker = storage.read_json(f"{path.rstrip('/')}/{MARKER}")
    except Exception as e:  # unreadable marker = incomplete, never an exception for listing
        info.reason = f"unreadable marker: {e}"
        return info
    for rel, size in marker.get("files", {}).items():
        if files.get(rel) != size:
            info.reason = f"file {rel} missing or wrong size (want {size} bytes, found {files.get(rel)})"
            return info
    info.complete = True
    info.metrics = marker.get("metrics", {})
    info.created_at = marker.get("created_at")
    return info


def list_checkpoints(storage: Storage, job_id: str, include_incomplete: bool = False) -> List[CheckpointInfo]:
    """Checkpoints of ``job_id``, oldest first; complete ones only unless ``include_incomplete``.

    Raises:
        SpecError: ``job_id`` is no job id (:func:`zeroplane.layout.check_job_id`: e.g. ``..`` or a path).
    """
    run_dir = storage.path(layout.job_dir(job_id))
    out = []
    for name in storage.listdir(run_dir):
        if step_of(name) is None:
            continue
        info = inspect_checkpoint(storage, job_id, f"{run_dir}/{name}")
        if info.complete or include_incomplete:
            out.append(info)
    return sorted(out, key=lambda c: c.step)


def latest_complete(storage: Storage, job_id: str) -> Optional[CheckpointInfo]:
    """The newest complete checkpoint of ``job_id``, or None.

    Raises:
        SpecError: ``job_id`` is no job id (see :func:`list_checkpoints`).
    """
    done = list_checkpoints(storage, job_id)
    return done[-1] if done else None
