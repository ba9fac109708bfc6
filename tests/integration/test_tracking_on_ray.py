"""Tracking on a real local Ray + DeepSpeed ZeRO-2 job, against a real ``mlflow server`` (SQLite backend,
started here) and a real TensorBoard server.

One job, two run attempts: attempt 1 trains to step 8 (``train.stop_after_steps``, checkpoints at 4 and 8);
the step-8 checkpoint then loses its completion marker (as when a save dies), so attempt 2 (same job id)
resumes from step 4, retrains 5-8 and goes on to 12. The event files must then show every step 1-12 once,
5-12 with attempt 2's losses; MLflow must hold one run for the job with the spec, the DeepSpeed config and
the metrics; ``promote`` must add a registered model version pointing at zeroplane's version.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from zeroplane.checkpoints import MARKER, list_checkpoints
from zeroplane.metrics_view import local_event_dir, read_scalars, start_tensorboard
from zeroplane.mlflow_link import TAG_JOB_ID, MlflowSink, find_run, metric_history
from zeroplane.spec import load_spec
from zeroplane.storage import Storage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "zeroplane-itest"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, deadline_s: float, log: Path) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        assert proc.poll() is None, f"{url}: server exited {proc.returncode}: {log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} not up after {deadline_s}s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def mlflow_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def mlflow_server(mlflow_port, tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a SQLite backend store and a local artifact folder it serves."""
    d = tmp_path_factory.mktemp("mlflow")
    log = d / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
                                 "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1",
                                 "--port", str(mlflow_port), "--workers", "1"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{mlflow_port}"
    try:
        _wait_http(f"{url}/health", proc, 180, log)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mlflow_down_loses_nothing_and_sends_at_the_next_period(mlflow_port, request):
    """The server is not up yet: logging returns at once and keeps the values; once the server is up, the
    next period creates the run and sends everything, in step order."""
    url = f"http://127.0.0.1:{mlflow_port}"
    sink = MlflowSink(url, EXPERIMENT, "sink-job", {"p": "1"}, {"zeroplane/spec.json": {"name": "x"}},
                      timeout_s=2, period_s=3600)  # sends only when flushed
    sink.log_metrics({"train/loss": 5.0}, 1)
    sink.flush()
    end = time.monotonic() + 60
    while sink.failures == 0 and time.monotonic() < end:
        time.sleep(0.1)
    assert sink.failures >= 1 and sink.run_id is None and sink.pending == 1
    sink.log_metrics({"train/loss": 4.0}, 2)  # queued while the server is away
    assert sink.pending == 2
    request.getfixturevalue("mlflow_server")  # the server comes up
    assert sink.close(wait_s=60)
    assert sink.pending == 0 and sink.dropped == 0
    assert metric_history(url, sink.run_id, "train/loss") == [(1, 5.0), (2, 4.0)]


def _fit(root: Path, job_id: str, url: str, *extra: str):
    from zeroplane.runtime.train.driver import build_train_loop_config, build_trainer

    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml",
                     [f"checkpoint.storage_path={root}", "train.max_steps=12", "checkpoint.every_n_steps=4",
                      "train.eval_every_n_steps=6", "data.max_chars=15000", "checkpoint.num_to_keep=null",
                      f"tracking.mlflow_uri={url}", f"tracking.mlflow_experiment={EXPERIMENT}", *extra])
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    result = build_trainer(spec, job_id, storage, build_train_loop_config(spec, job_id, storage)).fit()
    assert result.error is None, result.error
    return storage


@pytest.fixture(scope="module")
def job(ray_local, mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    job_id = f"itest-tracking-{int(time.time())}"
    storage = _fit(root, job_id, mlflow_server, "train.stop_after_steps=8")
    eight = [c for c in list_checkpoints(storage, job_id) if c.step == 8][0]
    Path(eight.path, MARKER).unlink()  # the step-8 save "died": attempt 2 resumes from step 4
    _fit(root, job_id, mlflow_server)
    return storage, job_id, mlflow_server


def test_event_files_hold_each_step_once_across_the_restart(job):
    storage, job_id, _ = job
    got = read_scalars(local_event_dir(storage, job_id), job_id)
    assert len(got.files) == 2  # one per attempt
    curve = dict(storage.read_json(f"{list_checkpoints(storage, job_id)[-1].path}/meta.json")["loss_curve"])
    assert sorted(curve) == list(range(1, 13))
    assert got.get("train_loss") == [(s, pytest.approx(curve[s], rel=1e-6)) for s in range(1, 13)]
    assert [s for s, _ in got.get("val_loss")] == [0, 6, 12]
    assert got.resumes == [4]
    assert [s for s, _ in got.get("checkpoint")] == [4, 8, 12]
    tokens_per_step = 2 * 4 * 64
    assert got.get("tokens")[-1] == (12, 12 * tokens_per_step)
    for key in ("lr", "grad_norm", "tokens_per_s", "model_flop_per_s", "memory/peak_rss_mb/rank_0",
                "memory/peak_rss_mb/rank_1"):
        assert [s for s, _ in got.get(key)] == list(range(1, 13)), key
    assert all(v > 0 for _, v in got.get("model_flop_per_s"))


def test_mlflow_run_holds_spec_config_and_metrics(job):
    from mlflow.tracking import MlflowClient

    storage, job_id, url = job
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_JOB_ID}` = '{job_id}'")
    assert len(runs) == 1  # the resumed attempt found the job's run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == job_id
    assert run.data.params["spec.train.max_steps"] == "12"
    assert run.data.params["spec.train.stop_after_steps"] == "8"  # the first attempt's spec
    assert run.data.params["deepspeed_config.zero_optimization.stage"] == "2"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "zeroplane")}
    assert {"zeroplane/spec.json", "zeroplane/deepspeed_config.json", "zeroplane/resume-4"} <= arts
    hist = metric_history(url, run.info.run_id, "train/loss")
    assert sorted({s for s, _ in hist}) == list(range(1, 13))
    assert [s for s, _ in metric_history(url, run.info.run_id, "run/resumed_at_step")] == [4]


def test_promote_records_a_model_version_pointing_at_zeroplane(job):
    from mlflow.tracking import MlflowClient

    from zeroplane.promote import promote_checkpoint

    storage, job_id, url = job
    rec = promote_checkpoint(storage, job_id, "tiny-tracked")
    assert rec["mlflow"]["registered_model"] == "tiny-tracked"
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    mv = client.get_model_version("tiny-tracked", str(rec["mlflow"]["version"]))
    run = find_run(client, EXPERIMENT, job_id)
    assert mv.run_id == run.info.run_id
    assert mv.tags["zeroplane.version"] == rec["version"] and mv.tags["zeroplane.checkpoint_step"] == "12"
    assert mv.tags["zeroplane.uri"] == rec["uri"] and mv.tags["zeroplane.job_id"] == job_id
    pointer = f"zeroplane/versions/tiny-tracked/{rec['version']}"
    assert mv.source.endswith(pointer)
    local = client.download_artifacts(run.info.run_id, f"{pointer}/zeroplane_version.json")
    assert json.loads(Path(local).read_text())["uri"] == rec["uri"]


def test_tensorboard_serves_the_job_without_the_purged_steps(job, tmp_path):
    storage, job_id, _ = job
    port = _free_port()
    log = tmp_path / "tb.log"
    proc = start_tensorboard({job_id: local_event_dir(storage, job_id)}, port=port, log_path=str(log))
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/data/runs", proc, 120, log)
        end = time.monotonic() + 60
        while True:  # the first load of the folder runs in the background
            with urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=10) as r:
                tags = json.load(r)
            if "train/loss" in tags.get(job_id, {}) or time.monotonic() > end:
                break
            time.sleep(1)
        q = urllib.parse.urlencode({"run": job_id, "tag": "train/loss"})
        with urllib.request.urlopen(f"{base}/data/plugin/scalars/scalars?{q}", timeout=10) as r:
            points = json.load(r)
        assert [p[1] for p in points] == list(range(1, 13))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
