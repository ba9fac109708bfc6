"""``zeroplane spec validate|schema``."""

from __future__ import annotations

import click

from .options import SET
from .output import emit_json


@click.group()
def spec() -> None:
    """Validate job specs and print their schema."""


@spec.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
@SET
def spec_validate(file, overrides) -> None:
    """Check a job spec; exit 2 with the field, value and fix when it is invalid."""
    from ..sdk import load_spec

    s = load_spec(file, list(overrides))
    click.echo(f"{file}: valid (job {s.name}, {s.model.architecture}/{s.model.preset or 'custom'}, "
               f"ZeRO-{s.deepspeed.zero_stage}, {s.scaling.num_workers} workers, {s.train.max_steps} steps)")


@spec.command("schema")
def spec_schema() -> None:
    """Print the JSON schema of job specs (every field with its description)."""
    from ..sdk import json_schema

    emit_json(json_schema())
