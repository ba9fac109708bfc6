"""Rendering: JSON, tables and one-line messages. stdout carries the result (parseable with ``-o json``);
progress and notes go to stderr."""

from __future__ import annotations

import json
from typing import Any, Callable, List, Optional

import click


class UsageError(click.UsageError):
    """A bad flag value: ``Error: <message>`` and exit 2, without Click's usage banner (the message already
    says what to fix)."""

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True, file=file)


def console(stderr: bool = False):
    """A rich console; ``stderr=True`` for progress so that stdout stays parseable (``-o json``)."""
    from rich.console import Console

    c = Console(highlight=False, soft_wrap=True, stderr=stderr)
    if not c.is_terminal:  # logs and pipes: do not fold paths at 80 columns
        c.width = max(c.width, 200)
    return c


def err(msg: str) -> None:
    """One line on stderr."""
    click.echo(msg, err=True)


def emit_json(obj: Any) -> None:
    """``obj`` (a result with ``to_dict()``, a list of them, or plain JSON values) as indented JSON on stdout."""
    def plain(o: Any) -> Any:
        if hasattr(o, "to_dict"):
            return o.to_dict()
        if hasattr(o, "model_dump"):  # the openai client's response models
            return o.model_dump(exclude_none=True)
        if isinstance(o, list):
            return [plain(x) for x in o]
        return o

    click.echo(json.dumps(plain(obj), indent=2, default=str))


def show(output: str, result: Any, print_table: Callable[[Any], None]) -> None:
    """``result`` as JSON when ``output == "json"``, else through ``print_table(result)``."""
    if output == "json":
        emit_json(result)
    else:
        print_table(result)


def table(title: Optional[str], columns: List[str], rows: List[List[Any]]) -> None:
    """A rich table on stdout (None cells print empty)."""
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    console().print(t)


def fmt(x: Optional[float], nd: int = 3) -> str:
    """``x`` with ``nd`` decimals, ``-`` for None."""
    return "-" if x is None else f"{x:.{nd}f}"
