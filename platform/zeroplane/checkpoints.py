"""Checkpoint layout, the completion marker, and listing complete checkpoints. No ray/torch imports.

A zeroplane checkpoint is one Ray Train checkpoint folder ``<root>/jobs/<job_id>/checkpoint_<tag>``
(tag ``step_0000100``) holding::

    ds/<tag>/...                  every rank's DeepSpeed shards (engine.save_checkpoint on all ranks)
    ds/latest                     DeepSpeed's pointer to <tag>
    hf/                           model config + tokenizer files (a Hugging Face folder without weights)
    rng/rank_<r>.pt               each rank's RNG state (exact resume)
    probe.json                    probe input ids; probe.safetensors holds its eval-mode logits
    meta.json                     step, tag, data position, metrics, zero_stage, world_size, spec
    zeroplane_complete.json       the marker: written last, lists every file and its size

A checkpoint counts only when the marker exists and every file it lists is present with that size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .storage import Storage

MARKER = "zeroplane_complete.json"
CKPT_PREFIX = "checkpoint_"
_TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for_step(step: int) -> str:
    """DeepSpeed tag for an optimizer step, e.g. ``step_0000100`` (sorts in step order)."""
    return f"step_{step:07d}"


def dir_name_for_step(step: int) -> str:
    """Ray checkpoint folder name for a step, e.g. ``checkpoint_step_0000100``."""
    return CKPT_PREFIX + tag_for_step(step)


def step_of(dir_name: str) -> Optional[int]:
    """The step encoded in a checkpoint folder name, or None for other names."""
    if not dir_name.startswith(CKPT_PREFIX):
        return None
    m = _TAG_RE.fullmatch(dir_name[len(CKPT_PREFIX):])
    return int(m.group(1)) if m else None


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


def build_marker(files: Dict[str, int], meta: Dict[str, Any]) -> Dict[str, Any]:
    """The marker document: ``files`` ({relative path: bytes}) plus step and metrics from ``meta``."""
    return {
        "format": 1,
        "step": meta.get("step"),
        "tag": meta.get("tag"),
        "metrics": meta.get("metrics", {}),
        "created_at": meta.get("created_at"),
        "files": dict(sorted(files.items())),
    }


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
    """Checkpoints of ``job_id``, oldest first; complete ones only unless ``include_incomplete``."""
    run_dir = storage.path("jobs", job_id)
    out = []
    for name in storage.listdir(run_dir):
        if step_of(name) is None:
            continue
        info = inspect_checkpoint(storage, job_id, f"{run_dir}/{name}")
        if info.complete or include_incomplete:
            out.append(info)
    return sorted(out, key=lambda c: c.step)


def latest_complete(storage: Storage, job_id: str) -> Optional[CheckpointInfo]:
    """The newest complete checkpoint of ``job_id``, or None."""
    done = list_checkpoints(storage, job_id)
    return done[-1] if done else None
