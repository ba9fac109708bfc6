"""``zeroplane train submit|resume|status|logs|list|stop|estimate|plot|tensorboard``."""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import click

from .context import pass_zp
from .options import ADDRESS, CLUSTER_READ, JOB_STORAGE, Finite, OUTPUT, PASS_CREDENTIALS, SET, TIMEOUT, WAIT
from .output import console, emit_json, err, fmt, show, table


@click.group()
def train() -> None:
    """Submit and follow training jobs."""


@train.command("submit")
@click.argument("file", type=click.Path(dir_okay=False))
@SET
@click.option("--dry-run", is_flag=True, help="Run every preflight and print the resolved spec, DeepSpeed config and "
                                              "the exact Ray job request (secrets masked); submit nothing.")
@WAIT
@TIMEOUT
@PASS_CREDENTIALS
@CLUSTER_READ
def train_submit(zp, file, overrides, dry_run, wait, timeout_s, pass_credentials, output) -> None:
    """Submit the job spec FILE as a Ray Job running a Ray Train TorchTrainer with DeepSpeed."""
    from ..sdk import load_spec

    s = load_spec(file, list(overrides))
    if dry_run:
        return emit_json(zp.client.dryrun(s, pass_credentials=pass_credentials))
    sub = zp.client.submit(s, pass_credentials=pass_credentials)
    err(zp.client.dataset_status(s)["note"])  # prepared (reused) or prepared first by the job
    if output == "json" and not wait:
        return emit_json({"job_id": sub.job_id, "storage": sub.storage})
    err(f"submitted {sub.job_id} to {zp.client.cluster.dashboard_url}; checkpoints in {sub.storage}")
    _wait_or_print(zp.client, sub.job_id, sub.max_steps, wait, timeout_s, output)


@train.command("resume")
@click.argument("job_id")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field of the job's original spec, e.g. train.max_steps=600.")
@WAIT
@TIMEOUT
@PASS_CREDENTIALS
@CLUSTER_READ
def train_resume(zp, job_id, overrides, wait, timeout_s, pass_credentials, output) -> None:
    """Continue the ended job JOB_ID from its newest complete checkpoint.

    Submits a new Ray Job JOB_ID-r<k> with the job's original spec (train.stop_after_steps cleared,
    then --set applied) that runs under the same job id: same run folder, same checkpoints.
    """
    sub = zp.client.resume(job_id, list(overrides), pass_credentials=pass_credentials)
    if output == "json" and not wait:
        return emit_json(sub)
    start = f"step {sub.resume_step}" if sub.resume_step is not None else "step 0 (no complete checkpoint yet)"
    err(f"submitted {sub.job_id}: resumes job {sub.zeroplane_job_id} from {start}; checkpoints in {sub.storage}")
    _wait_or_print(zp.client, sub.job_id, sub.max_steps, wait, timeout_s, output)


def _wait_or_print(client, job_id: str, max_steps: int, wait: bool, timeout_s: Optional[float], output: str) -> None:
    """After a submission: follow the job to its end (exit 1 unless it SUCCEEDED; ``-o json`` prints its
    final status), or just print its id."""
    if not wait:
        click.echo(job_id)
        return
    status = _follow(client, job_id, max_steps, timeout_s, to_stderr=output == "json")
    if output == "json":
        emit_json(client.status(job_id))
    if status != "SUCCEEDED":
        from ..sdk import ZeroplaneError

        raise ZeroplaneError(f"job {job_id} {status}: {client.job_info(job_id).message or ''} "
                             f"(`zeroplane train logs {job_id}`)")


def _follow(client, job_id: str, max_steps: int, timeout_s: Optional[float] = None, to_stderr: bool = False) -> str:
    """Live progress bar (step, loss, tokens/s) until the job ends; returns its status.

    Raises:
        ZeroplaneError: ``timeout_s`` seconds passed first (the job is left running).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    state: Dict[str, Any] = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console(stderr=True),
                  transient=False) as bar:
        task = bar.add_task(job_id, total=max_steps, info="waiting for workers")

        def on_event(ev: Dict[str, Any]) -> None:
            kind = ev.get("event")
            if kind == "start":
                bar.update(task, completed=ev.get("start_step", 0),
                           info=f"{ev.get('parameters', 0) / 1e6:.2f}M params, ZeRO-{ev.get('zero_stage')}, "
                                f"{ev.get('world_size')} workers")
            elif kind == "eval" and ev.get("step") == 0:
                bar.console.print(f"step 0: val_loss {ev['val_loss']:.4f}")
            elif kind == "step":
                bar.update(task, completed=ev["step"], info=f"loss {ev['loss']:.4f}  {ev['tokens_per_s']:,.0f} tok/s")
                if "val_loss" in ev:
                    bar.console.print(f"step {ev['step']}: train_loss {ev['loss']:.4f} val_loss {ev['val_loss']:.4f}")
            elif kind == "checkpoint":
                bar.console.print(f"step {ev['step']}: checkpoint {ev['path']}")
            elif kind == "resumed":
                bar.console.print(f"resumed at step {ev['step']} from {ev['from']}")
            elif kind == "done":
                state["done"] = ev

        status = client.wait(job_id, on_event=on_event, timeout_s=timeout_s)
    done = state.get("done")
    if done:
        click.echo(f"{job_id} {status}: validation loss {fmt(done.get('val_loss_step0'), 4)} at step 0 -> "
                   f"{fmt(done.get('val_loss'), 4)} at step {done.get('step')}", err=to_stderr)
    else:
        click.echo(f"{job_id} {status}", err=to_stderr)
    return status


@train.command("estimate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field, e.g. deepspeed.zero_stage=3.")
@OUTPUT
def train_estimate(file, overrides, output) -> None:
    """Per-worker memory for model states of the job spec FILE: the ZeRO paper's formula next to
    DeepSpeed's own estimator (activations not included)."""
    from ..sdk import estimate, load_spec

    s = load_spec(file, list(overrides))
    est = estimate(s)
    if output == "json":
        return emit_json(est)
    p, d = est["paper"], est["deepspeed"]
    size = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"  # noqa: E731
    click.echo(f"{s.name}: {est['parameters'] / 1e6:.2f}M parameters, ZeRO-{est['zero_stage']}, {est['workers']} workers, "
               f"{est['precision']}")
    click.echo(f"  ZeRO paper (K={p['k']}): {size(p['device_bytes'])} per worker"
               + (f" + {size(p['host_bytes'])} host (offload)" if p["host_bytes"] else "")
               + f"  [params {size(p['params_bytes'])}, grads {size(p['grads_bytes'])}, "
                 f"optimizer {size(p['optimizer_bytes'])}]")
    click.echo(f"  DeepSpeed estimator: {size(d['device_gb'] * 1e9)} per worker, "
               f"{size(d['host_gb_all_workers'] * 1e9)} host per node" if d else "  DeepSpeed estimator: none for stage 0")
    click.echo(f"  ({est['note']})")


@train.command("status")
@click.argument("job_id")
@CLUSTER_READ
def train_status(zp, job_id, output) -> None:
    """Status, latest step and losses of a job."""
    st = zp.client.status(job_id)
    if output == "json":
        return emit_json(st)
    p = st.progress or {}
    click.echo(f"{job_id}: {st.status}"
               + (f"  step {p.get('step')}/{p.get('max_steps')} loss {fmt(p.get('loss'), 4)} "
                  f"{p.get('tokens_per_s', 0):,.0f} tok/s" if p else "")
               + (f"  val_loss {fmt(st.val_loss_step0, 4)} (step 0) -> {fmt(st.val_loss, 4)}"
                  if st.val_loss is not None else ""))
    if len(st.loss_curve) > 1:
        from ..sdk import sparkline

        losses = [loss for _, loss in st.loss_curve]
        click.echo(f"  loss {sparkline(losses)}  {losses[0]:.3f} -> {losses[-1]:.3f} "
                   f"(steps {st.loss_curve[0][0]}-{st.loss_curve[-1][0]})")
    if st.info.message and st.status in ("FAILED", "STOPPED"):
        click.echo(f"  {st.info.message.strip().splitlines()[-1]}")


@train.command("plot")
@click.argument("job_ids", nargs=-1, required=True)
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="PNG file to write, e.g. loss.png.")
@JOB_STORAGE
@ADDRESS
@pass_zp
def train_plot(zp, job_ids, out_path, storage) -> None:
    """Plot train and validation loss of JOB_IDS against step and tokens seen (jobs overlaid, resumes
    marked) from their TensorBoard event files."""
    from ..sdk import plot_jobs, read_scalars

    jobs = [read_scalars(d, j) for j, d in zp.client.event_dirs(list(job_ids), storage).items()]
    for j in jobs:
        tl, vl = j.get("train_loss"), j.get("val_loss")
        click.echo(f"{j.job_id}: {len(tl)} train-loss steps"
                   + (f" ({tl[0][1]:.3f} at step {tl[0][0]} -> {tl[-1][1]:.3f} at step {tl[-1][0]})" if tl else "")
                   + (f", validation {vl[0][1]:.3f} -> {vl[-1][1]:.3f}" if vl else "")
                   + (f", resumed at step {', '.join(map(str, j.resumes))}" if j.resumes else ""))
    click.echo(f"wrote {plot_jobs(jobs, out_path)}")


@train.command("tensorboard")
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--port", type=click.IntRange(1, 65535), default=6006, show_default=True, help="TensorBoard's port.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 shows the job's metrics to the whole network).")
@click.option("--resync-s", type=Finite(min=1), default=30.0, show_default=True,
              help="s3:// storage: seconds between two copies of the event files to the local folder served.")
@JOB_STORAGE
@ADDRESS
@pass_zp
def train_tensorboard(zp, job_ids, port, host, resync_s, storage) -> None:
    """Serve the TensorBoard event files of JOB_IDS (local storage directly, s3:// through a local copy
    refreshed every --resync-s) and print the URL; Ctrl-C stops it."""
    import subprocess

    from ..sdk import start_tensorboard

    import signal
    import sys

    dirs = zp.client.event_dirs(list(job_ids), storage)
    proc = start_tensorboard(dirs, host=host, port=port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped like Ctrl-C: TensorBoard ends with us
    click.echo(f"TensorBoard: http://{host}:{port}/  ({', '.join(f'{j}: {d}' for j, d in dirs.items())}); Ctrl-C stops it")
    try:
        while True:
            try:
                proc.wait(timeout=resync_s)
                break
            except subprocess.TimeoutExpired:
                zp.client.event_dirs(list(job_ids), storage)  # local storage: nothing to copy
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
    if proc.returncode not in (0, -15):
        from ..sdk import ZeroplaneError

        raise ZeroplaneError(f"tensorboard exited with {proc.returncode} (port {port} taken? try --port)")


@train.command("logs")
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@ADDRESS
@pass_zp
def train_logs(zp, job_id, follow) -> None:
    """The job's driver log (worker output included)."""
    if follow:
        for chunk in zp.client.follow_logs(job_id):
            click.echo(chunk, nl=False)
    else:
        click.echo(zp.client.logs(job_id), nl=False)


@train.command("list")
@CLUSTER_READ
def train_list(zp, output) -> None:
    """zeroplane jobs on the cluster, newest first."""
    show(output, zp.client.list_jobs(), _print_jobs)


def _print_jobs(jobs) -> None:
    when = lambda ms: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""  # noqa: E731
    table(None, ["job", "resumes job", "status", "started", "ended"],
          [[j.job_id, j.zeroplane_job_id if j.zeroplane_job_id != j.job_id else "", j.status,
            when(j.start_time), when(j.end_time)] for j in jobs])


@train.command("stop")
@click.argument("job_id")
@click.option("--wait-s", type=Finite(min=0), default=120.0, show_default=True,
              help="How long to wait for the driver and every worker of the job to be gone.")
@ADDRESS
@pass_zp
def train_stop(zp, job_id, wait_s) -> None:
    """Stop a job; answers once its driver and all its Ray Train actors are gone."""
    click.echo(f"{job_id}: {zp.client.stop(job_id, wait_s=wait_s)}")
