"""``zeroplane promote`` and ``zeroplane models list|show|gc``."""

from __future__ import annotations

import click

from .context import pass_zp
from .options import (ADDRESS, AUTOSCALING, CANARY, CLUSTER_READ, GATE, JOB_STORAGE, NO_AUTH, OUTPUT, STORAGE,
                      pop_overrides)
from .output import console, emit_json, fmt, show, table


@click.command("promote")
@click.argument("ref")
@click.option("--name", required=True, help="Model name for the registry ([a-z0-9-]).")
@JOB_STORAGE
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--no-deploy", is_flag=True, help="Register only; do not deploy with Ray Serve.")
@AUTOSCALING
@CANARY
@GATE
@NO_AUTH
@click.option("--dry-run", is_flag=True, help="Show the checkpoint that would be promoted and the Serve config; change nothing.")
@CLUSTER_READ
def promote(zp, ref, name, storage, dtype, no_deploy, canary, gate, no_auth, dry_run, output, **autoscaling) -> None:
    """Consolidate the newest complete checkpoint of REF (a job id, JOB@STEP or a checkpoint path),
    verify it, register it as NAME:v<N> and deploy it with Ray Serve (in place, without dropping requests,
    when NAME is already served; as a canary taking PERCENT % of the traffic with --canary)."""
    from ..sdk import check_name

    check_name(name, "--name")
    if no_deploy and (canary is not None or no_auth or gate):
        from .output import UsageError

        flag = "--canary" if canary is not None else "--gate" if gate else "--no-auth"
        raise UsageError(f"--no-deploy with {flag}: nothing is deployed; drop one of them")
    if gate and canary is None:
        from .output import UsageError

        raise UsageError("--gate needs --canary PERCENT: a gated release starts from a canary, e.g. --canary 10 --gate")
    overrides = pop_overrides(autoscaling, no_auth)
    if dry_run:
        return emit_json(zp.client.promote_plan(ref, name, storage=storage, deploy=not no_deploy, overrides=overrides))
    con = console(stderr=True)
    with con.status("promoting") as status:
        res = zp.client.promote(ref, name, storage=storage, deploy=not no_deploy, dtype=dtype, overrides=overrides,
                                progress=lambda m: (status.update(m), con.print(f"  {m}")), canary_percent=canary,
                                gate=gate)
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


@models.command("show")
@click.argument("ref")
@STORAGE
@OUTPUT
@pass_zp
def models_show(zp, ref, storage, output) -> None:
    """Lineage of NAME[:vN]: job, spec, checkpoint step, data, the version, and every deployment of it."""
    info = zp.client.model_lineage(ref, storage=storage)
    if output == "json":
        return emit_json(info)
    ck = info["checkpoint"]
    spec = info.get("spec") or {}
    click.echo(f"{info['model']}:{info['version']}  registered {str(info.get('registered_at'))[:19]}  {info['uri']}")
    click.echo(f"  job         {info.get('job_id')}  ({(spec.get('name') or '?')}, zero_stage "
               f"{(spec.get('deepspeed') or {}).get('zero_stage', '?')}, precision {(spec.get('train') or {}).get('precision', '?')})")
    click.echo(f"  checkpoint  step {ck.get('step')}  {ck.get('uri')}{'' if ck.get('exists') else '  (deleted)'}")
    data = info.get("data") or {}
    click.echo(f"  data        {data.get('id') or data.get('source') or '?'}")
    metrics = info.get("metrics") or {}
    click.echo(f"  metrics     val_loss {fmt(metrics.get('val_loss'), 4)}  train_loss {fmt(metrics.get('train_loss'), 4)}")
    if not info["deployments"]:
        click.echo("  deployments none")
    for e in info["deployments"]:
        to = e.get("to") or {}
        role = "stable" if to.get("version") == info["version"] else f"canary {to['canary']['weight_percent']:g}%"
        click.echo(f"  deployed    {str(e.get('at'))[:19]}  {role}  `{e.get('command')}`  -> {e.get('outcome')}"
                   + (f" ({e['reason']})" if e.get("reason") else ""))


@models.command("gc")
@click.argument("name", required=False)
@click.option("--keep-latest", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also keep the newest N versions of each model.")
@click.option("--yes", "delete", is_flag=True, help="Delete what is listed (without it nothing is deleted).")
@STORAGE
@OUTPUT
@ADDRESS
@pass_zp
def models_gc(zp, name, keep_latest, delete, storage, output) -> None:
    """List the versions of NAME (or every model) that no endpoint needs, and with --yes delete them.
    A version Serve runs (stable or canary) or that `serve rollback` would return to always stays."""
    res = zp.client.models_gc(name, keep_latest=keep_latest, delete=delete, storage=storage)
    if output == "json":
        return emit_json(res)
    rows = [[r["name"], r["version"], "keep: " + r["why"]] for r in res["keep"]]
    rows += [[r["name"], r["version"], "deleted" if delete else "collectable"] for r in res["collect"]]
    table(None, ["model", "version", "decision"], rows)
    if not delete and res["collect"]:
        click.echo(f"{len(res['collect'])} version(s) collectable; run again with --yes to delete them")
