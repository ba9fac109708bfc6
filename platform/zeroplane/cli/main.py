"""``zeroplane``: nouns then verbs. Each command parses, calls :mod:`zeroplane.sdk`, renders.

Exit codes: 0 ok, 1 runtime failure, 2 usage error or invalid spec. Read commands take ``-o json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import click

from .. import __version__
from ..errors import SpecError, ZeroplaneError

OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
                      help="Output format.")
ADDRESS = click.option("--address", envvar="RAY_ADDRESS", default=None,
                       help="Ray dashboard URL (http://host:8265) or GCS address; default: RAY_ADDRESS, then the "
                            "local head from `zeroplane cluster up`.")


def _console(stderr: bool = False):
    """A rich console; ``stderr=True`` for progress so that stdout stays parseable (``-o json``)."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True, stderr=stderr)
    if not console.is_terminal:  # logs and pipes: do not fold paths at 80 columns
        console.width = max(console.width, 200)
    return console


def _err(msg: str) -> None:
    click.echo(msg, err=True)


def _json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _table(title: Optional[str], columns: List[str], rows: List[List[Any]]) -> None:
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    _console().print(t)


def _client(address: Optional[str]):
    from ..sdk import Client

    return Client(address)


def _fmt(x: Optional[float], nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


class _CliError(click.ClickException):
    """A :class:`ZeroplaneError` at the CLI edge: ``Error: <message>`` on stderr, its ``exit_code``."""

    def __init__(self, error: ZeroplaneError) -> None:
        super().__init__(error.message)
        self.exit_code = error.exit_code


class _Main(click.Group):
    """Turns unexpected exceptions into one line (and keeps tracebacks for ZEROPLANE_DEBUG=1)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except ZeroplaneError as e:
            raise _CliError(e) from None
        except Exception as e:  # a bug or an environment problem: say it in one line, exit 1
            if os.environ.get("ZEROPLANE_DEBUG"):
                raise
            raise ZeroplaneError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                 "(set ZEROPLANE_DEBUG=1 for the traceback)") from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zeroplane")
@click.option("--profile", envvar="ZEROPLANE_PROFILE", default=None,
              help="Named cluster profile of ~/.zeroplane/config.yaml (used after --address and RAY_ADDRESS).")
def main(profile) -> None:
    """zeroplane: train Hugging Face causal LMs with DeepSpeed ZeRO on Ray Train, promote checkpoints
    to model versions, and serve them with Ray Serve."""
    if profile:
        os.environ["ZEROPLANE_PROFILE"] = profile  # read by cluster.resolve_cluster


# ---------------------------------------------------------------- cluster
@main.group()
def cluster() -> None:
    """Start, inspect and stop the Ray cluster zeroplane talks to."""


@cluster.command("up")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--num-cpus", type=int, default=None, help="CPUs the local head offers (default: max(cores, 4)).")
@click.option("--dashboard-port", type=int, default=None, help="Dashboard port (default 8265 if free).")
@click.option("--serve-port", type=int, default=None, help="Ray Serve HTTP port (default 8000 if free).")
@OUTPUT
def cluster_up(config, num_cpus, dashboard_port, serve_port, output) -> None:
    """Start the embedded local Ray head (or return the one already running); with CONFIG, create or
    update that cluster with the Ray cluster launcher (`ray up -y CONFIG`, e.g. cluster/aws.yaml)."""
    from ..cluster import run_launcher, start_local_head

    if config:
        return run_launcher("up", config)
    with _console(stderr=True).status("starting a local Ray head"):
        info = start_local_head(num_cpus=num_cpus, dashboard_port=dashboard_port, serve_http_port=serve_port)
    if output == "json":
        return _json(info.to_dict())
    click.echo(f"Ray head up: dashboard {info.dashboard_url}, GCS {info.address}, Serve port {info.serve_http_port}")


@cluster.command("down")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--grace-s", type=float, default=10.0, show_default=True, help="Seconds between SIGTERM and SIGKILL.")
def cluster_down(config, grace_s) -> None:
    """Stop the local Ray head zeroplane started (and only that); with CONFIG, tear that cluster down
    with the Ray cluster launcher (`ray down -y CONFIG`)."""
    from ..cluster import run_launcher, stop_local_head

    if config:
        return run_launcher("down", config)
    pids = stop_local_head(grace_s=grace_s)
    click.echo(f"stopped {len(pids)} processes" if pids else "no local zeroplane cluster was running")


@cluster.command("status")
@ADDRESS
@OUTPUT
def cluster_status_cmd(address, output) -> None:
    """Nodes, resources and jobs of the cluster."""
    from ..cluster import apply_auth_env, cluster_status, resolve_cluster

    apply_auth_env()
    st = cluster_status(resolve_cluster(address))
    if output == "json":
        return _json(st)
    click.echo(f"cluster {st.get('dashboard_url')} alive={st.get('alive')} resources={st.get('resources')} jobs={st.get('jobs')}")
    _table("nodes", ["node", "ip", "alive", "CPUs", "GPUs"],
           [[n.get("node_id", "")[:12], n.get("ip"), n.get("alive"), n.get("cpus"), n.get("gpus")] for n in st.get("nodes", [])])


# ---------------------------------------------------------------- spec
@main.group()
def spec() -> None:
    """Validate job specs and print their schema."""


@spec.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field, e.g. train.max_steps=10.")
def spec_validate(file, overrides) -> None:
    """Check a job spec; exit 2 with the field, value and fix when it is invalid."""
    from ..spec import load_spec

    s = load_spec(file, list(overrides))
    click.echo(f"{file}: valid (job {s.name}, {s.model.architecture}/{s.model.preset or 'custom'}, "
               f"ZeRO-{s.deepspeed.zero_stage}, {s.scaling.num_workers} workers, {s.train.max_steps} steps)")


@spec.command("schema")
def spec_schema() -> None:
    """Print the JSON schema of job specs (every field with its description)."""
    from ..spec import json_schema

    _json(json_schema())


# ---------------------------------------------------------------- train
@main.group()
def train() -> None:
    """Submit and follow training jobs."""


@train.command("submit")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field, e.g. train.max_steps=10.")
@click.option("--dry-run", is_flag=True, help="Print the resolved spec, DeepSpeed config and Ray job request; submit nothing.")
@click.option("--wait", is_flag=True, help="Follow progress until the job ends; exit 0 on success, 1 otherwise.")
@click.option("--timeout-s", type=click.FloatRange(min=1), default=None,
              help="With --wait: give up (exit 1, the job keeps running) after this many seconds.")
@ADDRESS
@OUTPUT
def train_submit(file, overrides, dry_run, wait, timeout_s, address, output) -> None:
    """Submit the job spec FILE as a Ray Job running a Ray Train TorchTrainer with DeepSpeed."""
    from ..sdk import Client
    from ..spec import load_spec

    s = load_spec(file, list(overrides))
    if dry_run:
        return _json(Client.plan(s))
    zp = _client(address)
    res = zp.submit(s)
    job_id = res["job_id"]
    if output == "json" and not wait:
        return _json(res)
    _err(f"submitted {job_id} to {zp.cluster.dashboard_url}; checkpoints in {res['storage']}")
    _wait_or_print(zp, job_id, s.train.max_steps, wait, timeout_s, output)


def _wait_or_print(zp, job_id: str, max_steps: int, wait: bool, timeout_s: Optional[float], output: str) -> None:
    """After a submission: follow the job to its end (exit 1 unless it SUCCEEDED; ``-o json`` prints its
    final status), or just print its id."""
    if not wait:
        click.echo(job_id)
        return
    status = _follow(zp, job_id, max_steps, timeout_s, err=output == "json")
    if output == "json":
        _json(zp.status(job_id))
    if status != "SUCCEEDED":
        raise ZeroplaneError(f"job {job_id} {status}: {zp.jobs.info(job_id).get('message') or ''} "
                             f"(`zeroplane train logs {job_id}`)")


def _follow(zp, job_id: str, max_steps: int, timeout_s: Optional[float] = None, err: bool = False) -> str:
    """Live progress bar (step, loss, tokens/s) until the job ends; returns its status.

    Raises:
        ZeroplaneError: ``timeout_s`` seconds passed first (the job is left running).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    state: Dict[str, Any] = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=_console(stderr=True), transient=False) as bar:
        task = bar.add_task(job_id, total=max_steps, info="waiting for workers")

        def on_event(ev: Dict[str, Any]) -> None:
            kind = ev.get("event")
            if kind == "start":
                bar.update(task, completed=ev.get("start_step", 0),
                           info=f"{ev.get('parameters', 0) / 1e6:.2f}M params, ZeRO-{ev.get('zero_stage')}, "
                                f"{ev.get('world_size')} workers")
            elif kind == "eval" and ev.get("step") == 0:
                state["val0"] = ev["val_loss"]
                bar.console.print(f"step 0: val_loss {ev['val_loss']:.4f}")
            elif kind == "step":
                state["last"] = ev
                bar.update(task, completed=ev["step"],
                           info=f"loss {ev['loss']:.4f}  {ev['tokens_per_s']:,.0f} tok/s")
                if "val_loss" in ev:
                    bar.console.print(f"step {ev['step']}: train_loss {ev['loss']:.4f} val_loss {ev['val_loss']:.4f}")
            elif kind == "checkpoint":
                bar.console.print(f"step {ev['step']}: checkpoint {ev['path']}")
            elif kind == "resumed":
                bar.console.print(f"resumed at step {ev['step']} from {ev['from']}")
            elif kind == "done":
                state["done"] = ev

        status = zp.wait(job_id, on_event=on_event, timeout_s=timeout_s)
    done = state.get("done")
    if done:
        click.echo(f"{job_id} {status}: validation loss {_fmt(done.get('val_loss_step0'), 4)} at step 0 -> "
                   f"{_fmt(done.get('val_loss'), 4)} at step {done.get('step')}", err=err)
    else:
        click.echo(f"{job_id} {status}", err=err)
    return status


@train.command("estimate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field, e.g. deepspeed.zero_stage=3.")
@OUTPUT
def train_estimate(file, overrides, output) -> None:
    """Per-worker memory for model states of the job spec FILE: the ZeRO paper's formula next to
    DeepSpeed's own estimator (activations not included)."""
    from ..estimate import estimate
    from ..spec import load_spec

    s = load_spec(file, list(overrides))
    est = estimate(s)
    if output == "json":
        return _json(est)
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


@train.command("resume")
@click.argument("job_id")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field of the job's original spec, e.g. train.max_steps=600.")
@click.option("--wait", is_flag=True, help="Follow progress until the job ends; exit 0 on success, 1 otherwise.")
@click.option("--timeout-s", type=click.FloatRange(min=1), default=None,
              help="With --wait: give up (exit 1, the job keeps running) after this many seconds.")
@ADDRESS
@OUTPUT
def train_resume(job_id, overrides, wait, timeout_s, address, output) -> None:
    """Continue the ended job JOB_ID from its newest complete checkpoint.

    Submits a new Ray Job JOB_ID-r<k> with the job's original spec (train.stop_after_steps cleared,
    then --set applied) that runs under the same job id: same run folder, same checkpoints.
    """
    zp = _client(address)
    res = zp.resume(job_id, list(overrides))
    sub = res["job_id"]
    if output == "json" and not wait:
        return _json(res)
    start = f"step {res['resume_step']}" if res["resume_step"] is not None else "step 0 (no complete checkpoint yet)"
    _err(f"submitted {sub}: resumes job {res['zeroplane_job_id']} from {start}; checkpoints in {res['storage']}")
    _wait_or_print(zp, sub, zp.spec_of(sub).train.max_steps if wait else 0, wait, timeout_s, output)


@train.command("status")
@click.argument("job_id")
@ADDRESS
@OUTPUT
def train_status(job_id, address, output) -> None:
    """Status, latest step and losses of a job."""
    info = _client(address).status(job_id)
    if output == "json":
        return _json(info)
    p = info.get("progress") or {}
    click.echo(f"{job_id}: {info['status']}"
               + (f"  step {p.get('step')}/{p.get('max_steps')} loss {_fmt(p.get('loss'), 4)} "
                  f"{p.get('tokens_per_s', 0):,.0f} tok/s" if p else "")
               + (f"  val_loss {_fmt(info.get('val_loss_step0'), 4)} (step 0) -> {_fmt(info.get('val_loss'), 4)}"
                  if info.get("val_loss") is not None else ""))
    if info.get("message") and info["status"] in ("FAILED", "STOPPED"):
        click.echo(f"  {info['message'].strip().splitlines()[-1]}")


@train.command("logs")
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@ADDRESS
def train_logs(job_id, follow, address) -> None:
    """The job's driver log (worker output included)."""
    zp = _client(address)
    if follow:
        for chunk in zp.follow_logs(job_id):
            click.echo(chunk, nl=False)
    else:
        click.echo(zp.jobs.logs(job_id), nl=False)


@train.command("list")
@ADDRESS
@OUTPUT
def train_list(address, output) -> None:
    """zeroplane jobs on the cluster, newest first."""
    jobs = _client(address).jobs.list()
    if output == "json":
        return _json(jobs)
    fmt = lambda ms: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""  # noqa: E731
    _table(None, ["job", "resumes job", "status", "started", "ended"],
           [[j["job_id"], j["zeroplane_job_id"] if j["zeroplane_job_id"] != j["job_id"] else "", j["status"],
             fmt(j["start_time"]), fmt(j["end_time"])] for j in jobs])


@train.command("stop")
@click.argument("job_id")
@click.option("--wait-s", type=float, default=120.0, show_default=True,
              help="How long to wait for the driver and every worker of the job to be gone.")
@ADDRESS
def train_stop(job_id, wait_s, address) -> None:
    """Stop a job; answers once its driver and all its Ray Train actors are gone."""
    st = _client(address).jobs.stop(job_id, wait_s=wait_s)
    click.echo(f"{job_id}: {st}")


# ---------------------------------------------------------------- checkpoints
@main.group()
def checkpoints() -> None:
    """Checkpoints of training jobs."""


@checkpoints.command("list")
@click.argument("job_id")
@click.option("--storage", default=None, help="Storage root (default: the job's checkpoint.storage_path).")
@click.option("--all", "include_incomplete", is_flag=True, help="Also show incomplete checkpoints and why.")
@ADDRESS
@OUTPUT
def checkpoints_list(job_id, storage, include_incomplete, address, output) -> None:
    """Complete checkpoints of JOB_ID, oldest first."""
    if storage:
        from ..checkpoints import list_checkpoints
        from ..storage import Storage

        cks = list_checkpoints(Storage.from_uri(storage), job_id, include_incomplete)
    else:
        cks = _client(address).checkpoints(job_id, include_incomplete=include_incomplete)
    if output == "json":
        return _json([c.to_dict() for c in cks])
    if not cks:
        click.echo(f"no complete checkpoints for {job_id}")
        return
    _table(None, ["step", "complete", "val_loss", "train_loss", "MB", "uri"] + (["reason"] if include_incomplete else []),
           [[c.step, c.complete, _fmt(c.metrics.get("val_loss"), 4), _fmt(c.metrics.get("train_loss"), 4),
             f"{c.size_bytes / 1e6:.1f}", c.uri] + ([c.reason] if include_incomplete else []) for c in cks])


# ---------------------------------------------------------------- promote / models
CANARY = click.option(
    "--canary", type=click.FloatRange(0, 100, min_open=True, max_open=True), default=None, metavar="PERCENT",
    help="Deploy as a canary next to the running version, taking PERCENT % of the requests "
         "(end it with `serve deploy NAME:vN` or `serve rollback NAME`).")


def _autoscaling_overrides(min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s,
                           downscale_delay_s) -> Dict[str, Any]:
    """``{"autoscaling": {...}}`` from the flags that were given (SpecError for a negative value)."""
    given = {"min_replicas": min_replicas, "max_replicas": max_replicas,
             "target_ongoing_requests": target_ongoing_requests, "upscale_delay_s": upscale_delay_s,
             "downscale_delay_s": downscale_delay_s}
    for k, v in given.items():
        if v is not None and v < 0:
            raise SpecError(f"--{k.replace('_', '-')} {v}: must be >= 0")
    if min_replicas is not None and max_replicas is not None and min_replicas > max_replicas:
        raise SpecError(f"--min-replicas {min_replicas} is above --max-replicas {max_replicas}; raise --max-replicas")
    if max_replicas is not None and max_replicas < 1:
        raise SpecError(f"--max-replicas {max_replicas}: must be >= 1")
    return {"autoscaling": {k: v for k, v in given.items() if v is not None}}


@main.command("promote")
@click.argument("ref")
@click.option("--name", required=True, help="Model name for the registry ([a-z0-9-]).")
@click.option("--storage", default=None, help="Storage root (default: the job's checkpoint.storage_path).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--no-deploy", is_flag=True, help="Register only; do not deploy with Ray Serve.")
@click.option("--min-replicas", type=int, default=None, help="Override serve.autoscaling.min_replicas.")
@click.option("--max-replicas", type=int, default=None, help="Override serve.autoscaling.max_replicas.")
@click.option("--target-ongoing-requests", type=float, default=None, help="Override serve.autoscaling.target_ongoing_requests.")
@click.option("--upscale-delay-s", type=float, default=None, help="Override serve.autoscaling.upscale_delay_s (seconds).")
@click.option("--downscale-delay-s", type=float, default=None, help="Override serve.autoscaling.downscale_delay_s (seconds).")
@CANARY
@click.option("--no-auth", is_flag=True, help="Serve WITHOUT API keys (local experiments only).")
@click.option("--dry-run", is_flag=True, help="Show the checkpoint that would be promoted and the Serve config; change nothing.")
@ADDRESS
@OUTPUT
def promote_cmd(ref, name, storage, dtype, no_deploy, min_replicas, max_replicas, target_ongoing_requests,
                upscale_delay_s, downscale_delay_s, canary, no_auth, dry_run, address, output) -> None:
    """Consolidate the newest complete checkpoint of REF (a job id, JOB@STEP or a checkpoint path),
    verify it, register it as NAME:v<N> and deploy it with Ray Serve (in place, without dropping requests,
    when NAME is already served; as a canary taking PERCENT % of the traffic with --canary)."""
    from ..registry import check_model_name

    check_model_name(name)
    overrides = _autoscaling_overrides(min_replicas, max_replicas, target_ongoing_requests,
                                       upscale_delay_s, downscale_delay_s)
    if no_auth:
        overrides["auth"] = False
        _err("WARNING: --no-auth: the endpoint will answer anyone who can reach it")
    if dry_run:
        from ..promote import resolve_checkpoint
        from ..registry import Registry
        from ..serving import app_config
        from ..storage import Storage

        from ..sdk import storage_of_checkpoint_path

        if storage:
            st = Storage.from_uri(storage)
        elif "/" in ref:
            st = storage_of_checkpoint_path(ref)
        else:
            st = _client(address).storage_of(ref.partition("@")[0])
        ck = resolve_checkpoint(st, ref)
        version = Registry(st).next_version(name)
        spec_serve = st.read_json(f"{ck.path}/meta.json").get("spec", {}).get("serve", {})
        return _json({"checkpoint": ck.to_dict(), "would_register": f"{name}:{version}",
                      "serve_application": None if no_deploy else app_config(
                          name, {"version": version, "uri": st.uri_of(Registry(st).version_dir(name, version))},
                          st.uri, spec_serve, overrides)})
    zp = _client(address)
    console = _console(stderr=True)
    with console.status("promoting") as status:
        rec = zp.promote(ref, name, storage=storage, deploy=not no_deploy, dtype=dtype, overrides=overrides,
                         progress=lambda m: (status.update(m), console.print(f"  {m}")), canary_percent=canary)
    if output == "json":
        return _json(rec)
    v = rec["verification"]
    click.echo(f"registered {name}:{rec['version']} from {rec['source']['job_id']} step {rec['source']['step']} "
               f"(probe max |Δlogit| {v['max_abs_logit_diff']:.2e}) at {rec['uri']}")
    if rec.get("url"):
        click.echo(f"serving {name}:{rec['version']} at {rec['url']} (POST {rec['url']}/v1/completions)")


@main.group()
def models() -> None:
    """Registered model versions."""


@models.command("list")
@click.argument("name", required=False)
@click.option("--storage", default=None, help="Storage root (default: $ZEROPLANE_STORAGE or ~/.zeroplane/storage).")
@OUTPUT
def models_list(name, storage, output) -> None:
    """Models, or the versions of NAME."""
    from ..registry import Registry
    from ..sdk import default_storage
    from ..storage import Storage

    reg = Registry(Storage.from_uri(storage or default_storage()))
    rows = []
    for m in ([name] if name else reg.models()):
        for v in reg.versions(m):
            rows.append(v)
    if output == "json":
        return _json(rows)
    _table(None, ["model", "version", "job", "step", "val_loss", "registered", "uri"],
           [[r["name"], r["version"], r["source"]["job_id"], r["source"]["step"], _fmt((r.get("metrics") or {}).get("val_loss"), 4),
             r.get("registered_at", "")[:19], r["uri"]] for r in rows])


# ---------------------------------------------------------------- serve
@main.group()
def serve() -> None:
    """Ray Serve applications of registered models, and their API keys."""


@serve.command("status")
@click.option("--no-requests", is_flag=True, help="Skip the request counts (read from Ray's metrics export).")
@ADDRESS
@OUTPUT
def serve_status(no_requests, address, output) -> None:
    """Applications: versions and traffic weights, replicas, requests and errors per version."""
    rows = _client(address).serve_status(with_requests=not no_requests)
    if output == "json":
        return _json(rows)
    if not rows:
        click.echo("no Serve applications; deploy one with `zeroplane promote` or `zeroplane serve deploy`")
        return
    table = []
    for r in rows:
        for v in r["versions"] or [{}]:
            reps = v.get("replicas") or {}
            auto = v.get("autoscaling") or {}
            table.append([r["name"], v.get("version"), f"{v.get('weight_percent', 0):g}%", r["status"],
                          ", ".join(f"{n} {st.lower()}" for st, n in sorted(reps.items())) or "0",
                          f"{auto.get('min_replicas', '-')}..{auto.get('max_replicas', '-')}" if auto else "-",
                          "-" if v.get("requests") is None else int(v["requests"]),
                          "-" if v.get("errors") is None else int(v["errors"]), r["url"]])
    _table(None, ["app", "version", "weight", "status", "replicas", "min..max", "requests", "errors", "url"], table)


@serve.command("deploy")
@click.argument("ref")
@click.option("--storage", default=None, help="Storage root (default: $ZEROPLANE_STORAGE or ~/.zeroplane/storage).")
@CANARY
@click.option("--min-replicas", type=int, default=None, help="Override serve.autoscaling.min_replicas.")
@click.option("--max-replicas", type=int, default=None, help="Override serve.autoscaling.max_replicas.")
@click.option("--target-ongoing-requests", type=float, default=None, help="Override serve.autoscaling.target_ongoing_requests.")
@click.option("--upscale-delay-s", type=float, default=None, help="Override serve.autoscaling.upscale_delay_s (seconds).")
@click.option("--downscale-delay-s", type=float, default=None, help="Override serve.autoscaling.downscale_delay_s (seconds).")
@click.option("--no-auth", is_flag=True, help="Serve WITHOUT API keys (local experiments only).")
@ADDRESS
def serve_deploy(ref, storage, canary, min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s,
                 downscale_delay_s, no_auth, address) -> None:
    """Deploy a registered version NAME[:vN] (newest by default). A running application is updated in
    place without dropping requests; --canary PERCENT splits the traffic with the running version instead."""
    from ..registry import parse_ref

    name, version = parse_ref(ref)
    overrides = _autoscaling_overrides(min_replicas, max_replicas, target_ongoing_requests,
                                       upscale_delay_s, downscale_delay_s)
    if no_auth:
        overrides["auth"] = False
        _err("WARNING: --no-auth: the endpoint will answer anyone who can reach it")
    url = _client(address).deploy(name, version, storage=storage, overrides=overrides,
                                  progress=lambda m: _err(f"  {m}"), canary_percent=canary)
    what = f"{ref} as a {canary:g}% canary" if canary is not None else ref
    click.echo(f"serving {what} at {url}/v1/completions")


@serve.command("rollback")
@click.argument("name")
@click.option("--storage", default=None, help="Storage root (default: $ZEROPLANE_STORAGE or ~/.zeroplane/storage).")
@ADDRESS
@OUTPUT
def serve_rollback(name, storage, address, output) -> None:
    """Undo the last rollout of NAME: drop a canary, else deploy the version registered before the
    running one (in place, without dropping requests)."""
    from ..registry import check_model_name

    check_model_name(name)
    res = _client(address).rollback(name, storage=storage, progress=lambda m: _err(f"  {m}"))
    if output == "json":
        return _json(res)
    click.echo(f"rolled back {name}: {res['from']} -> {res['to']} at {res['url']}")


@serve.command("delete")
@click.argument("name")
@ADDRESS
def serve_delete(name, address) -> None:
    """Remove the Serve application of model NAME."""
    _client(address).serve_client().delete(name)
    click.echo(f"deleted application {name}")


@serve.group("keys")
def keys() -> None:
    """API keys for the serving endpoints (stored hashed in the storage)."""


@keys.command("create")
@click.option("--name", "key_name", default=None, help="A label for the key.")
@click.option("--storage", default=None, help="Storage root (default: $ZEROPLANE_STORAGE or ~/.zeroplane/storage).")
@click.option("--save", is_flag=True, help="Also save the key to ~/.zeroplane/api_key for `zeroplane complete`.")
def keys_create(key_name, storage, save) -> None:
    """Create a key; it is printed once and only its hash is stored."""
    from ..sdk import default_storage
    from ..serve_keys import create_key

    key, rec = create_key(storage or default_storage(), key_name)
    if save:
        path = _api_key_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(key + "\n")
        path.chmod(0o600)
        _err(f"saved to {path}")
    click.echo(key)
    _err(f"key id {rec['id']} created; it will not be shown again")


@keys.command("list")
@click.option("--storage", default=None, help="Storage root (default: $ZEROPLANE_STORAGE or ~/.zeroplane/storage).")
@OUTPUT
def keys_list(storage, output) -> None:
    """Key ids, labels and whether they are revoked (never the keys)."""
    from ..sdk import default_storage
    from ..serve_keys import list_keys

    rows = list_keys(storage or default_storage())
    if output == "json":
        return _json(rows)
    _table(None, ["id", "name", "created", "revoked"], [[r["id"], r.get("name"), r.get("created_at"), r.get("revoked")] for r in rows])


@keys.command("revoke")
@click.argument("key_id")
@click.option("--storage", default=None, help="Storage root (default: $ZEROPLANE_STORAGE or ~/.zeroplane/storage).")
def keys_revoke(key_id, storage) -> None:
    """Revoke a key by id (takes effect within seconds)."""
    from ..sdk import default_storage
    from ..serve_keys import revoke_key

    revoke_key(storage or default_storage(), key_id)
    click.echo(f"revoked {key_id}")


def _api_key_path() -> Path:
    from ..cluster import state_dir

    return state_dir() / "api_key"


# ---------------------------------------------------------------- complete
@main.command("complete")
@click.argument("name")
@click.argument("prompt")
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True, help="New tokens to generate.")
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--api-key", envvar="ZEROPLANE_API_KEY", default=None,
              help="Bearer key (default: $ZEROPLANE_API_KEY, then ~/.zeroplane/api_key).")
@ADDRESS
@OUTPUT
def complete_cmd(name, prompt, max_tokens, temperature, seed, api_key, address, output) -> None:
    """Ask the deployed model NAME to continue PROMPT (an HTTP request to its Serve endpoint)."""
    from ..registry import check_model_name
    from ..sdk import complete

    check_model_name(name)
    if api_key is None and _api_key_path().exists():
        api_key = _api_key_path().read_text().strip()
    url = _client(address).serve_client().url(name)
    res = complete(url, prompt, max_tokens=max_tokens, temperature=temperature, seed=seed, api_key=api_key)
    if output == "json":
        return _json(res)
    click.echo(prompt + res["choices"][0]["text"])
    _err(f"[{res['model']}, {res['usage']['completion_tokens']} new tokens]")


from .render import render as _render  # noqa: E402  (imports only click at module level)

main.add_command(_render)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
