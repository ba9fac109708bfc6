"""``zeroplane serve status|deploy|rollback|history|delete`` and ``zeroplane serve keys create|list|revoke``."""

from __future__ import annotations

import click

from .context import pass_zp
from .options import ADDRESS, AUTOSCALING, CANARY, CLUSTER_READ, GATE, NO_AUTH, OUTPUT, STORAGE, pop_overrides
from .output import emit_json, err, show, table


@click.group()
def serve() -> None:
    """Ray Serve applications of registered models, and their API keys."""


@serve.command("status")
@click.option("--no-requests", is_flag=True, help="Skip the request counts (read from Ray's metrics export).")
@STORAGE
@CLUSTER_READ
def serve_status(zp, no_requests, storage, output) -> None:
    """Applications: versions and traffic weights, replicas, requests and errors per version, and what the
    last change of each did."""
    rows = zp.client.serve_status(with_requests=not no_requests, storage=storage)
    if output == "json":
        return emit_json(rows)
    if not rows:
        click.echo("no Serve applications; deploy one with `zeroplane promote` or `zeroplane serve deploy`")
        return
    out = []
    for r in rows:
        for v in r.versions or [{}]:
            reps = v.get("replicas") or {}
            auto = v.get("autoscaling") or {}
            out.append([r.name, v.get("version"), f"{v.get('weight_percent', 0):g}%", r.status,
                        ", ".join(f"{n} {st.lower()}" for st, n in sorted(reps.items())) or "0",
                        f"{auto.get('min_replicas', '-')}..{auto.get('max_replicas', '-')}" if auto else "-",
                        "-" if v.get("requests") is None else int(v["requests"]),
                        "-" if v.get("errors") is None else int(v["errors"]), r.url])
    table(None, ["app", "version", "weight", "status", "replicas", "min..max", "requests", "errors", "url"], out)
    for r in rows:
        if r.last_change:
            click.echo(f"{r.name}: last change #{r.last_change['id']} {_change_line(r.last_change)}")
        if r.release:
            rel, last = r.release, (r.release.get("decisions") or [{}])[-1]
            click.echo(f"{r.name}: release {rel.get('id')} {rel.get('stable')} -> {rel.get('canary')}: {rel.get('status')}"
                       + (f"; last decision {last.get('decision')}: {last.get('reason')}" if last else ""))


def _change_line(e) -> str:
    """One history entry as ``v1 -> v2: failed after 3.1s (reason); v1 is serving again, as before``."""
    from ..sdk import describe_state

    line = f"{describe_state(e.get('from'))} -> {describe_state(e.get('to'))} ({e.get('command')}, {str(e.get('at'))[:19]}): "
    line += str(e.get("outcome"))
    if e.get("decision_s") is not None:
        line += f" after {e['decision_s']}s"
    if e.get("reason"):
        line += f": {e['reason']}"
    if e.get("restored"):
        line += f"; {e['restored']}"
    return line


@serve.command("history")
@click.argument("name")
@STORAGE
@OUTPUT
@pass_zp
def serve_history(zp, name, storage, output) -> None:
    """Every recorded rollout of NAME: from, to, command, outcome, and what was restored (oldest first)."""
    entries = zp.client.serve_history(name, storage=storage)
    if output == "json":
        return emit_json(entries)
    if not entries:
        click.echo(f"no recorded rollouts of {name}")
    for e in entries:
        click.echo(f"#{e.get('id')} {_change_line(e)}")


@serve.command("deploy")
@click.argument("ref")
@STORAGE
@CANARY
@GATE
@AUTOSCALING
@NO_AUTH
@ADDRESS
@pass_zp
def serve_deploy(zp, ref, storage, canary, gate, no_auth, **autoscaling) -> None:
    """Deploy a registered version NAME[:vN] (newest by default). A running application is updated in
    place without dropping requests; --canary PERCENT splits the traffic with the running version instead."""
    from ..sdk import parse_model_ref

    name, version = parse_model_ref(ref)
    overrides = pop_overrides(autoscaling, no_auth)
    url = zp.client.deploy(name, version, storage=storage, overrides=overrides,
                           progress=lambda m: err(f"  {m}"), canary_percent=canary, gate=gate)
    what = f"{ref} as a {canary:g}% canary" if canary is not None else ref
    click.echo(f"serving {what} at {url}/v1/completions")


@serve.command("rollback")
@click.argument("name")
@STORAGE
@CLUSTER_READ
def serve_rollback(zp, name, storage, output) -> None:
    """Return NAME to what it served before the last change that took effect (from its recorded history;
    in place, without dropping requests)."""
    res = zp.client.rollback(name, storage=storage, progress=lambda m: err(f"  {m}"))
    if output == "json":
        return emit_json(res)
    click.echo(f"rolled back {name}: {res.from_version} -> {res.to_version} at {res.url}")


@serve.command("delete")
@click.argument("name")
@ADDRESS
@pass_zp
def serve_delete(zp, name) -> None:
    """Remove the Serve application of model NAME."""
    zp.client.serve_delete(name)
    click.echo(f"deleted application {name}")


@serve.group("keys")
def keys() -> None:
    """API keys for the serving endpoints (stored hashed in the storage)."""


@keys.command("create")
@click.option("--name", "key_name", default=None, help="A label for the key.")
@STORAGE
@click.option("--save", is_flag=True, help="Also save the key to $ZEROPLANE_HOME/api_key (~/.zeroplane/api_key by default) "
                                                     "for `zeroplane complete`.")
@pass_zp
def keys_create(zp, key_name, storage, save) -> None:
    """Create a key; it is printed once and only its hash is stored."""
    new = zp.client.create_key(key_name, storage=storage, save=save)
    if new.saved_to:
        err(f"saved to {new.saved_to}")
    click.echo(new.key)
    err(f"key id {new.record['id']} created; it will not be shown again")


@keys.command("list")
@STORAGE
@OUTPUT
@pass_zp
def keys_list(zp, storage, output) -> None:
    """Key ids, labels and whether they are revoked (never the keys)."""
    show(output, zp.client.list_keys(storage=storage),
         lambda keys: table(None, ["id", "name", "created", "revoked"], [[k.id, k.name, k.created_at, k.revoked] for k in keys]))


@keys.command("revoke")
@click.argument("key_id")
@STORAGE
@pass_zp
def keys_revoke(zp, key_id, storage) -> None:
    """Revoke a key by id (takes effect within seconds)."""
    zp.client.revoke_key(key_id, storage=storage)
    click.echo(f"revoked {key_id}")
