"""``zeroplane data prepare|list|show``: prepared token datasets in the storage."""

from __future__ import annotations

import click

from .context import pass_zp
from .options import CLUSTER_READ, OUTPUT, PASS_CREDENTIALS, SET, STORAGE, TIMEOUT
from .output import emit_json, err, table


@click.group()
def data() -> None:
    """Token datasets: tokenized once on the cluster (Ray Data), reused by every job on the same data."""


@data.command("prepare")
@click.argument("file", type=click.Path(dir_okay=False))
@SET
@TIMEOUT
@PASS_CREDENTIALS
@CLUSTER_READ
def data_prepare(zp, file, overrides, timeout_s, pass_credentials, output) -> None:
    """Tokenize the data of the job spec FILE into datasets/<fingerprint>/ of its storage, on the cluster
    (a Ray Job; an already prepared dataset is reused). Prints the dataset id."""
    from ..sdk import load_spec

    s = load_spec(file, list(overrides))
    err(zp.client.dataset_status(s)["note"])
    res = zp.client.prepare_data(s, timeout_s=timeout_s, pass_credentials=pass_credentials)
    if output == "json":
        return emit_json(res)
    err(f"dataset {res['id']} {'reused' if res['reused'] else 'prepared'} at {res['uri']} (job {res['job_id']})")
    click.echo(res["id"])


@data.command("list")
@STORAGE
@OUTPUT
@pass_zp
def data_list(zp, storage, output) -> None:
    """Datasets in the storage (unfinished ones too: no manifest, never used)."""
    rows = zp.client.datasets(storage)
    if output == "json":
        return emit_json(rows)
    if not rows:
        click.echo("no datasets")
        return
    table(None, ["id", "complete", "source", "documents", "tokens", "shards", "created", "uri"],
          [[r.id, r.complete, r.source, r.documents, r.tokens, r.shards, r.created_at, r.uri] for r in rows])


@data.command("show")
@click.argument("dataset_id")
@STORAGE
@pass_zp
def data_show(zp, dataset_id, storage) -> None:
    """The manifest of DATASET_ID (JSON): source files, tokenizer hash, counts, shards, split."""
    emit_json(zp.client.dataset(dataset_id, storage))
