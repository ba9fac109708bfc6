"""ZeRO stages 0 and 1, ZeRO-2 with ``offload_optimizer: cpu`` (DeepSpeedCPUAdam, JIT-compiled on first use
and cached in ~/.cache/torch_extensions) and ZeRO-3 with ``offload_param: cpu``, each on 2 real Ray Train
workers: train to a checkpoint, resume the same job for one step more, promote the result (consolidation
+ probe-logit verification). Stages 2 and 3 without offload are covered by test_train_zero.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from zeroplane.checkpoints import list_checkpoints
from zeroplane.spec import load_spec
from zeroplane.storage import Storage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("overrides", [
    ["deepspeed.zero_stage=0"],
    ["deepspeed.zero_stage=1"],
    ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"],
    ["deepspeed.zero_stage=3", "deepspeed.offload_param=cpu"],
], ids=["zero0", "zero1", "zero2-offload-optimizer", "zero3-offload-param"])
def test_train_checkpoint_resume_promote(ray_local, tmp_path, overrides):
    from zeroplane.promote import promote_checkpoint
    from zeroplane.runtime.train.driver import build_train_loop_config, build_trainer

    job_id = f"itest-cov-{int(time.time() * 1000)}"
    results = []
    for stop in ("train.stop_after_steps=2", "train.stop_after_steps=null"):
        spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml",
                         [f"checkpoint.storage_path={tmp_path}", "train.max_steps=3", "train.warmup_steps=1",
                          "checkpoint.every_n_steps=2", "train.eval_every_n_steps=100", "data.max_chars=15000",
                          "checkpoint.num_to_keep=null", stop, *overrides])
        storage = Storage.for_checkpoint_spec(spec.checkpoint)
        results.append(build_trainer(spec, job_id, storage, build_train_loop_config(spec, job_id, storage)).fit())
        assert results[-1].error is None, results[-1].error
    assert [r.metrics["step"] for r in results] == [2, 3]
    cks = list_checkpoints(storage, job_id)
    assert [c.step for c in cks] == [2, 3]
    meta = storage.read_json(f"{cks[-1].path}/meta.json")
    assert [r["step"] for r in meta["resumes"]] == [2] and [s for s, _ in meta["loss_curve"]] == [1, 2, 3]
    assert meta["zero_stage"] == spec.deepspeed.zero_stage
    rec = promote_checkpoint(storage, job_id, "cov")
    assert rec["verification"]["ok"], rec["verification"]
    assert rec["consolidation"]["zero_stage"] == spec.deepspeed.zero_stage
    assert rec["verification"]["max_abs_logit_diff"] <= 1e-5
