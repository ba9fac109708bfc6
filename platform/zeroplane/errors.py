"""zeroplane's exceptions: one plain tree, no framework in it.

Every error zeroplane raises on purpose is a :class:`ZeroplaneError`. Each class carries the two codes
its edges need, so the translation lives in one mapping per edge: the CLI (``zeroplane.cli.app``)
turns ``exit_code`` into the process's exit status, the Serve app turns ``http_status`` into the
response's status. Nothing here imports Click, Ray or an HTTP framework, so these errors can be raised
anywhere (the control plane, a Ray Train worker, a Serve replica).

Exit codes: 0 ok, 1 runtime failure, 2 invalid input (a spec field, a flag, an argument).
"""

from __future__ import annotations


class ZeroplaneError(Exception):
    """A failure the user should read as one line: what failed, where, and what to do.

    Attributes:
        exit_code: the CLI's exit status for this error (1).
        http_status: the HTTP status for this error at the Serve edge (500).
    """

    exit_code = 1
    http_status = 500

    @property
    def message(self) -> str:
        """The message as given (the first argument)."""
        return str(self.args[0]) if self.args else type(self).__name__


class DamagedFileError(ZeroplaneError, ValueError):
    """A stored file zeroplane wrote (a registry record, the API keys, a history, a manifest) that no longer
    parses: the message names it and what to do. A ``ValueError`` too, so code that treats unparsable
    content as absent keeps doing so where that is safe; nothing is written over such a file."""


class SpecError(ZeroplaneError):
    """Invalid input: a spec field, a flag or an argument (exit code 2, HTTP 400).

    The message names the field or parameter, the value and the fix.
    """

    exit_code = 2
    http_status = 400


class NotFoundError(ZeroplaneError):
    """A job, checkpoint, model, version or application that does not exist (exit code 1, HTTP 404)."""

    http_status = 404


class ConflictError(ZeroplaneError):
    """The thing exists but is in the wrong state for the request, e.g. resuming a running job
    (exit code 1, HTTP 409)."""

    http_status = 409


def first_line(e: BaseException) -> str:
    """The first non-empty line of ``str(e)``, or the exception's class name when it has no text.

    Third-party errors (Ray's, boto's) often carry a traceback or a multi-line payload; zeroplane's own
    messages quote only this line of them.
    """
    for line in str(e).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__
