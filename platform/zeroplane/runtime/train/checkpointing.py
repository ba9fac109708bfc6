"""Saving the zeroplane extras into a checkpoint, the completion marker, and loading for resume."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any, Dict, Optional, Tuple

from ... import layout
from ...checkpoints import build_marker, check_local_copy, inspect_checkpoint, latest_complete, list_checkpoints
from ...digests import folder_digests, sha256_map, size_map
from ...errors import ZeroplaneError
from ...storage import Storage


def save_extras(local: str, rank: int, step: int, tag: str, metrics: Dict[str, Any], spec, world: int,
                job_id: str, tokenizer, model_cfg, probe_ids, probe_logits, consumed_micro_batches: int,
                extra: Optional[Dict[str, Any]] = None) -> None:
    """Write what a checkpoint carries besides DeepSpeed's shards into the local folder ``local``.

    Every rank writes its RNG state (``rng/rank_<r>.pt``); rank 0 also writes ``hf/`` (config and
    tokenizer), ``probe.json`` + ``probe.safetensors`` (logits ``[1, PROBE_TOKENS, vocab]`` fp32) and
    ``meta.json`` (``extra`` keys, e.g. ``loss_curve``, are merged into it). Last, every rank records the
    size and SHA-256 of each file of its folder (DeepSpeed's shards included) in
    ``digests/rank_<r>.json``: what this rank meant to upload, which :func:`write_marker` puts in the marker.
    """
    _save_files(local, rank, step, tag, metrics, spec, world, job_id, tokenizer, model_cfg, probe_ids,
                probe_logits, consumed_micro_batches, extra)
    write_rank_digests(local, rank)


def write_rank_digests(local: str, rank: int) -> None:
    """Write ``digests/rank_<rank>.json``: :func:`zeroplane.digests.folder_digests` of the local
    checkpoint folder ``local`` (the ``digests/`` folder itself left out)."""
    digests = folder_digests(local, skip=(layout.CKPT_DIGESTS_DIR,))
    os.makedirs(os.path.join(local, layout.CKPT_DIGESTS_DIR), exist_ok=True)
    with open(os.path.join(local, layout.CKPT_DIGESTS_DIR, f"rank_{rank}.json"), "w") as f:
        json.dump(digests, f)


def _save_files(local: str, rank: int, step: int, tag: str, metrics: Dict[str, Any], spec, world: int,
                job_id: str, tokenizer, model_cfg, probe_ids, probe_logits, consumed_micro_batches: int,
                extra: Optional[Dict[str, Any]]) -> None:
    import random

    import numpy as np
    import torch
    from safetensors.torch import save_file

    os.makedirs(os.path.join(local, layout.CKPT_RNG_DIR), exist_ok=True)
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               os.path.join(local, layout.CKPT_RNG_DIR, f"rank_{rank}.pt"))
    if rank != 0:
        return
    hf = os.path.join(local, layout.CKPT_HF_DIR)
    model_cfg.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    save_file({"logits": probe_logits.contiguous()}, os.path.join(local, layout.CKPT_PROBE_LOGITS))
    with open(os.path.join(local, layout.CKPT_PROBE_IDS), "w") as f:
        json.dump({"input_ids": probe_ids.tolist()}, f)
    meta = {
        "job_id": job_id,
        "step": step,
        "tag": tag,
        "world_size": world,
        "zero_stage": spec.deepspeed.zero_stage,
        "precision": spec.train.precision,
        "consumed_micro_batches": consumed_micro_batches,
        "metrics": metrics,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "spec": spec.model_dump(mode="json"),
        **(extra or {}),
    }
    with open(os.path.join(local, layout.CKPT_META), "w") as f:
        json.dump(meta, f, indent=2)


def write_marker(persisted, metrics: Dict[str, Any]) -> None:
    """Write the completion marker into a persisted Ray checkpoint (``ray.train.Checkpoint``).

    Called by rank 0 after all ranks' uploads. Each file's size and SHA-256 come from the ranks'
    ``digests/rank_<r>.json`` (what each rank meant to upload, hashed before the upload), so a file that
    landed short makes the checkpoint incomplete instead of being blessed; the digest files themselves
    are listed with the size found.
    """
    import pyarrow.fs as pafs

    fs, path = persisted.filesystem, persisted.path.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = {os.path.relpath(i.path, path): i.size for i in infos if i.type == pafs.FileType.File}
    meant: Dict[str, Dict[str, Any]] = {}
    for rel in sorted(files):
        if rel.startswith(layout.CKPT_DIGESTS_DIR + "/"):
            with fs.open_input_stream(f"{path}/{rel}") as f:
                meant.update(json.loads(f.read()))
    files.update(size_map(meant))
    with fs.open_input_stream(f"{path}/{layout.CKPT_META}") as f:
        meta = json.loads(f.read())
    body = json.dumps(build_marker(files, {**meta, "metrics": metrics}, sha256=sha256_map(meant)), indent=2).encode()
    with fs.open_output_stream(f"{path}/{layout.CHECKPOINT_MARKER}") as f:
        f.write(body)


def pick_resume_path(storage: Storage, job_id: str, ray_checkpoint, explicit: Optional[str]) -> Optional[str]:
    """Where to resume from: the newest complete checkpoint, whether Ray knows it or not.

    ``ray_checkpoint`` is ``ray.train.get_checkpoint()`` (Ray's latest registered checkpoint after a
    worker-group restart, or restored from a previous run of the same name). It can be OLDER than the
    newest complete checkpoint in storage: a job stopped after its workers persisted a checkpoint and
    wrote the marker but before Ray's controller registered it. So the candidates are Ray's checkpoint
    (if complete), the newest complete checkpoint of ``job_id`` in storage and ``explicit`` (a path the
    driver chose at submission, if complete); the highest step wins. Returns an fs path of ``storage``,
    or None for a fresh start.
    """
    candidates = []
    for path in (ray_checkpoint.path if ray_checkpoint is not None else None, explicit):
        if path:
            info = inspect_checkpoint(storage, job_id, path)
            if info.complete:
                candidates.append(info)
    newest = latest_complete(storage, job_id)
    if newest is not None:
        candidates.append(newest)
    return max(candidates, key=lambda c: c.step).path if candidates else None


def load(engine, storage: Storage, path: str, rank: int, world: int,
         work: str) -> Tuple[int, Dict[str, Any], Dict[str, Any]]:
    """Restore the DeepSpeed engine (weights, optimizer, LR scheduler) and this rank's RNG state.

    Returns:
        ``(step, metrics, meta)``: the step and metrics recorded in the checkpoint, and its whole
        ``meta.json``.

    Raises:
        ZeroplaneError: the checkpoint was written by a different number of ranks, or a downloaded file
            does not match the size and SHA-256 its marker recorded (:func:`zeroplane.checkpoints.check_local_copy`).
    """
    import random

    import numpy as np
    import torch

    meta = storage.read_json(f"{path}/{layout.CKPT_META}")
    if meta["world_size"] != world:
        raise ZeroplaneError(
            f"checkpoint {storage.uri_of(path)} was written by {meta['world_size']} ranks, this job has {world}; "
            f"resume with scaling.num_workers={meta['world_size']}"
        )
    local = storage.download_dir(path, os.path.join(work, "resume"))
    check_local_copy(storage, path, local)
    engine.load_checkpoint(str(local / layout.CKPT_DEEPSPEED_DIR), tag=meta["tag"], load_optimizer_states=True,
                           load_lr_scheduler_states=True)
    rng = torch.load(local / layout.CKPT_RNG_DIR / f"rank_{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return int(meta["step"]), dict(meta.get("metrics") or {}), meta


#: Ray Train's record of the checkpoints a run registered, in the run folder
#: (``ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME`` in Ray 2.60).
RAY_RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def set_aside_ray_snapshot(storage: Storage, job_id: str) -> Optional[str]:
    """Move Ray Train's checkpoint record of run ``job_id`` aside before the run starts again; returns
    where it went (``jobs/<job>/ray_snapshot_before_<UTC time>.json``), or None when there was none.

    Why: zeroplane's markers, not Ray's record, say which checkpoints exist (:func:`pick_resume_path`),
    and zeroplane's retention (:func:`apply_retention`) deletes checkpoints that Ray registered. Ray
    Train restores a run of the same name from its record and refuses to start when a checkpoint it names
    is gone (``CheckpointManagerInitializationError``), so ``train resume`` of any job whose retention had
    deleted a checkpoint would fail. Ray then starts a fresh record; the newest complete checkpoint is
    still found by its marker. The old record is kept beside it, not deleted.
    """
    path = storage.path(layout.JOBS_DIR, job_id, RAY_RUN_SNAPSHOT)
    if not storage.exists(path):
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    aside = storage.path(layout.JOBS_DIR, job_id, f"ray_snapshot_before_{stamp}.json")
    storage.write_bytes(aside, storage.read_bytes(path))
    storage.delete_file(path)
    return aside


def apply_retention(storage: Storage, job_id: str, num_to_keep: Optional[int], score_attribute: Optional[str] = None,
                    score_order: str = "min") -> list:
    """zeroplane's checkpoint retention, run by rank 0 after each completion marker (Ray's own
    ``num_to_keep`` is off: it would delete a checkpoint a registered version came from, and it never
    sees a checkpoint it did not register, e.g. one whose worker was killed right after writing it).

    Kept: the newest complete checkpoint; the best ``num_to_keep`` complete ones (by ``score_attribute``
    in the marker's metrics, ``score_order`` ``min``/``max``; without one, the newest); every checkpoint a
    registered version of any model names as its source (``source.job_id`` == ``job_id`` and its
    ``step``). Deleted: the other complete checkpoints, and folders without a valid marker older than the
    newest complete one (a save that never finished: nothing is writing them any more). Each marker is
    deleted before its folder, so a checkpoint is never seen half deleted as complete.

    Args:
        storage: the job's storage root.
        job_id: the run name (the folder under ``jobs/``).
        num_to_keep: complete checkpoints to keep by score; None keeps every checkpoint.

    Returns:
        The steps deleted.
    """
    from ...registry import Registry

    if num_to_keep is None:
        return []
    found = list_checkpoints(storage, job_id, include_incomplete=True)
    complete = [c for c in found if c.complete]
    if not complete:
        return []
    newest = complete[-1]

    def score(c) -> float:
        value = (c.metrics or {}).get(score_attribute) if score_attribute else None
        if not isinstance(value, (int, float)):
            return float("inf")  # unscored sorts last among the best
        return value if score_order == "min" else -value

    ranked = sorted(complete, key=score) if score_attribute else list(reversed(complete))
    keep = {newest.step} | {c.step for c in ranked[:num_to_keep]}
    reg = Registry(storage)
    for model in reg.models():
        for rec in reg.versions(model):
            src = rec.get("source") or {}
            if src.get("job_id") == job_id and isinstance(src.get("step"), int):
                keep.add(src["step"])
    doomed = [c for c in found if c.step not in keep and (c.complete or c.step < newest.step)]
    for c in doomed:
        storage.delete_file(f"{c.path.rstrip('/')}/{layout.CHECKPOINT_MARKER}")
        storage.delete_dir(c.path)
    return [c.step for c in doomed]
