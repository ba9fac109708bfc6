"""``zeroplane``: nouns then verbs. Each command parses, calls :mod:`zeroplane.sdk`, renders.

One module per command group; shared options in :mod:`.options`; the resolved address/profile and a
lazily built SDK client in ``ctx.obj`` (:mod:`.context`). This module is the CLI edge for errors: a
:class:`zeroplane.errors.ZeroplaneError` becomes ``Error: <message>`` and its ``exit_code`` (0 ok,
1 runtime failure, 2 invalid spec/flag/argument); anything else becomes one line and exit 1
(``ZEROPLANE_DEBUG=1`` keeps the traceback). Read commands take ``-o json``.
"""

from __future__ import annotations

import os
import sys
import warnings

import click

from .checkpoints import checkpoints
from .cluster import cluster
from .complete import complete
from .context import ZpContext
from .data import data
from .models import models, promote
from .render import render
from .serve import serve
from .spec import spec
from .train import train

class CliError(click.ClickException):
    """An SDK error at the CLI edge: ``Error: <message>`` on stderr and the error's ``exit_code``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Main(click.Group):
    """The one translation of exceptions into exit codes and one-line messages."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            from .. import sdk

            if isinstance(e, sdk.ZeroplaneError):
                raise CliError(e.message, e.exit_code) from None
            if os.environ.get(sdk.names.ENV_DEBUG, "") not in ("", "0"):  # a bug or an environment problem
                raise
            raise CliError(f"{type(e).__name__}: {sdk.first_line(e) if str(e) else ''} "
                           f"(set {sdk.names.ENV_DEBUG}=1 for the traceback)", 1) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zeroplane", prog_name="zeroplane")
@click.option("--profile", envvar="ZEROPLANE_PROFILE", default=None,
              help="Named cluster profile of ~/.zeroplane/config.yaml (its address is used after --address and "
                   "RAY_ADDRESS; its storage after --storage and ZEROPLANE_STORAGE).")
@click.pass_context
def main(ctx: click.Context, profile) -> None:
    """zeroplane: train Hugging Face causal LMs with DeepSpeed ZeRO on Ray Train, promote checkpoints
    to model versions, and serve them with Ray Serve."""
    ctx.obj = ZpContext(profile=profile)
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (e.g. a key about to go over plain http) as one ``WARNING: …`` line on stderr."""
    click.echo(f"WARNING: {message}", err=True)


for _cmd in (cluster, spec, train, data, checkpoints, promote, models, serve, complete, render):
    main.add_command(_cmd)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
