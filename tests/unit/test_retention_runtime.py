"""Checkpoint retention on rank 0 (zeroplane.runtime.train.checkpointing.apply_retention) on a real tmp
storage: the best num_to_keep and the newest stay, a checkpoint a registered version came from always
stays, and a folder left by a save that never finished (no marker) is collected."""

from __future__ import annotations

import json
import os
from pathlib import Path

from zeroplane.checkpoints import MARKER, build_marker, dir_name_for_step, list_checkpoints
from zeroplane.registry import Registry
from zeroplane.runtime.train.checkpointing import RAY_RUN_SNAPSHOT, apply_retention, set_aside_ray_snapshot
from zeroplane.storage import Storage

JOB = "tiny-cpu-20250101-000000-abcd"


def _checkpoint(storage: Storage, step: int, val_loss: float, marker: bool = True) -> None:
    ck = storage.path("jobs", JOB, dir_name_for_step(step))
    os.makedirs(f"{ck}/ds", exist_ok=True)
    Path(f"{ck}/ds/shard.pt").write_bytes(b"s" * step)
    if marker:
        storage.write_json(f"{ck}/{MARKER}", build_marker(storage.list_files(ck), {"step": step,
                                                                                 "metrics": {"val_loss": val_loss}}))


def _version_from(storage: Storage, tmp_path: Path, step: int) -> None:
    d = tmp_path / f"hf{step}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    Registry(storage).register("tiny", d, {"source": {"job_id": JOB, "step": step}})


def test_keeps_the_best_the_newest_and_what_a_version_came_from(tmp_path):
    storage = Storage.from_uri(str(tmp_path / "store"))
    for step, loss in [(10, 5.0), (20, 3.0), (30, 4.0), (40, 3.5), (50, 4.5)]:
        _checkpoint(storage, step, loss)
    _checkpoint(storage, 45, 0.0, marker=False)  # a save that never finished, older than the newest
    _version_from(storage, tmp_path, 10)
    deleted = apply_retention(storage, JOB, 2, "val_loss", "min")
    assert sorted(deleted) == [30, 45]
    assert [c.step for c in list_checkpoints(storage, JOB, include_incomplete=True)] == [10, 20, 40, 50]


def test_without_a_score_the_newest_stay_and_null_keeps_all(tmp_path):
    storage = Storage.from_uri(str(tmp_path / "store"))
    for step in (5, 10, 15):
        _checkpoint(storage, step, 1.0)
    assert apply_retention(storage, JOB, None) == []
    assert apply_retention(storage, JOB, 1) == [5, 10]
    assert [c.step for c in list_checkpoints(storage, JOB)] == [15]


def test_a_restarting_run_sets_rays_record_aside_and_keeps_it(tmp_path):
    storage = Storage.from_uri(str(tmp_path))
    assert set_aside_ray_snapshot(storage, JOB) is None  # a first run: nothing to set aside
    record = storage.path("jobs", JOB, RAY_RUN_SNAPSHOT)
    storage.write_json(record, {"checkpoint_results": [{"checkpoint": {"path": "gone"}}]})
    _checkpoint(storage, 4, 1.0)
    aside = set_aside_ray_snapshot(storage, JOB)
    assert not storage.exists(record) and json.loads(Path(aside).read_text())["checkpoint_results"]
    assert [c.step for c in list_checkpoints(storage, JOB)] == [4]  # zeroplane's own listing is unchanged
