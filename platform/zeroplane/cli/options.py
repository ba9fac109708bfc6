"""Options shared by several commands, each declared once. Apply them as decorators; several are
groups of options (``AUTOSCALING``) that the command receives as one dict."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import click

from .context import pass_zp, set_address

class Finite(click.FloatRange):
    """A float option (optionally bounded, as :class:`click.FloatRange`) that refuses ``nan`` and ``inf``:
    Click's float types accept both, and no duration, percent or temperature means either."""

    name = "float"

    def convert(self, value, param, ctx):  # noqa: D102  (Click's hook)
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
                      help="Output format.")
#: ``--address``: stored in ``ctx.obj`` (the command does not receive it as an argument).
ADDRESS = click.option("--address", envvar="RAY_ADDRESS", default=None, expose_value=False, callback=set_address,
                       help="Ray dashboard URL (http://host:8265) or GCS address; default: RAY_ADDRESS, the "
                            "profile's address, then the local head from `zeroplane cluster up`.")
SET = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                   help="Override a field, e.g. train.max_steps=10 (repeatable).")
STORAGE = click.option("--storage", default=None,
                       help="Storage root (default: $ZEROPLANE_STORAGE, the profile's storage, or ~/.zeroplane/storage).")
JOB_STORAGE = click.option("--storage", default=None,
                           help="Storage root (default: the job's checkpoint.storage_path).")
WAIT = click.option("--wait", is_flag=True, help="Follow progress until the job ends; exit 0 on success, 1 otherwise.")
TIMEOUT = click.option("--timeout-s", type=Finite(min=1), default=None,
                       help="With --wait: give up (exit 1, the job keeps running) after this many seconds.")
CANARY = click.option(
    "--canary", type=Finite(0, 100, min_open=True, max_open=True), default=None, metavar="PERCENT",
    help="Deploy as a canary next to the running version, taking PERCENT % of the requests "
         "(end it with `serve deploy NAME:vN` or `serve rollback NAME`).")

GATE = click.option(
    "--gate", is_flag=True,
    help="With --canary: advance the canary on evidence (held-out evaluation, then error rate and p95 latency "
         "against the stable version, window by window; the spec's serve.release section) or roll it back, "
         "automatically, from a job on the cluster.")

_NO_AUTH_WARNING = "WARNING: --no-auth: the endpoint will answer anyone who can reach it"


def _no_auth(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        click.echo(_NO_AUTH_WARNING, err=True)
    return value


#: ``--no-auth``: warns on stderr when given.
NO_AUTH = click.option("--no-auth", is_flag=True, callback=_no_auth,
                       help="Serve WITHOUT API keys (local experiments only).")

def _pass_credentials(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        from ..sdk import CREDENTIALS_WARNING

        click.echo(CREDENTIALS_WARNING, err=True)
    return value


#: ``--pass-credentials``: the submitting shell's AWS keys go into the job request (warns when given).
PASS_CREDENTIALS = click.option(
    "--pass-credentials", is_flag=True, callback=_pass_credentials,
    help="Put this shell's AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY/SESSION_TOKEN into the job request (readable by "
         "every holder of the cluster token). Default: the nodes use their own credentials.")

_AUTOSCALING_FLAGS = (
    ("min_replicas", int, "serve.autoscaling.min_replicas"),
    ("max_replicas", int, "serve.autoscaling.max_replicas"),
    ("target_ongoing_requests", Finite(), "serve.autoscaling.target_ongoing_requests"),
    ("upscale_delay_s", Finite(), "serve.autoscaling.upscale_delay_s (seconds)"),
    ("downscale_delay_s", Finite(), "serve.autoscaling.downscale_delay_s (seconds)"),
)


def autoscaling_overrides(given: Dict[str, Any]) -> Dict[str, Any]:
    """``{"autoscaling": {...}}`` from the autoscaling flags that were given.

    Raises:
        click.UsageError (exit 2): a negative value, ``--max-replicas`` below 1 or below ``--min-replicas``.
    """
    for k, v in given.items():
        if v is not None and v < 0:
            raise _usage(f"--{k.replace('_', '-')} {v}: must be >= 0")
    lo, hi = given.get("min_replicas"), given.get("max_replicas")
    if lo is not None and hi is not None and lo > hi:
        raise _usage(f"--min-replicas {lo} is above --max-replicas {hi}; raise --max-replicas")
    if hi is not None and hi < 1:
        raise _usage(f"--max-replicas {hi}: must be >= 1")
    return {"autoscaling": {k: v for k, v in given.items() if v is not None}}


def AUTOSCALING(f: Callable) -> Callable:  # noqa: N802  (an option set, named like the single options)
    """The five autoscaling flags; the command receives them as ``overrides`` (checked, see
    :func:`autoscaling_overrides`) plus ``auth: False`` when ``--no-auth`` is also applied and given."""
    for name, typ, field in reversed(_AUTOSCALING_FLAGS):
        f = click.option(f"--{name.replace('_', '-')}", name, type=typ, default=None, help=f"Override {field}.")(f)
    return f


def pop_overrides(kwargs: Dict[str, Any], no_auth: Optional[bool] = None) -> Dict[str, Any]:
    """Remove the autoscaling flags from a command's ``kwargs`` and return the overrides they make."""
    out = autoscaling_overrides({name: kwargs.pop(name) for name, _t, _f in _AUTOSCALING_FLAGS})
    if no_auth:
        out["auth"] = False
    return out


def _usage(message: str) -> click.UsageError:
    from .output import UsageError

    return UsageError(message)


def CLUSTER_READ(f: Callable) -> Callable:  # noqa: N802  (an option set, named like the single options)
    """``--address`` + ``-o/--output``, and the :class:`~zeroplane.cli.context.ZpContext` as first argument:
    the stack of every command that reads from the cluster and can print JSON."""
    return ADDRESS(OUTPUT(pass_zp(f)))
