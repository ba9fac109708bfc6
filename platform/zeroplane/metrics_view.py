"""Reading a job's TensorBoard event files on the control plane: scalars, the loss plot
(``zeroplane train plot``), a text sparkline (``train status``) and a TensorBoard server
(``zeroplane train tensorboard``).

Event files are written by rank 0 (:mod:`zeroplane.runtime.train.tracking`) under
``<storage>/jobs/<job>/tensorboard/``; on ``s3://`` storage they are first copied to
``$ZEROPLANE_HOME/tensorboard/<job>/``. They are read with TensorBoard's own ``EventAccumulator``, which
applies the purge records the writer leaves at each restart (the steps an earlier attempt logged past the
checkpoint it resumed from are dropped), so each step appears once.

Needs the ``tensorboard`` package (and ``matplotlib`` for plots): ``pip install 'zeroplane[tracking]'``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import layout, names
from .errors import NotFoundError, ZeroplaneError

#: Scalar tags the job writes (also the MLflow metric names). ``{rank}`` is filled per rank.
TAGS: Dict[str, str] = {
    "train_loss": "train/loss",
    "val_loss": "val/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "model_flop_per_s": "perf/model_flop_per_s",
    "tokens": "progress/tokens",
    "epoch": "progress/epoch",
    "peak_rss_mb": "memory/peak_rss_mb/rank_{rank}",
    "peak_device_mb": "memory/peak_device_mb/rank_{rank}",
    "checkpoint": "checkpoint/step",
    "resume": "run/resumed_at_step",
}

_INSTALL = "pip install 'zeroplane[tracking]'"
_BLOCKS = "▁▂▃▄▅▆▇█"


def _need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ZeroplaneError(f"this command needs the {module} package; {_INSTALL}")


@dataclass
class JobScalars:
    """One job's scalars as TensorBoard shows them.

    Attributes:
        job_id: the job.
        series: ``{tag: [(step, value), …]}`` in step order, each step once.
        files: the event files read (one per run attempt).
    """

    job_id: str
    series: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)
    files: List[str] = field(default_factory=list)

    def get(self, key: str) -> List[Tuple[int, float]]:
        """The series of a :data:`TAGS` key (or a raw tag); [] when never logged."""
        return self.series.get(TAGS.get(key, key), [])

    @property
    def resumes(self) -> List[int]:
        """Steps the job resumed from (restarts and ``train resume``), in order."""
        return [int(v) for _, v in self.get("resume")]


def local_event_dir(storage, job_id: str, cache_root: Optional[str] = None) -> Path:
    """A local folder holding the job's event files: the storage folder itself for local storage, else a
    copy under ``cache_root`` (default ``$ZEROPLANE_HOME/tensorboard``)/``<job_id>``, brought up to date
    (event files only grow, and new attempts add files; files are copied over, never deleted).

    Raises:
        SpecError: a malformed job id.
        NotFoundError: the job has no event files in ``storage``.
    """
    rel = layout.tensorboard_dir(job_id)
    src = storage.path(rel)
    if not storage.isdir(src) or not storage.listdir(src):
        raise NotFoundError(f"no TensorBoard event files for job {job_id!r} in {storage.uri_of(src)} "
                            "(a job started before tracking existed, tracking.tensorboard false, or another --storage)")
    if storage.is_local:
        return Path(src)
    root = Path(cache_root or os.path.join(os.path.expanduser(os.environ.get(names.ENV_HOME) or names.DEFAULT_HOME),
                                           "tensorboard"))
    return storage.download_dir(src, root / job_id)


def read_scalars(event_dir: str | os.PathLike, job_id: str = "") -> JobScalars:
    """Every scalar in ``event_dir`` through TensorBoard's ``EventAccumulator`` (purge records applied).

    Raises:
        ZeroplaneError: the ``tensorboard`` package is missing.
    """
    _need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    series = {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()[SCALARS]}
    files = sorted(p.name for p in Path(event_dir).iterdir() if ".tfevents." in p.name)
    return JobScalars(job_id, {t: sorted(s, key=lambda x: x[0]) for t, s in series.items()}, files)


def plot_jobs(jobs: Sequence[JobScalars], out_path: str | os.PathLike) -> Path:
    """Train (line) and validation (dashed, dots) loss of each job against step (left) and tokens seen
    (right), jobs overlaid in different colours, each resume a dotted vertical line in its job's colour.
    Written as a PNG (1,400 × 520 px).

    Raises:
        ZeroplaneError: no job has a loss to plot, or matplotlib is missing.
        SpecError: ``out_path`` does not end in ``.png``.
    """
    from .errors import SpecError

    if not str(out_path).lower().endswith(".png"):
        raise SpecError(f"-o {out_path}: the plot is a PNG; give a file name ending in .png")
    _need("matplotlib")
    if not any(j.get("train_loss") or j.get("val_loss") for j in jobs):
        raise ZeroplaneError("no loss logged yet by " + ", ".join(j.job_id for j in jobs))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(14, 5.2), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, job in enumerate(jobs):
        c = colors[i % len(colors)]
        tokens = dict(job.get("tokens"))
        for ax, x_of in ((by_step, lambda s: s), (by_tokens, lambda s: tokens.get(s))):
            for key, style, label in (("train_loss", dict(lw=1.4), "train"),
                                      ("val_loss", dict(ls="--", marker="o", ms=4, lw=1), "validation")):
                pts = [(x_of(s), v) for s, v in job.get(key) if x_of(s) is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, label=f"{job.job_id} {label}", **style)
            for k, step in enumerate(job.resumes):
                x = x_of(step)
                if x is not None:
                    ax.axvline(x, color=c, ls=":", lw=1.2, label=f"{job.job_id} resumed" if k == 0 else None)
    by_step.set_xlabel("optimizer step")
    by_tokens.set_xlabel("tokens seen")
    for ax in (by_step, by_tokens):
        ax.set_ylabel("loss (cross-entropy, nats/token)")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    fig.suptitle("loss: " + ", ".join(j.job_id for j in jobs), fontsize=10)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def sparkline(values: Sequence[float], width: int = 32) -> str:
    """``values`` as at most ``width`` block characters (``▁`` lowest … ``█`` highest; a longer series is
    averaged in ``width`` equal buckets); "" for none."""
    vals = [float(v) for v in values]
    if not vals:
        return ""
    if len(vals) > width:
        n = len(vals)
        vals = [sum(vals[i * n // width:(i + 1) * n // width]) / max(1, (i + 1) * n // width - i * n // width)
                for i in range(width)]
    lo, hi = min(vals), max(vals)
    span = hi - lo
    return "".join(_BLOCKS[int((v - lo) / span * (len(_BLOCKS) - 1)) if span > 0 else 0] for v in vals)


def tensorboard_command(logdir: str | os.PathLike, host: str = "127.0.0.1", port: int = 6006) -> List[str]:
    """The command serving ``logdir``: TensorBoard's Python reader (``--load_fast=false``, which honours the
    purge records), bound to ``host``:``port``, re-reading the files every 15 s.

    Raises:
        ZeroplaneError: the ``tensorboard`` package is missing.
    """
    _need("tensorboard")
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host, "--port", str(port),
            "--load_fast=false", "--reload_interval", "15"]


def start_tensorboard(dirs: Dict[str, str | os.PathLike], host: str = "127.0.0.1", port: int = 6006,
                      log_path: Optional[str] = None) -> subprocess.Popen:
    """Start TensorBoard showing ``{job id: event folder}`` as one run per job, named by its job id (a temp
    folder of links ``<job id> -> event folder`` is its ``--logdir``; TensorBoard follows the links).
    Its output goes to ``log_path`` (else discarded); the caller waits for it or ends it.

    Raises:
        ZeroplaneError: the ``tensorboard`` package is missing.
    """
    import tempfile

    view = Path(tempfile.mkdtemp(prefix="zeroplane-tensorboard-"))
    for job_id, d in dirs.items():
        (view / layout.check_job_id(job_id)).symlink_to(Path(d).resolve(), target_is_directory=True)
    cmd = tensorboard_command(view, host, port)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
