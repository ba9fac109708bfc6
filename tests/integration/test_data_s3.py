"""``jobs/jsonl-s3.yaml`` end to end against a real moto S3 server and a real local Ray: a JSONL corpus
(plain and gzip objects, one bad line) under an S3 prefix is prepared with Ray Data into shards in the
S3 storage, two ZeRO-2 workers train reading their sequences with ranged GETs, a second job reuses the
dataset, and an S3 prefix that cannot be read fails before any worker starts."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest

from zeroplane import datasets as dsets
from zeroplane.errors import SpecError
from zeroplane.spec import load_spec
from zeroplane.storage import Storage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _spec(bucket: str, *extra: str):
    return load_spec(REPO / "jobs" / "jsonl-s3.yaml",
                     [f"data.source=s3://{bucket}/corpus/", f"checkpoint.storage_path=s3://{bucket}/runs",
                      "train.max_steps=4", "checkpoint.every_n_steps=4", "train.eval_every_n_steps=100",
                      "train.eval_batches=2", "train.micro_batch_size_per_worker=4", "train.warmup_steps=1",
                      "data.validation_fraction=0.05", "tokenizer.train_bpe.vocab_size=512", "data.seq_len=64",
                      *extra])


def test_jsonl_in_s3_prepares_trains_and_is_reused(ray_local, s3_bucket, s3_server):
    import boto3

    from zeroplane.runtime.train.driver import build_train_loop_config, build_trainer

    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    rng = np.random.default_rng(1)
    words = "the cluster reads every shard once and each rank its own sequences".split()
    recs = [json.dumps({"text": " ".join(rng.choice(words, size=40))}) for _ in range(240)]
    s3.put_object(Bucket=s3_bucket, Key="corpus/part-0.jsonl", Body="\n".join(recs[:120] + ["{broken"]).encode())
    s3.put_object(Bucket=s3_bucket, Key="corpus/part-1.jsonl.gz", Body=gzip.compress("\n".join(recs[120:]).encode()))
    s3.put_object(Bucket=s3_bucket, Key="corpus/README.md", Body=b"not a corpus file")  # ignored: not a corpus ending

    spec = _spec(s3_bucket)
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    job_id = f"itest-jsonl-s3-{int(time.time())}"
    config = build_train_loop_config(spec, job_id, storage)
    ds_id = config["dataset"]["id"]
    m = dsets.show_dataset(storage, ds_id)
    assert [f["path"] for f in m["source"]["files"]] == [f"{s3_bucket}/corpus/part-0.jsonl",
                                                         f"{s3_bucket}/corpus/part-1.jsonl.gz"]
    assert m["counts"]["documents"] == 240 and m["counts"]["skipped_records"] == 1  # on_bad_record: skip
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"runs/datasets/{ds_id}/")["Contents"]}
    assert f"runs/datasets/{ds_id}/manifest.json" in keys and f"runs/datasets/{ds_id}/train-00000.bin" in keys

    result = build_trainer(spec, job_id, storage, config).fit()
    assert result.error is None and result.metrics["step"] == 4
    assert np.isfinite(result.metrics["train_loss"]) and np.isfinite(result.metrics["val_loss"])

    # a second job on the same objects: reused, nothing tokenized again
    again = build_train_loop_config(spec, job_id + "-b", storage)
    assert again["dataset"]["id"] == ds_id
    assert dsets.show_dataset(storage, ds_id)["created_at"] == m["created_at"]
    # ... and the SDK's note (what `train submit` prints) says so from the submitting machine
    from zeroplane.sdk import Client

    note = Client.dataset_status(spec)
    assert note["prepared"] is True and note["id"] == ds_id and "reuses it" in note["note"]

    # an object changed: another dataset, which `train submit` says the job prepares first
    s3.put_object(Bucket=s3_bucket, Key="corpus/part-2.jsonl", Body=recs[0].encode())
    assert Client.dataset_status(spec)["prepared"] is False


def test_unreadable_s3_source_fails_before_any_worker(ray_local, s3_bucket):
    from zeroplane.runtime.train.driver import build_train_loop_config

    spec = _spec(s3_bucket, "data.source=s3://zp-no-such-bucket-here/corpus/")
    with pytest.raises(SpecError, match=r"s3://zp-no-such-bucket-here/corpus/' (cannot be listed|matches no file)"):
        build_train_loop_config(spec, "itest-s3-missing", Storage.for_checkpoint_spec(spec.checkpoint))
    spec = _spec(s3_bucket, f"data.source=s3://{s3_bucket}/empty-prefix/")
    with pytest.raises(SpecError, match="matches no file"):
        build_train_loop_config(spec, "itest-s3-empty", Storage.for_checkpoint_spec(spec.checkpoint))
