"""Training, checkpoint listing, promotion and the registry on ``s3://`` storage served by a real moto
S3 server over HTTP (see ``tests/conftest.py``), with a real local Ray and DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from zeroplane.checkpoints import MARKER, list_checkpoints
from zeroplane.errors import ZeroplaneError
from zeroplane.spec import load_spec
from zeroplane.storage import Storage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_preflight_names_bucket_endpoint_and_error_without_secrets(s3_bucket, s3_server):
    from zeroplane.sdk import preflight_storage

    preflight_storage(Storage.from_uri(f"s3://{s3_bucket}/runs"))  # the real bucket is writable

    missing = Storage.from_uri("s3://zp-no-such-bucket/runs")
    with pytest.raises(ZeroplaneError) as err:
        preflight_storage(missing)
    msg = err.value.message
    assert "\n" not in msg
    assert "'zp-no-such-bucket'" in msg and s3_server["AWS_ENDPOINT_URL"] in msg
    assert "NoSuchBucket" in msg or "does not exist" in msg.lower(), msg
    for secret in (s3_server["AWS_SECRET_ACCESS_KEY"], s3_server["AWS_ACCESS_KEY_ID"]):
        assert secret not in msg


def test_endpoint_from_spec_field(s3_bucket, s3_server, monkeypatch):
    """``checkpoint.s3_endpoint_url`` replaces AWS_ENDPOINT_URL."""
    endpoint = s3_server["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml", [f"checkpoint.storage_path=s3://{s3_bucket}/p",
                                                      f"checkpoint.s3_endpoint_url={endpoint}"])
    st = Storage.for_checkpoint_spec(spec.checkpoint)
    st.write_json(st.path("hello.json"), {"a": 1})
    assert st.read_json(st.path("hello.json")) == {"a": 1} and st.endpoint_url == endpoint


def test_train_list_promote_load_on_s3(ray_local, s3_bucket, s3_server, tmp_path):
    import boto3
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from zeroplane.promote import promote_checkpoint
    from zeroplane.registry import Registry
    from zeroplane.runtime.train.driver import build_train_loop_config, build_trainer

    uri = f"s3://{s3_bucket}/team/runs"
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml",
                     [f"checkpoint.storage_path={uri}", "deepspeed.zero_stage=2", "train.max_steps=10",
                      "checkpoint.every_n_steps=5", "train.eval_every_n_steps=5", "checkpoint.num_to_keep=null"])
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    job_id = f"itest-s3-{int(time.time())}"
    result = build_trainer(spec, job_id, storage, build_train_loop_config(spec, job_id, storage)).fit()
    assert result.error is None and result.metrics["step"] == 10

    # What is in the bucket, seen by plain boto3 over HTTP.
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
            for o in page.get("Contents", [])]
    prefix = f"team/runs/jobs/{job_id}/"
    for step in (5, 10):
        ck = f"{prefix}checkpoint_step_{step:07d}/"
        assert ck + MARKER in keys
        for rank in (0, 1):
            assert f"{ck}ds/step_{step:07d}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in keys
    marker = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"{prefix}checkpoint_step_0000010/{MARKER}")["Body"].read())
    assert marker["step"] == 10

    cks = list_checkpoints(storage, job_id)
    assert [c.step for c in cks] == [5, 10] and all(c.uri.startswith(uri + "/jobs/") for c in cks)

    rec = promote_checkpoint(storage, job_id, "tiny-s3")
    assert rec["version"] == "v1" and rec["verification"]["ok"]
    assert rec["uri"] == f"{uri}/models/tiny-s3/v1"
    assert Registry(storage).get("tiny-s3")["source"] == {"job_id": job_id, "step": 10, "checkpoint": cks[-1].uri}

    # The version loads back from the bucket as a plain Hugging Face folder and reproduces the probe.
    local = storage.download_dir(storage.path("models", "tiny-s3", "v1"), tmp_path / "v1")
    model = AutoModelForCausalLM.from_pretrained(local).eval()
    probe = storage.download_dir(cks[-1].path, tmp_path / "ck")
    ids = torch.tensor(json.loads((probe / "probe.json").read_text())["input_ids"])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, load_file(probe / "probe.safetensors")["logits"], rtol=0, atol=1e-5)
