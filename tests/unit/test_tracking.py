"""Tracking without Ray: the ``tracking`` spec section, the event files rank 0 writes (real tensorboardX writer,
read back with TensorBoard's EventAccumulator) across a restart, the plot, the sparkline, and the FLOP count."""

from __future__ import annotations

from pathlib import Path

import pytest

from zeroplane.errors import NotFoundError, SpecError, ZeroplaneError
from zeroplane.metrics_view import TAGS, local_event_dir, plot_jobs, read_scalars, sparkline
from zeroplane.mlflow_link import flatten
from zeroplane.spec import load_spec, parse_spec
from zeroplane.storage import Storage

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "tiny-cpu.yaml"


class _Engine:
    """The one DeepSpeed engine method the tracker reads (a real engine needs torch.distributed)."""

    def __init__(self, norm):
        self.norm = norm

    def get_global_grad_norm(self):
        return self.norm


def _spec(tmp_path, *extra):
    return load_spec(TINY, [f"checkpoint.storage_path={tmp_path}", *extra])


def _attempt(spec, storage, job_id, start_step, end_step, losses, work):
    """One run attempt of rank 0 (world 1) from ``start_step`` to ``end_step``, logging every step."""
    from zeroplane.runtime.train.tracking import Tracker

    tr = Tracker.open(spec, job_id, storage, 0, 1, start_step, tokens_per_step=256, flop_per_token=1000,
                      ds_config={"zero_optimization": {"stage": 2}}, work_dir=str(work))
    if start_step == 0:
        tr.log_eval(0, 7.0)
    for step in range(start_step + 1, end_step + 1):
        tr.on_log(step, {"loss": losses[step], "lr": 1e-3, "tokens_per_s": 500.0, "epoch": step / 10}, _Engine(0.5))
        if step % 4 == 0:
            tr.on_checkpoint(step)
    tr.close()


def test_tracking_section_defaults_and_bad_uris(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = parse_spec({"name": "t"})
    assert s.tracking.tensorboard is True and s.tracking.mlflow_uri is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert parse_spec({"name": "t"}).tracking.mlflow_uri == "http://127.0.0.1:5000"
    with pytest.raises(SpecError, match=r"tracking.mlflow_uri.*not an MLflow tracking server URL"):
        parse_spec({"name": "t", "tracking": {"mlflow_uri": "sqlite:///runs.db"}})
    with pytest.raises(SpecError, match="credentials do not belong"):
        parse_spec({"name": "t", "tracking": {"mlflow_uri": "https://me:secret@mlflow.example.com"}})
    with pytest.raises(SpecError, match="tracking.mlflow_timeout_s"):
        parse_spec({"name": "t", "tracking": {"mlflow_timeout_s": 0}})


def test_restart_leaves_every_step_once_and_the_later_attempts_values(tmp_path):
    """Attempt 1 logs steps 1-10 (checkpoints at 4 and 8) and dies; attempt 2 resumes from step 4 and logs
    5-12 with other losses. Read back, steps 1-12 appear once, 5-12 with attempt 2's values; the raw
    files still hold attempt 1's 5-10 (so the purge, not the writer, removed them)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    spec = _spec(tmp_path)
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    first = {s: 10.0 - 0.1 * s for s in range(1, 11)}
    second = {s: 20.0 - 0.1 * s for s in range(5, 13)}
    _attempt(spec, storage, "job-a", 0, 10, first, tmp_path / "w1")
    _attempt(spec, storage, "job-a", 4, 12, second, tmp_path / "w2")
    d = local_event_dir(storage, "job-a")
    assert d == Path(storage.path("jobs", "job-a", "tensorboard"))
    got = read_scalars(d, "job-a")
    assert len(got.files) == 2
    want = {**{s: first[s] for s in range(1, 5)}, **second}
    assert got.get("train_loss") == [(s, pytest.approx(want[s], rel=1e-6)) for s in range(1, 13)]
    assert got.get("val_loss") == [(0, 7.0)]
    assert got.resumes == [4]
    assert [s for s, _ in got.get("checkpoint")] == [4, 8, 12]
    assert got.get("tokens")[-1] == (12, 12 * 256)
    assert got.get("model_flop_per_s")[-1] == (12, 500.0 * 1000)
    assert got.get("grad_norm")[0] == (1, 0.5)
    assert got.get(TAGS["peak_rss_mb"].format(rank=0))[-1][1] > 0
    raw = EventAccumulator(str(d), size_guidance={SCALARS: 0}, purge_orphaned_data=False)
    raw.Reload()
    assert len(raw.Scalars(TAGS["train_loss"])) == 10 + 8


def test_tensorboard_off_writes_nothing(tmp_path):
    spec = _spec(tmp_path, "tracking.tensorboard=false")
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    _attempt(spec, storage, "job-off", 0, 4, {s: 1.0 for s in range(1, 5)}, tmp_path / "w")
    with pytest.raises(NotFoundError, match="no TensorBoard event files for job 'job-off'"):
        local_event_dir(storage, "job-off")


def test_s3_like_storage_gets_the_file_uploaded_from_the_work_folder(tmp_path):
    """A non-local storage: the writer works in the temp folder and the uploader copies the file over."""
    from zeroplane.runtime.train.tracking import _Uploader

    work, dest_root = tmp_path / "work", tmp_path / "root"
    work.mkdir()
    (work / "events.out.tfevents.1.h").write_bytes(b"abc")
    st = Storage.from_uri(str(dest_root))
    up = _Uploader(str(work), st, "jobs/j/tensorboard")
    assert up.close(wait_s=30)
    assert (dest_root / "jobs/j/tensorboard/events.out.tfevents.1.h").read_bytes() == b"abc"
    assert up.failures == 0


def test_plot_overlays_jobs_and_refuses_other_formats(tmp_path):
    spec = _spec(tmp_path)
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    _attempt(spec, storage, "job-p", 0, 8, {s: 5.0 / s for s in range(1, 9)}, tmp_path / "w")
    job = read_scalars(local_event_dir(storage, "job-p"), "job-p")
    out = plot_jobs([job, job], tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SpecError, match=r"-o loss.svg: the plot is a PNG"):
        plot_jobs([job], "loss.svg")
    empty = read_scalars(tmp_path, "nothing")
    with pytest.raises(ZeroplaneError, match="no loss logged yet by nothing"):
        plot_jobs([empty], tmp_path / "e.png")


def test_sparkline_scales_and_buckets():
    assert sparkline([]) == ""
    assert sparkline([3, 2, 1]) == "█▄▁"
    assert sparkline([1, 1]) == "▁▁"
    line = sparkline(list(range(100, 0, -1)), width=10)
    assert len(line) == 10 and line[0] == "█" and line[-1] == "▁"


def test_model_flop_per_token_from_the_built_config():
    from zeroplane.runtime.train.modeling import model_config
    from zeroplane.runtime.train.tracking import model_flop_per_token

    spec = load_spec(TINY)
    cfg = model_config(spec.model, 512, 64, 0, 1)  # tiny preset: 2 layers, 64 wide
    assert model_flop_per_token(1000, cfg, 64) == 6 * 1000 + 12 * 2 * 64 * 64


def test_flatten_makes_mlflow_params():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {}}, "spec.") == {
        "spec.a.b": "1", "spec.a.c": "[1, 2]", "spec.d": "x", "spec.e": "{}"}
    assert len(flatten({"long": "x" * 7000})["long"]) == 6000


def test_cli_train_plot_reads_the_storage_and_writes_the_png(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from zeroplane.cli.main import main

    monkeypatch.setenv("ZEROPLANE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = _spec(tmp_path)
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    _attempt(spec, storage, "job-c", 0, 8, {s: 5.0 / s for s in range(1, 9)}, tmp_path / "w1")
    _attempt(spec, storage, "job-c", 4, 8, {s: 4.0 / s for s in range(5, 9)}, tmp_path / "w2")
    out = tmp_path / "plots" / "loss.png"
    r = CliRunner().invoke(main, ["train", "plot", "job-c", "--storage", str(tmp_path), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "job-c: 8 train-loss steps (5.000 at step 1 -> 0.500 at step 8), validation 7.000 -> 7.000, " \
           "resumed at step 4" in r.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(main, ["train", "plot", "nojob", "--storage", str(tmp_path), "-o", str(out)])
    assert r.exit_code != 0 and "no TensorBoard event files for job 'nojob'" in r.output


def test_s3_storage_event_files_uploaded_and_read_back_through_a_local_copy(s3_bucket, tmp_path, monkeypatch):
    """On a real (moto) S3 server: two attempts write in their work folders, the uploader puts each file in
    the job's folder, and the control plane reads them through a local copy, every step once."""
    monkeypatch.setenv("ZEROPLANE_HOME", str(tmp_path / "home"))
    spec = load_spec(TINY, [f"checkpoint.storage_path=s3://{s3_bucket}/runs"])
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    _attempt(spec, storage, "job-s3", 0, 6, {s: 6.0 - s for s in range(1, 7)}, tmp_path / "w1")
    _attempt(spec, storage, "job-s3", 4, 8, {s: 9.0 - s for s in range(5, 9)}, tmp_path / "w2")
    assert len(storage.listdir(storage.path("jobs/job-s3/tensorboard"))) == 2
    d = local_event_dir(storage, "job-s3")
    assert d == tmp_path / "home" / "tensorboard" / "job-s3"
    got = read_scalars(d, "job-s3")
    assert got.get("train_loss") == [(s, 6.0 - s if s <= 4 else 9.0 - s) for s in range(1, 9)]
    assert got.resumes == [4]
