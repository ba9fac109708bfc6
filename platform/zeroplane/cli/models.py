"""``zeroplane promote`` and ``zeroplane models list``."""

from __future__ import annotations

import click

from .context import pass_zp
from .options import AUTOSCALING, CANARY, CLUSTER_READ, JOB_STORAGE, NO_AUTH, OUTPUT, STORAGE, pop_overrides
from .output import console, emit_json, fmt, show, table


@click.command("promote")
@click.argument("ref")
@click.option("--name", required=True, help="Model name for the registry ([a-z0-9-]).")
@JOB_STORAGE
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--no-deploy", is_flag=True, help="Register only; do not deploy with Ray Serve.")
@AUTOSCALING
@CANARY
@NO_AUTH
@click.option("--dry-run", is_flag=True, help="Show the checkpoint that would be promoted and the Serve config; change nothing.")
@CLUSTER_READ
def promote(zp, ref, name, storage, dtype, no_deploy, canary, no_auth, dry_run, output, **autoscaling) -> None:
    """Consolidate the newest complete checkpoint of REF (a job id, JOB@STEP or a checkpoint path),
    verify it, register it as NAME:v<N> and deploy it with Ray Serve (in place, without dropping requests,
    when NAME is already served; as a canary taking PERCENT % of the traffic with --canary)."""
    from ..sdk import check_name

    check_name(name, "--name")
    if no_deploy and (canary is not None or no_auth):
        from .output import UsageError

        raise UsageError(f"--no-deploy with {'--canary' if canary is not None else '--no-auth'}: nothing is deployed; "
                         "drop one of them")
    overrides = pop_overrides(autoscaling, no_auth)
    if dry_run:
        return emit_json(zp.client.promote_plan(ref, name, storage=storage, deploy=not no_deploy, overrides=overrides))
    con = console(stderr=True)
    with con.status("promoting") as status:
        res = zp.client.promote(ref, name, storage=storage, deploy=not no_deploy, dtype=dtype, overrides=overrides,
                                progress=lambda m: (status.update(m), con.print(f"  {m}")), canary_percent=canary)
    if output == "json":
        return emit_json(res)
    rec, v = res.record, res.record["verification"]
    click.echo(f"registered {name}:{res.version} from {rec['source']['job_id']} step {rec['source']['step']} "
               f"(probe max |Δlogit| {v['max_abs_logit_diff']:.2e}) at {rec['uri']}")
    if res.url:
        click.echo(f"serving {name}:{res.version} at {res.url} (POST {res.url}/v1/completions)")


@click.group()
def models() -> None:
    """Registered model versions."""


@models.command("list")
@click.argument("name", required=False)
@STORAGE
@OUTPUT
@pass_zp
def models_list(zp, name, storage, output) -> None:
    """Models, or the versions of NAME."""
    show(output, zp.client.models(name, storage=storage), _print_versions)


def _print_versions(versions) -> None:
    rows = [v.record for v in versions]
    table(None, ["model", "version", "job", "step", "val_loss", "registered", "uri"],
          [[r["name"], r["version"], r["source"]["job_id"], r["source"]["step"],
            fmt((r.get("metrics") or {}).get("val_loss"), 4), r.get("registered_at", "")[:19], r["uri"]] for r in rows])
