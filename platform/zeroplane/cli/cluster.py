"""``zeroplane cluster up|down|status``."""

from __future__ import annotations

import click

from .options import CLUSTER_READ, Finite, OUTPUT
from .output import console, emit_json, err, show, table


@click.group()
def cluster() -> None:
    """Start, inspect and stop the Ray cluster zeroplane talks to."""


@cluster.command("up")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--num-cpus", type=int, default=None, help="CPUs the local head offers (default: max(cores, 4)).")
@click.option("--dashboard-port", type=int, default=None, help="Dashboard port (default 8265 if free).")
@click.option("--serve-port", type=int, default=None, help="Ray Serve HTTP port (default 8000 if free).")
@click.option("--host", "bind_host", type=click.Choice(["127.0.0.1", "0.0.0.0"]), default=None,
              help="Where the local head listens: loopback (default, or $ZEROPLANE_BIND_HOST) or every interface "
                   "(0.0.0.0: reachable by other machines, e.g. to add nodes).")
@OUTPUT
def cluster_up(config, num_cpus, dashboard_port, serve_port, bind_host, output) -> None:
    """Start the embedded local Ray head (or return the one already running); with CONFIG, create or
    update that cluster with the Ray cluster launcher (`ray up -y CONFIG`, e.g. cluster/aws.yaml)."""
    from .. import sdk

    if config:
        return sdk.cluster_launcher("up", config)
    with console(stderr=True).status("starting a local Ray head"):
        info = sdk.cluster_up(num_cpus=num_cpus, dashboard_port=dashboard_port, serve_http_port=serve_port,
                              bind_host=bind_host)
    if info.auth == "disabled":
        err("WARNING: Ray token authentication is off (RAY_AUTH_MODE): anyone who can reach its ports can run "
            "code on this cluster")
    if output == "json":
        return emit_json(info)
    where = {"127.0.0.1": "loopback only", "0.0.0.0": "every interface: reachable from the network"}
    click.echo(f"Ray head up: dashboard {info.dashboard_url}, GCS {info.address}, Serve port {info.serve_http_port}; "
               f"listening on {where.get(info.bind_host or '', info.bind_host or 'unknown')}, "
               f"auth {info.auth or 'unknown'}")


@cluster.command("down")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--grace-s", type=Finite(min=0), default=10.0, show_default=True, help="Seconds between SIGTERM and SIGKILL.")
def cluster_down(config, grace_s) -> None:
    """Stop the local Ray head zeroplane started (and only that); with CONFIG, tear that cluster down
    with the Ray cluster launcher (`ray down -y CONFIG`)."""
    from .. import sdk

    if config:
        return sdk.cluster_launcher("down", config)
    pids = sdk.cluster_down(grace_s=grace_s)
    click.echo(f"stopped {len(pids)} processes" if pids else "no local zeroplane cluster was running")


@cluster.command("status")
@CLUSTER_READ
def cluster_status(zp, output) -> None:
    """Nodes, resources and jobs of the cluster."""
    show(output, zp.client.cluster_status(), _print_status)


def _print_status(st) -> None:
    click.echo(f"cluster {st.dashboard_url} alive={st.alive} resources={st.resources} jobs={st.jobs}")
    table("nodes", ["node", "ip", "alive", "CPUs", "GPUs"],
          [[(n.get("node_id") or "")[:12], n.get("ip"), n.get("alive"), n.get("cpus"), n.get("gpus")] for n in st.nodes])
