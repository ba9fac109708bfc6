"""Memory-estimate formula, upload-size check, resume request shape, checkpoint retention mapping and
the durability spec fields. No Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zeroplane.backends.rayjobs import build_request, check_upload_size, upload_size
from zeroplane.errors import SpecError, ZeroplaneError
from zeroplane.estimate import zero_paper_bytes
from zeroplane.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "tiny-cpu.yaml"
PSI = 7_500_000_000  # the paper's Figure 1 example: 7.5 B parameters on N = 64 devices


@pytest.mark.parametrize("stage,want_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure_1(stage, want_gb):
    """Rajbhandari et al. 2020, Figure 1: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB per device (K=12, N=64)."""
    got = zero_paper_bytes(PSI, 64, stage, precision="bf16")
    assert got["k"] == 12 and got["host_bytes"] == 0
    assert round(got["device_bytes"] / 1e9, 1) == want_gb
    assert got["device_bytes"] == got["params_bytes"] + got["grads_bytes"] + got["optimizer_bytes"]


def test_zero_paper_fp32_adaptation_and_offload():
    n, psi = 4, 1000
    s0 = zero_paper_bytes(psi, n, 0, "fp32")
    assert (s0["k"], s0["device_bytes"]) == (8, (4 + 4 + 8) * psi)  # torch AdamW in place: no master copy
    s1 = zero_paper_bytes(psi, n, 1, "fp32")
    assert (s1["k"], s1["device_bytes"]) == (12, 4 * psi + 4 * psi + 12 * psi // n)
    assert zero_paper_bytes(psi, n, 2, "fp32")["device_bytes"] == 4 * psi + (4 + 12) * psi // n
    assert zero_paper_bytes(psi, n, 3, "fp32")["device_bytes"] == (4 + 4 + 12) * psi // n
    off = zero_paper_bytes(psi, n, 3, "fp32", offload_optimizer=True, offload_param=True)
    assert off["host_bytes"] == 12 * psi // n + 4 * psi // n and off["device_bytes"] == 4 * psi // n
    assert zero_paper_bytes(psi, 1, 3, "bf16")["device_bytes"] == zero_paper_bytes(psi, 1, 0, "bf16")["device_bytes"]
    with pytest.raises(ValueError):
        zero_paper_bytes(psi, 0, 2)


def test_estimate_counts_the_real_model_and_calls_deepspeed():
    from zeroplane.estimate import estimate

    spec = load_spec(TINY, ["deepspeed.zero_stage=3"])
    est = estimate(spec)
    # tiny preset, vocab 512, seq 64: embeddings (512+64)*64 + 2 blocks of 12*64^2+13*64 + final LN 128
    assert est["parameters"] == (512 + 64) * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64
    assert est["paper"]["device_bytes"] == (4 + 4 + 12) * est["parameters"] // 2
    assert est["deepspeed"]["function"].endswith("estimate_zero3_model_states_mem_needs")
    assert est["deepspeed"]["device_gb"] > 0
    assert estimate(load_spec(TINY, ["deepspeed.zero_stage=0"]))["deepspeed"] is None


def test_upload_size_check(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "a.py").write_bytes(b"x" * 1000)
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"x" * 10_000_000)
    (pkg / "b.pyc").write_bytes(b"x" * 10_000_000)
    req = {"runtime_env": {"py_modules": [str(pkg)]}}
    assert upload_size(req) == 1000  # excluded names do not count
    assert check_upload_size(req, limit_mb=1) == 1000
    (pkg / "weights.bin").write_bytes(b"x" * 2 * 2**20)
    with pytest.raises(ZeroplaneError, match=r"2\.0 MiB .* over the 1 MiB limit"):
        check_upload_size(req, limit_mb=1)
    monkeypatch.setenv("ZEROPLANE_MAX_UPLOAD_MB", "3")
    assert check_upload_size(req) > 2 * 2**20
    real = build_request(load_spec(TINY), "j")
    assert 0 < check_upload_size(real) < 5 * 2**20  # the zeroplane package alone is small


def test_resume_request_runs_under_the_original_job_id():
    spec = load_spec(TINY)
    first = build_request(spec, "tiny-1")
    assert first["submission_id"] == "tiny-1" and "zeroplane_job_id" not in first["metadata"]
    again = build_request(spec, "tiny-1", submission_id="tiny-1-r1")
    assert again["submission_id"] == "tiny-1-r1"
    assert again["runtime_env"]["env_vars"]["ZEROPLANE_JOB_ID"] == "tiny-1"
    assert again["metadata"]["zeroplane_job_id"] == "tiny-1"


def test_checkpoint_retention_is_zeroplanes_not_rays(tmp_path):
    """Ray Train keeps every checkpoint (its num_to_keep would delete one a version came from); zeroplane's
    retention (tests/unit/test_retention_runtime.py) applies num_to_keep / score_attribute / score_order."""
    from zeroplane.runtime.train.driver import build_trainer
    from zeroplane.storage import Storage

    spec = load_spec(TINY, [f"checkpoint.storage_path={tmp_path}", "checkpoint.num_to_keep=4",
                            "checkpoint.score_attribute=val_loss", "checkpoint.score_order=max"])
    run = build_trainer(spec, "j", Storage.for_checkpoint_spec(spec.checkpoint), {}).run_config
    assert run.checkpoint_config.num_to_keep is None
    assert run.failure_config.max_failures == spec.failure.max_failures and run.name == "j"
    assert run.storage_path == str(tmp_path / "jobs") and run.storage_filesystem is None


def test_durability_spec_fields():
    s = load_spec(TINY, ["train.max_steps=16", "train.stop_after_steps=8",
                         "checkpoint.s3_endpoint_url=http://127.0.0.1:9000"])
    assert s.train.stop_after_steps == 8 and s.checkpoint.s3_endpoint_url == "http://127.0.0.1:9000"
    with pytest.raises(SpecError, match=r"train.*stop_after_steps=17 is above max_steps=16"):
        load_spec(TINY, ["train.max_steps=16", "train.stop_after_steps=17"])
    with pytest.raises(SpecError, match=r"checkpoint.s3_endpoint_url = \"minio:9000\".*http\(s\)://host"):
        load_spec(TINY, ["checkpoint.s3_endpoint_url=minio:9000"])
    schema = json.dumps(__import__("zeroplane.spec", fromlist=["json_schema"]).json_schema())
    assert "stop_after_steps" in schema and "s3_endpoint_url" in schema


def test_dry_run_shows_memory_estimate_and_estimate_command():
    from click.testing import CliRunner

    from zeroplane.cli.main import main

    r = CliRunner().invoke(main, ["train", "submit", str(TINY), "--dry-run", "--set", "deepspeed.zero_stage=1"])
    assert r.exit_code == 0, r.output
    est = json.loads(r.output)["memory_estimate"]
    assert est["zero_stage"] == 1 and est["paper"]["device_bytes"] == 8 * est["parameters"] + 12 * est["parameters"] // 2
    r = CliRunner().invoke(main, ["train", "estimate", str(TINY), "-o", "json"])
    assert r.exit_code == 0 and json.loads(r.output)["deepspeed"]["device_gb"] > 0
    r = CliRunner().invoke(main, ["train", "estimate", str(TINY), "--set", "deepspeed.zero_stage=7"])
    assert r.exit_code == 2 and "zero_stage" in r.output


@pytest.mark.parametrize("extra", [[], ["model.preset=small"], ["model.tie_word_embeddings=false"],
                                   ["model.config={n_layer: 3, n_embd: 96, n_head: 4, n_inner: 200}"]])
def test_gpt2_count_from_config_equals_meta_model(extra):
    from zeroplane.estimate import count_parameters, gpt2_parameters

    spec = load_spec(TINY, extra)
    assert gpt2_parameters(spec) == count_parameters(spec)
