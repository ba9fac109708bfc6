"""Error types. User mistakes subclass Click's exceptions so the CLI exits with the right code.

Exit codes: 0 ok, 1 runtime failure (``ZeroplaneError``), 2 usage or invalid spec (``SpecError``).
"""

from __future__ import annotations

import click


class ZeroplaneError(click.ClickException):
    """A runtime failure the user should read as one line (exit code 1)."""

    exit_code = 1


class SpecError(click.UsageError):
    """An invalid spec, flag or argument (exit code 2). The message names the field, value and fix."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def show(self, file=None) -> None:
        """Print ``Error: <message>`` only: the message already says what to fix, so Click's usage
        banner would just push it down."""
        click.echo(f"Error: {self.format_message()}", err=True, file=file)


class NotFoundError(ZeroplaneError):
    """A job, checkpoint, model or version that does not exist (exit code 1)."""
