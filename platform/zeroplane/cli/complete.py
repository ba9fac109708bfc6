"""``zeroplane complete``: one completion from a deployed model, through the official ``openai`` client."""

from __future__ import annotations

import click

from .options import CLUSTER_READ, Finite
from .output import emit_json, err


@click.command("complete")
@click.argument("name")
@click.argument("prompt")
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True, help="New tokens to generate.")
@click.option("--temperature", type=Finite(0, 2), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--api-key", envvar="ZEROPLANE_API_KEY", default=None,
              help="Bearer key (default: $ZEROPLANE_API_KEY, then the key saved by `serve keys create --save` in "
                   "$ZEROPLANE_HOME/api_key, ~/.zeroplane/api_key by default).")
@CLUSTER_READ
def complete(zp, name, prompt, max_tokens, temperature, seed, api_key, output) -> None:
    """Ask the deployed model NAME to continue PROMPT (a request to its Serve endpoint)."""
    from ..sdk import check_name, saved_api_key

    check_name(name, "NAME")
    res = zp.client.complete(name, prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                             api_key=api_key if api_key is not None else saved_api_key())
    if output == "json":
        return emit_json(res)
    click.echo(prompt + res.choices[0].text)
    err(f"[{res.model}, {res.usage.completion_tokens if res.usage else '?'} new tokens]")
