"""Every spec in jobs/ dry-runs through the CLI, and spec.scaling maps field for field onto Ray Train's
ScalingConfig (built for real; no cluster needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from zeroplane.cli.main import main
from zeroplane.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
JOBS = sorted((REPO / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_job_spec_dry_runs(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("ZEROPLANE_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = CliRunner().invoke(main, ["train", "submit", f"jobs/{path.name}", "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    spec = load_spec(path)
    assert plan["spec"] == spec.model_dump(mode="json")
    ds = plan["deepspeed_config"]
    assert ds["zero_optimization"]["stage"] == spec.deepspeed.zero_stage
    assert ds["train_batch_size"] == (spec.train.micro_batch_size_per_worker
                                      * spec.train.gradient_accumulation_steps * spec.scaling.num_workers)
    assert plan["ray_job_request"]["entrypoint"] == "python -m zeroplane.runtime.train.driver"


def test_gpu_examples_are_gpu_jobs():
    gpu = [load_spec(p) for p in JOBS if "gpu" in p.stem]
    assert len(gpu) >= 2
    for spec in gpu:
        assert spec.scaling.use_gpu and spec.scaling.resources_per_worker["GPU"] == 1
        assert spec.train.precision == "bf16"
        assert spec.checkpoint.storage_path.startswith("s3://")  # multi-node: storage every node reaches
    zero3 = load_spec(REPO / "jobs" / "gpt2-124m-8xgpu-zero3.yaml")
    assert (zero3.scaling.num_workers, zero3.deepspeed.zero_stage, zero3.model.preset) == (8, 3, "gpt2-124m")


def test_scaling_config_from_a_gpu_spec():
    from ray.train import ScalingConfig

    from zeroplane.runtime.train.driver import build_scaling_config

    spec = load_spec(REPO / "jobs" / "gpt2-124m-8xgpu-zero3.yaml",
                     ["scaling.accelerator_type=H100", "scaling.placement_strategy=SPREAD"])
    sc = build_scaling_config(spec)
    assert isinstance(sc, ScalingConfig)
    assert sc.num_workers == 8
    assert sc.use_gpu is True
    assert sc.placement_strategy == "SPREAD"
    assert sc.accelerator_type == "H100"
    # Ray adds a tiny accelerator_type:<type> demand so workers only land on that GPU type.
    per_worker = sc._resources_per_worker_not_none
    assert per_worker["CPU"] == 8 and per_worker["GPU"] == 1 and per_worker["accelerator_type:H100"] > 0
    assert sc.total_resources["GPU"] == 8 and sc.total_resources["CPU"] == 64


def test_scaling_config_from_the_cpu_demo():
    from zeroplane.runtime.train.driver import build_scaling_config

    sc = build_scaling_config(load_spec(REPO / "jobs" / "pydoc-gpt.yaml"))
    assert (sc.num_workers, sc.use_gpu, sc.placement_strategy, sc.accelerator_type) == (2, False, "PACK", None)
    assert sc._resources_per_worker_not_none == {"CPU": 1}
