"""``zeroplane checkpoints list``."""

from __future__ import annotations

import click

from .options import CLUSTER_READ, JOB_STORAGE
from .output import emit_json, fmt, table


@click.group()
def checkpoints() -> None:
    """Checkpoints of training jobs."""


@checkpoints.command("list")
@click.argument("job_id")
@JOB_STORAGE
@click.option("--all", "include_incomplete", is_flag=True, help="Also show incomplete checkpoints and why.")
@CLUSTER_READ
def checkpoints_list(zp, job_id, storage, include_incomplete, output) -> None:
    """Complete checkpoints of JOB_ID, oldest first."""
    cks = zp.client.checkpoints(job_id, storage=storage, include_incomplete=include_incomplete)
    if output == "json":
        return emit_json(cks)
    if not cks:
        click.echo(f"no complete checkpoints for {job_id}")
        return
    table(None, ["step", "complete", "val_loss", "train_loss", "MB", "uri"] + (["reason"] if include_incomplete else []),
          [[c.step, c.complete, fmt(c.metrics.get("val_loss"), 4), fmt(c.metrics.get("train_loss"), 4),
            f"{c.size_bytes / 1e6:.1f}", c.uri] + ([c.reason] if include_incomplete else []) for c in cks])
