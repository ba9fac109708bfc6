"""Exact resume on a real local Ray + DeepSpeed ZeRO-2, and incomplete checkpoints never being used.

Resume: a straight 16-step run, against 8 steps + stop (same LR schedule, ``train.stop_after_steps``)
then a second run of the SAME job id to step 16. The 91 training sequences and 8 sequences per step put
the resume point mid-epoch (64 of 91 consumed) and the epoch boundary inside the resumed half (step
12). CPU fp32 with gloo is deterministic, and resume restores weights, AdamW moments and step, the LR
scheduler, every rank's RNG (dropout) and the data position, so the resumed losses must equal the
straight run's to float32 rounding: ``RESUME_ATOL`` = 1e-6 on losses of ~6 (about 8 ulps), and in
practice they are bit-identical.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from zeroplane.checkpoints import MARKER, latest_complete, list_checkpoints
from zeroplane.errors import NotFoundError
from zeroplane.spec import load_spec
from zeroplane.storage import Storage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
N = 8
RESUME_ATOL = 1e-6


def _fit(storage_path: Path, job_id: str, *extra: str):
    from zeroplane.runtime.train.driver import build_train_loop_config, build_trainer

    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml",
                     [f"checkpoint.storage_path={storage_path}", "deepspeed.zero_stage=2", f"train.max_steps={2 * N}",
                      f"checkpoint.every_n_steps={N}", "train.eval_every_n_steps=100", "data.max_chars=15000",
                      "checkpoint.num_to_keep=null", "train.warmup_steps=3", *extra])
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    result = build_trainer(spec, job_id, storage, build_train_loop_config(spec, job_id, storage)).fit()
    assert result.error is None, result.error
    return storage, result


def _meta(storage: Storage, job_id: str, step: int) -> dict:
    ck = [c for c in list_checkpoints(storage, job_id) if c.step == step]
    assert ck, f"no complete checkpoint at step {step}"
    return storage.read_json(f"{ck[0].path}/meta.json")


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    stamp = int(time.time())
    straight, stopped = f"itest-straight-{stamp}", f"itest-resumed-{stamp}"
    storage, _ = _fit(root, straight)
    # the stopped job checkpoints twice as often and keeps one: retention deletes checkpoints Ray registered
    keep_one = [f"checkpoint.every_n_steps={N // 2}", "checkpoint.num_to_keep=1"]
    _, first = _fit(root, stopped, f"train.stop_after_steps={N}", *keep_one)
    first_meta = _meta(storage, stopped, N)  # read now: retention deletes it once the resumed run checkpoints
    assert [c.step for c in list_checkpoints(storage, stopped)] == [N]
    _, second = _fit(root, stopped, *keep_one)  # same job id, same storage: resumes at step N
    return storage, straight, stopped, first, second, first_meta


def test_stop_after_steps_keeps_schedule_and_checkpoints(runs):
    storage, straight, stopped, first, _, first_meta = runs
    assert first.metrics["step"] == N
    a, b = _meta(storage, straight, N), first_meta
    assert a["spec"]["train"]["max_steps"] == b["spec"]["train"]["max_steps"] == 2 * N
    assert b["resumes"] == [] and a["loss_curve"] == b["loss_curve"]  # the first halves agree exactly


def test_resume_after_retention_deleted_checkpoints_ray_registered(runs):
    """Retention (num_to_keep 1) deleted checkpoints Ray had registered; the resume set Ray's stale record
    aside (kept beside it) instead of failing on it, and only the newest checkpoint is left."""
    storage, _, stopped, _, second, _ = runs
    assert second.error is None and [c.step for c in list_checkpoints(storage, stopped)] == [2 * N]
    run_dir = Path(storage.path("jobs", stopped))
    assert len(list(run_dir.glob("ray_snapshot_before_*.json"))) == 1


def test_resume_matches_uninterrupted_run(runs):
    storage, straight, stopped, _, second, _ = runs
    assert second.metrics["step"] == 2 * N
    meta = _meta(storage, stopped, 2 * N)
    assert [r["step"] for r in meta["resumes"]] == [N]
    assert meta["resumes"][0]["from"].endswith(f"/jobs/{stopped}/checkpoint_step_{N:07d}")
    want = dict((s, loss) for s, loss in _meta(storage, straight, 2 * N)["loss_curve"])
    got = dict((s, loss) for s, loss in meta["loss_curve"])
    assert sorted(want) == sorted(got) == list(range(1, 2 * N + 1))
    # data: mid-epoch resume, and the epoch boundary inside the resumed half
    train_sequences, per_step = 91, 2 * 4
    assert N * per_step < train_sequences < 2 * N * per_step
    diffs = {s: abs(got[s] - want[s]) for s in range(N + 1, 2 * N + 1)}
    assert max(diffs.values()) <= RESUME_ATOL, diffs
    assert got[N + 1] != got[N + 2]  # losses really move (not a constant curve)


def test_incomplete_checkpoint_never_listed_resumed_or_promoted(runs, tmp_path):
    """A copy of a job whose newest checkpoint lost its marker (a save that died before the end), and one
    whose shard was truncated after the marker: neither is listed, resumed from or promoted."""
    import shutil

    from zeroplane.promote import resolve_checkpoint
    from zeroplane.runtime.train.checkpointing import pick_resume_path

    storage, straight, _, _, _, _ = runs
    src = Path(storage.path("jobs", straight))
    local = Storage.from_uri(str(tmp_path))
    for job, damage in (("no-marker", "marker"), ("truncated", "shard")):
        dst = tmp_path / "jobs" / job
        shutil.copytree(src, dst)
        newest = dst / f"checkpoint_step_{2 * N:07d}"
        if damage == "marker":
            (newest / MARKER).unlink()
        else:
            shard = newest / "ds" / f"step_{2 * N:07d}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
            shard.write_bytes(shard.read_bytes()[:100])
        assert [c.step for c in list_checkpoints(local, job)] == [N]
        everything = list_checkpoints(local, job, include_incomplete=True)
        assert [(c.step, c.complete) for c in everything] == [(N, True), (2 * N, False)]
        assert latest_complete(local, job).step == N
        assert pick_resume_path(local, job, None, None).endswith(f"checkpoint_step_{N:07d}")
        with pytest.raises(NotFoundError):
            resolve_checkpoint(local, f"{job}@{2 * N}")
        with pytest.raises(NotFoundError, match="not complete"):
            resolve_checkpoint(local, str(newest))
        assert resolve_checkpoint(local, job).step == N
    marker = json.loads((src / f"checkpoint_step_{2 * N:07d}" / MARKER).read_text())
    assert marker["step"] == 2 * N


def test_worker_killed_mid_run_recovers_from_last_complete_checkpoint(ray_local, tmp_path):
    """SIGKILL one Ray Train worker process (by the pid recorded in the first checkpoint) of a 2-worker
    ZeRO-2 run with ``failure.max_failures=1``: Ray Train restarts the worker group, the job resumes from
    the newest complete checkpoint, finishes, and its final checkpoint promotes."""
    import os
    import signal
    import threading

    import psutil

    from zeroplane.promote import promote_checkpoint
    from zeroplane.runtime.train.driver import build_train_loop_config, build_trainer

    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml",
                     [f"checkpoint.storage_path={tmp_path}", "train.max_steps=25", "checkpoint.every_n_steps=5",
                      "train.eval_every_n_steps=100", "failure.max_failures=1", "checkpoint.num_to_keep=2",
                      "data.max_chars=15000"])
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    job_id = f"itest-kill-{int(time.time())}"
    trainer = build_trainer(spec, job_id, storage, build_train_loop_config(spec, job_id, storage))
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=trainer.fit()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while latest_complete(storage, job_id) is None:
        assert thread.is_alive() and time.monotonic() < deadline, "no checkpoint before the deadline"
        time.sleep(0.2)
    first = latest_complete(storage, job_id)
    pids = storage.read_json(f"{first.path}/meta.json")["worker_pids"]
    victim = psutil.Process(pids[1])
    assert "RayTrainWorker" in " ".join(victim.cmdline()), victim.cmdline()  # a Train worker, by its own pid
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = first.step
    thread.join(timeout=240)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    result = out["result"]
    assert result.error is None and result.metrics["step"] == 25
    meta = storage.read_json(f"{latest_complete(storage, job_id).path}/meta.json")
    assert len(meta["resumes"]) == 1 and meta["resumes"][0]["step"] >= killed_at
    assert set(meta["worker_pids"]).isdisjoint(pids)  # a new worker group finished the job
    assert [s for s, _ in meta["loss_curve"]] == list(range(1, 26))
    rec = promote_checkpoint(storage, job_id, "tiny-survivor")
    assert rec["verification"]["ok"] and rec["source"]["step"] == 25


def test_a_mistake_in_the_workers_fails_at_once_without_retries(runs, tmp_path):
    """One worker resuming the 2-rank checkpoint (``train resume`` refuses that before submitting; here the
    trainer is built directly, past that check): the worker's ZeroplaneError ends the run on its first
    attempt although ``failure.max_failures=2`` — exactly one Ray Train worker process ever ran."""
    import threading

    import psutil
    from ray.train.v2.api.exceptions import WorkerGroupError

    from zeroplane.runtime.train.driver import build_train_loop_config, build_trainer

    storage, straight, _, _, _, _ = runs
    ckpt = next(c for c in list_checkpoints(storage, straight) if c.step == N)
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml",
                     [f"checkpoint.storage_path={tmp_path}", "scaling.num_workers=1", "failure.max_failures=2",
                      f"train.max_steps={2 * N}", "data.max_chars=15000"])
    mine = Storage.for_checkpoint_spec(spec.checkpoint)
    job_id = f"itest-mistake-{int(time.time())}"
    loop_config = build_train_loop_config(spec, job_id, mine)
    loop_config["resume_path"] = ckpt.path

    def train_workers() -> set:
        found = set()
        for p in psutil.process_iter(["pid", "cmdline"]):
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                found.add(p.info["pid"])
        return found

    before, seen, done = train_workers(), set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.update(train_workers() - before)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with pytest.raises(WorkerGroupError, match="written by 2 ranks, this job has 1"):
            build_trainer(spec, job_id, mine, loop_config).fit()
    finally:
        done.set()
        watcher.join()
    assert len(seen) == 1, seen  # no second worker group: the mistake was not retried
