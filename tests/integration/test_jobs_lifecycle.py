"""Jobs through the real Ray Jobs API on a local head that the module starts (and stops, by its pids):
``train stop`` answers only once the driver and every worker process are gone, ``train resume``
continues the same job from its newest complete checkpoint, a job whose runtime env cannot be set up
fails with the reason in bounded time."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from click.testing import CliRunner

from zeroplane.spec import load_spec

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[object]:
    from zeroplane import cluster

    tmp = tmp_path_factory.mktemp("jobs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEROPLANE_HOME", str(tmp / "home"))
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(tmp / "ray-auth-token"))
        for var in ("RAY_ADDRESS", "ZEROPLANE_SERVE_PORT", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            mp.delenv(var, raising=False)
        cluster.start_local_head(timeout_s=120)
        try:
            from zeroplane.sdk import Client

            yield Client(), tmp / "storage"
        finally:
            cluster.stop_local_head()
    cluster._refresh_ray_auth_cache()


def _events(zp, job_id: str):
    from zeroplane.sdk import parse_progress

    return parse_progress(zp.jobs.client.get_job_logs(job_id))


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stop_leaves_nothing_running_then_resume_continues_the_job(head):
    from zeroplane.cli.main import main

    zp, storage = head
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml",
                     [f"checkpoint.storage_path={storage}", "train.max_steps=200", "checkpoint.every_n_steps=4",
                      "train.eval_every_n_steps=1000", "checkpoint.num_to_keep=null"])
    job = zp.submit(spec).job_id
    deadline = time.monotonic() + 240
    while not any(e["event"] == "checkpoint" for e in _events(zp, job)):
        assert zp.jobs.status(job) in ("PENDING", "RUNNING") and time.monotonic() < deadline, zp.jobs.logs(job)[-3000:]
        time.sleep(1)
    start = next(e for e in _events(zp, job) if e["event"] == "start")
    pids = [zp.jobs.info(job).driver_pid, *start["worker_pids"]]
    assert len(pids) == 3 and all(_alive(p) for p in pids)

    stopped = CliRunner().invoke(main, ["train", "stop", job, "--wait-s", "90"])
    assert stopped.exit_code == 0 and stopped.output.strip() == f"{job}: STOPPED", stopped.output
    assert [p for p in pids if _alive(p)] == []  # the answer came only after every process was gone
    assert zp.jobs.live_actors(zp.jobs.info(job).ray_job_id) == []
    reached = max(c.step for c in zp.checkpoints(job))

    # a resume with another number of workers than the ranks that wrote the checkpoint: refused, nothing sent
    refused = CliRunner().invoke(main, ["train", "resume", job, "--set", "scaling.num_workers=1"])
    assert refused.exit_code == 2, refused.output
    assert "scaling.num_workers=1" in refused.output and "written by 2 ranks" in refused.output
    assert "--set scaling.num_workers=2" in refused.output
    res = CliRunner().invoke(main, ["train", "resume", job, "--set", "train.max_steps=" + str(reached + 4),
                                    "--set", "train.warmup_steps=3", "-o", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["job_id"] == f"{job}-r1" and out["zeroplane_job_id"] == job and out["resume_step"] == reached
    assert zp.wait(out["job_id"], timeout_s=300) == "SUCCEEDED", zp.jobs.logs(out["job_id"])[-3000:]
    events = _events(zp, out["job_id"])
    assert [e for e in events if e["event"] == "resumed"][0]["step"] == reached
    assert next(e for e in events if e["event"] == "start")["start_step"] == reached
    # one job, two submissions: checkpoints and the listing agree
    assert [c.step for c in zp.checkpoints(out["job_id"])][-1] == reached + 4
    assert zp.checkpoints(job) == zp.checkpoints(out["job_id"])
    listed = {j.job_id: j for j in zp.jobs.list()}
    assert listed[f"{job}-r1"].zeroplane_job_id == job and listed[job].status == "STOPPED"
    assert zp.status(out["job_id"]).result["status"] == "SUCCEEDED"


def test_bad_runtime_env_fails_with_reason_in_bounded_time(head):
    zp, storage = head
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml", [f"checkpoint.storage_path={storage}"])
    req = zp.jobs.dryrun(spec, "itest-bad-env")
    req.runtime_env["py_modules"] = ["gcs://_ray_pkg_0123456789abcdef.zip"]  # a package nobody uploaded
    t0 = time.monotonic()
    zp.jobs.submit(req)
    assert zp.wait("itest-bad-env", timeout_s=120, poll_s=0.5) == "FAILED"
    assert time.monotonic() - t0 < 120
    msg = zp.jobs.info("itest-bad-env").message
    assert "runtime" in msg.lower() and "_ray_pkg_0123456789abcdef" in msg, msg


def test_dry_run_refuses_what_submit_refuses_and_shows_the_request_submit_sends(head):
    """One code path: the dry run runs submit's preflights against the cluster and its request is the one sent."""
    from zeroplane.cli.main import main
    from zeroplane.errors import ZeroplaneError

    zp, storage = head
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml",
                     [f"checkpoint.storage_path={storage}", "scaling.resources_per_worker.CPU=1000"])
    with pytest.raises(ZeroplaneError) as refused:
        zp.submit(spec)
    dry = CliRunner().invoke(main, ["train", "submit", str(REPO / "jobs" / "tiny-cpu.yaml"), "--dry-run",
                                    "--set", f"checkpoint.storage_path={storage}",
                                    "--set", "scaling.resources_per_worker.CPU=1000"])
    assert dry.exit_code == 1 and refused.value.message in dry.output, dry.output
    assert "resources_per_worker.CPU=1000" in refused.value.message

    ok = load_spec(REPO / "jobs" / "tiny-cpu.yaml", [f"checkpoint.storage_path={storage}"])
    plan = zp.dryrun(ok, job_id="itest-same-request")
    assert {c.name: c.status for c in plan.request.checks} == {
        "upload": "ok", "cluster": "ok", "storage": "ok", "single_node": "ok", "resources": "ok"}
    zp.jobs.submit(plan.request)  # what the dry run showed is what Ray receives
    try:
        sent = zp.jobs.client.get_job_info("itest-same-request")
        assert sent.entrypoint == plan.request.entrypoint
        assert sent.metadata == plan.request.metadata
        assert {k: sent.runtime_env["env_vars"][k] for k in plan.request.runtime_env["env_vars"]} == \
            plan.request.runtime_env["env_vars"]
    finally:
        zp.stop("itest-same-request", wait_s=90)


def test_no_credential_of_the_submitter_reaches_the_cluster(head, monkeypatch):
    """A job request is readable by every token holder: the submitting shell's secrets are never in it,
    nor in the job's log, nor in any Ray log file."""
    import secrets

    import requests

    from zeroplane.cluster import auth_headers

    zp, storage = head
    sentinel = f"zp-sentinel-{secrets.token_hex(8)}"
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(var, f"{sentinel}-{var}")
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml", [f"checkpoint.storage_path={storage}", "train.max_steps=2",
                                                       "train.warmup_steps=1", "checkpoint.every_n_steps=2"])
    job = zp.submit(spec).job_id
    assert zp.wait(job, timeout_s=300) == "SUCCEEDED", zp.jobs.logs(job)[-3000:]

    base = zp.cluster.dashboard_url
    answers = [requests.get(f"{base}/api/jobs/", headers=auth_headers(), timeout=30).text,
               requests.get(f"{base}/api/jobs/{job}", headers=auth_headers(), timeout=30).text,
               zp.jobs.logs(job)]
    assert job in answers[0] and all(sentinel not in a for a in answers)
    leaked = []
    for path in Path(zp.cluster.temp_dir).rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if sentinel.encode() in path.read_bytes():
                    leaked.append(str(path))
            except OSError:
                continue  # sockets, files that vanished
    assert leaked == []


def test_a_config_only_transformers_can_refuse_fails_the_job_at_once_without_retries(head):
    """A mistake no retry can fix ends the job in the driver, before data preparation and workers."""
    zp, storage = head
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml", [f"checkpoint.storage_path={storage}",
                                                       "failure.max_failures=2", "model.config.activation_function=3"])
    job = zp.submit(spec).job_id
    assert zp.wait(job, timeout_s=300) == "FAILED"
    status = zp.status(job)
    assert status.result["error"].startswith("SpecError:") and "model.config" in status.result["error"]
    log = zp.jobs.logs(job)
    assert not [e for e in parse_events(log) if e.get("event") == "start"]
    assert "[zeroplane] data:" not in log and "RETRY" not in log


def parse_events(log: str):
    from zeroplane.sdk import parse_progress

    return parse_progress(log)
