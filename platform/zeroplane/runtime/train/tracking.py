"""Rank 0's training metrics where people look for them: TensorBoard event files in the job's run folder
and, optionally, a run on an MLflow tracking server (``tracking`` in the spec).

The training loop calls five hooks on every rank (all but :meth:`Tracker.on_log` do nothing off rank 0;
``on_log`` also gathers every rank's peak memory, a collective)::

    tracker = Tracker.open(spec, job_id, storage, rank, world, start_step, ...)  # after the resume decision
    tracker.log_eval(0, val_loss)          # the step-0 validation loss
    tracker.on_log(step, metrics, engine)  # each logging period, with the loop's progress metrics
    tracker.on_checkpoint(step)            # once the checkpoint's marker is written
    tracker.close()                        # at the end

Event files (written with ``tensorboardX``, TensorBoard's own record format) live in
``<storage>/jobs/<job>/tensorboard/``, one file per run attempt. Each attempt's writer starts with
TensorBoard's purge record at the step after the checkpoint it resumed from (``purge_step``; 0 for a
fresh start): TensorBoard, and :mod:`zeroplane.metrics_view`, then drop the steps an earlier attempt
logged past that checkpoint, so a restarted worker group or a ``train resume`` leaves every step once.
On ``s3://`` storage the file is written in the worker's temp folder and uploaded by a background thread
(at every checkpoint, at the end, and at a logging period once ``tracking.upload_every_s`` has passed).

Scalars (tags in :data:`zeroplane.metrics_view.TAGS`) per logging period: train loss (mean over ranks),
validation loss (at evaluations and step 0), learning rate, global gradient norm (DeepSpeed's, before
clipping), tokens/s, model FLOP/s, tokens seen, epoch, each rank's peak resident memory (MB) and, on GPUs,
peak device memory (MB); ``checkpoint/step`` at each complete checkpoint; ``run/resumed_at_step`` at each
resume. The same values go to MLflow through :class:`zeroplane.mlflow_link.MlflowSink`, which never blocks
the loop.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Dict, Optional

from ... import layout
from ...metrics_view import TAGS
from ...mlflow_link import MlflowSink, flatten


def model_flop_per_token(n_params: int, model_cfg: Any, seq_len: int) -> int:
    """Training FLOP per token: 6·N (forward + backward of the dense matmuls, Kaplan et al. 2020) plus
    12·n_layer·hidden·seq_len (attention scores and values, PaLM, Appendix B).

    ``N`` is every parameter counted once (the tied embedding once, the position embedding included: a
    slight overcount of the matmul parameters ``bench/train_bench.py`` uses). ``n_layer`` and ``hidden`` come
    from the transformers config (``num_hidden_layers``, ``hidden_size``: every causal-LM config maps them);
    a config without them gets 6·N alone.
    """
    layers = getattr(model_cfg, "num_hidden_layers", None)
    hidden = getattr(model_cfg, "hidden_size", None)
    attn = 12 * layers * hidden * seq_len if layers and hidden else 0
    return int(6 * n_params + attn)


def _peak_memory_mb() -> list:
    """``[peak RSS MB, peak device MB or 0]`` of this process (``ru_maxrss``: KB on Linux, bytes on macOS)."""
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    dev_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return [rss_mb, dev_mb]


class _Uploader:
    """Copies the files of a local folder to a storage folder on a background thread (s3:// storage).

    :meth:`request` returns at once; a request while an upload runs is served by one more pass after it.
    Only files whose size changed since their last upload are sent.
    """

    def __init__(self, local_dir: str, storage, dest: str) -> None:
        self.local_dir, self.storage, self.dest = local_dir, storage, dest
        self._sizes: Dict[str, int] = {}
        self._wake, self._stop = threading.Event(), threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="zeroplane-tb-upload", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._idle.clear()
        self._wake.set()

    def close(self, wait_s: float) -> bool:
        """One last pass, then stop; True when it finished within ``wait_s`` seconds."""
        self.request()
        self._stop.set()
        self._thread.join(timeout=wait_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                for name in sorted(os.listdir(self.local_dir)):
                    path = os.path.join(self.local_dir, name)
                    size = os.path.getsize(path)
                    if self._sizes.get(name) != size:
                        with open(path, "rb") as f:
                            self.storage.write_bytes(self.storage.path(self.dest, name), f.read())
                        self._sizes[name] = size
            except Exception as e:  # storage trouble: tried again at the next request
                self.failures += 1
                print(f"[zeroplane] tensorboard upload to {self.storage.uri_of(self.storage.path(self.dest))} "
                      f"failed ({type(e).__name__}: {e}); retried at the next checkpoint", file=sys.stderr, flush=True)
            if not self._wake.is_set():
                self._idle.set()
            if self._stop.is_set() and not self._wake.is_set():
                return


class Tracker:
    """The tracking hooks of one rank (see the module docstring). Build it with :meth:`open`."""

    def __init__(self, rank: int, world: int, enabled: bool, writer=None, sink: Optional[MlflowSink] = None,
                 uploader: Optional[_Uploader] = None, flop_per_token: int = 0, tokens_per_step: int = 0,
                 upload_every_s: float = 30.0) -> None:
        self.rank, self.world, self.enabled = rank, world, enabled
        self.writer, self.sink, self.uploader = writer, sink, uploader
        self.flop_per_token, self.tokens_per_step = flop_per_token, tokens_per_step
        self.upload_every_s = upload_every_s
        self._last_upload = time.monotonic()

    @classmethod
    def open(cls, spec, job_id: str, storage, rank: int, world: int, start_step: int, tokens_per_step: int,
             flop_per_token: int, ds_config: Dict[str, Any], work_dir: str) -> "Tracker":
        """The tracker of one rank for a run attempt starting after ``start_step`` (0: a fresh start).

        Args:
            spec: the JobSpec (``spec.tracking`` decides what is written).
            job_id: the zeroplane job id (run folder).
            storage: the job's :class:`zeroplane.storage.Storage`.
            rank, world: this rank and the number of ranks.
            start_step: the step of the checkpoint this attempt resumed from, 0 for none.
            tokens_per_step: tokens of one optimizer step over all ranks.
            flop_per_token: :func:`model_flop_per_token`.
            ds_config: the DeepSpeed config (an MLflow parameter set and artifact).
            work_dir: this rank's temp folder (the event file's home on s3:// storage).
        """
        tr = spec.tracking
        # the spec alone decides (its mlflow_uri already took $MLFLOW_TRACKING_URI where it was resolved): every
        # rank must agree, since on_log is a collective when enabled
        uri = tr.mlflow_uri
        enabled = tr.tensorboard or bool(uri)
        if rank != 0 or not enabled:
            return cls(rank, world, enabled)
        writer = uploader = sink = None
        if tr.tensorboard:
            dest = layout.tensorboard_dir(job_id)
            logdir = storage.path(dest) if storage.is_local else os.path.join(work_dir, "tensorboard")
            try:
                from tensorboardX import SummaryWriter

                os.makedirs(logdir, exist_ok=True)
                # purge_step: TensorBoard drops what an earlier attempt logged at or after it (steps past the
                # checkpoint this attempt resumed from; everything on a fresh start)
                writer = SummaryWriter(logdir, purge_step=start_step + 1 if start_step else 0, flush_secs=10,
                                       max_queue=100, filename_suffix=f".{job_id}.step{start_step}")
            except Exception as e:  # metrics are not worth the job: it trains on, with a line saying why
                print(f"[zeroplane] no TensorBoard event files ({type(e).__name__}: {e}); training goes on",
                      file=sys.stderr, flush=True)
            if writer is not None and start_step:
                writer.add_scalar(TAGS["resume"], start_step, start_step)
            if writer is not None and not storage.is_local:
                uploader = _Uploader(logdir, storage, dest)
        if uri:
            import importlib.util

            if importlib.util.find_spec("mlflow") is None:
                print(f"[zeroplane] tracking.mlflow_uri is {uri} but mlflow is not installed where rank 0 runs "
                      "(pip install 'zeroplane[tracking]'); not tracking to MLflow", file=sys.stderr, flush=True)
            else:
                spec_d = spec.model_dump(mode="json")
                params = {**flatten(spec_d, "spec."), **flatten(ds_config, "deepspeed_config.")}
                sink = MlflowSink(uri, tr.mlflow_experiment, job_id, params,
                                  {"zeroplane/spec.json": spec_d, "zeroplane/deepspeed_config.json": ds_config},
                                  start_step=start_step, timeout_s=tr.mlflow_timeout_s)
                if start_step:
                    sink.log_metrics({TAGS["resume"]: start_step}, start_step)
        return cls(rank, world, enabled, writer, sink, uploader, flop_per_token, tokens_per_step, tr.upload_every_s)

    def _scalars(self, step: int, values: Dict[str, Optional[float]]) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None}
        if self.writer is not None:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)
        if self.sink is not None:
            self.sink.log_metrics(values, step)

    def log_eval(self, step: int, val_loss: float) -> None:
        """Rank 0: the validation loss at ``step`` (the loop's step-0 evaluation)."""
        if self.rank == 0 and self.enabled:
            self._scalars(step, {TAGS["val_loss"]: val_loss, TAGS["tokens"]: step * self.tokens_per_step})

    def on_log(self, step: int, metrics: Dict[str, Any], engine) -> None:
        """Every rank, at each logging period: gathers peak memory (a collective), rank 0 writes.

        ``metrics`` is the loop's progress event (``loss``, ``lr``, ``tokens_per_s``, ``epoch``, ``val_loss``
        at evaluations); the gradient norm is DeepSpeed's ``get_global_grad_norm()`` (None when not computed).
        """
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        mine = torch.tensor(_peak_memory_mb(), dtype=torch.float64)
        peaks = [torch.zeros_like(mine) for _ in range(self.world)] if self.world > 1 else [mine]
        if self.world > 1:
            dist.all_gather(peaks, mine)
        if self.rank != 0:
            return
        norm = engine.get_global_grad_norm()
        tps = metrics.get("tokens_per_s")
        values = {TAGS["train_loss"]: metrics.get("loss"), TAGS["lr"]: metrics.get("lr"),
                  TAGS["grad_norm"]: float(norm) if norm is not None else None,
                  TAGS["tokens_per_s"]: tps,
                  TAGS["model_flop_per_s"]: tps * self.flop_per_token if tps is not None else None,
                  TAGS["tokens"]: step * self.tokens_per_step, TAGS["epoch"]: metrics.get("epoch"),
                  TAGS["val_loss"]: metrics.get("val_loss")}
        for r, p in enumerate(peaks):
            values[TAGS["peak_rss_mb"].format(rank=r)] = float(p[0])
            if float(p[1]) > 0:
                values[TAGS["peak_device_mb"].format(rank=r)] = float(p[1])
        self._scalars(step, values)
        if self.uploader is not None and time.monotonic() - self._last_upload >= self.upload_every_s:
            self._upload()

    def _upload(self) -> None:
        self.writer.flush()
        self.uploader.request()
        self._last_upload = time.monotonic()

    def on_checkpoint(self, step: int) -> None:
        """Rank 0, once the checkpoint at ``step`` is complete: the event, then files flushed (and uploaded)."""
        if self.rank != 0 or not self.enabled:
            return
        self._scalars(step, {TAGS["checkpoint"]: step})
        if self.writer is not None:
            if self.uploader is not None:
                self._upload()
            else:
                self.writer.flush()
        if self.sink is not None:
            self.sink.flush()

    def close(self, wait_s: float = 20.0) -> None:
        """Rank 0, at the end: event file closed (and uploaded), the MLflow run sent and marked FINISHED,
        waiting at most ``wait_s`` seconds for each."""
        if self.rank != 0:
            return
        if self.writer is not None:
            self.writer.close()
            if self.uploader is not None:
                self.uploader.close(wait_s)
        if self.sink is not None and not self.sink.close("FINISHED", wait_s):
            print(f"[zeroplane] mlflow: {self.sink.pending} metric values not sent to {self.sink.uri} by the end "
                  "of the job", file=sys.stderr, flush=True)
