"""Exact resume across token-shard boundaries (real local Ray, DeepSpeed ZeRO-2, shards on local storage).

The dataset is cut into shards of 1,100 tokens, which no 64-token sequence divides, so many sequences
span two shards; the stopped job resumes at step N with a first micro-batch holding such a sequence.
The resumed losses must equal an uninterrupted run's (as in test_resume.py), and both jobs read the one
dataset prepared by the first.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from zeroplane.checkpoints import list_checkpoints
from zeroplane.spec import load_spec
from zeroplane.storage import Storage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
N = 4
SHARD, SEQ = 1100, 64
RESUME_ATOL = 1e-6


def _fit(root: Path, job_id: str, *extra: str):
    from zeroplane.runtime.train.driver import build_train_loop_config, build_trainer

    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml",
                     [f"checkpoint.storage_path={root}", f"train.max_steps={2 * N}", f"checkpoint.every_n_steps={N}",
                      "train.eval_every_n_steps=100", "train.eval_batches=1", "data.max_chars=15000",
                      f"data.shard_tokens={SHARD}", "checkpoint.num_to_keep=null", "train.warmup_steps=2", *extra])
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    config = build_train_loop_config(spec, job_id, storage)
    result = build_trainer(spec, job_id, storage, config).fit()
    assert result.error is None, result.error
    return storage, config


def _curve(storage, job_id):
    ck = [c for c in list_checkpoints(storage, job_id) if c.step == 2 * N][0]
    return dict((s, loss) for s, loss in storage.read_json(f"{ck.path}/meta.json")["loss_curve"])


def test_resume_at_a_shard_boundary_matches_uninterrupted_run(ray_local, tmp_path):
    import numpy as np

    from zeroplane.runtime.train.data import BatchOrder

    stamp = int(time.time())
    straight, stopped = f"itest-shard-straight-{stamp}", f"itest-shard-resumed-{stamp}"
    storage, config = _fit(tmp_path, straight)
    shards = config["dataset"]["manifest"]["splits"]["train"]["shards"]
    assert len(shards) >= 4 and all(s["tokens"] == SHARD for s in shards[:-1])
    n_train = sum(s["tokens"] for s in shards) // SEQ
    micro, world = 4, 2
    first = [i for rank in range(world) for i in BatchOrder(n_train, micro, world, rank, 0).indices(N)]
    spanning = [i for i in first if (i * SEQ) // SHARD != (i * SEQ + SEQ - 1) // SHARD]
    assert spanning, first  # the first micro-batch after the resume reads across a shard boundary

    _fit(tmp_path, stopped, f"train.stop_after_steps={N}")
    _, again = _fit(tmp_path, stopped)
    assert again["dataset"]["id"] == config["dataset"]["id"]  # one dataset, prepared once
    want, got = _curve(storage, straight), _curve(storage, stopped)
    assert sorted(got) == sorted(want) == list(range(1, 2 * N + 1))
    diffs = {s: abs(got[s] - want[s]) for s in range(N + 1, 2 * N + 1)}
    assert max(diffs.values()) <= RESUME_ATOL, diffs
    assert len({round(got[s], 6) for s in got}) > 1 and np.isfinite(list(got.values())).all()
