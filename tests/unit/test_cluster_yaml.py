"""The cluster-launcher configs in cluster/ validate against the JSON schema shipped in the installed
ray package, and against Ray's own validate_config after Ray fills in its provider defaults (offline)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "cluster").glob("*.yaml"))


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_the_three_configs_exist():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_against_rays_schema(path: Path):
    config = yaml.safe_load(path.read_text())
    schema = _ray_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(config))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_validate_config(path: Path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(yaml.safe_load(path.read_text())))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_installs_zeroplane_and_starts_ray_with_token_auth(path: Path):
    config = yaml.safe_load(path.read_text())
    setup = " ".join(config["setup_commands"])
    assert setup.index("torch==2.13.0") < setup.index("-e ~/zeroplane"), "torch must be installed first"
    assert config["file_mounts"]["~/zeroplane"] == "."
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker


def test_cloud_configs_have_cpu_and_gpu_worker_types():
    for name in ("aws.yaml", "gcp.yaml"):
        types = yaml.safe_load((REPO / "cluster" / name).read_text())["available_node_types"]
        assert types["head"]["resources"] == {"CPU": 0}
        assert types["cpu-worker"]["resources"]["CPU"] > 0 and "GPU" not in types["cpu-worker"]["resources"]
        assert types["gpu-worker"]["resources"]["GPU"] >= 1
    aws = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())["available_node_types"]["gpu-worker"]
    # the 8-GPU example job (8 workers x {CPU: 8, GPU: 1}) fits one GPU node
    assert aws["resources"]["GPU"] >= 8 and aws["resources"]["CPU"] >= 64


def test_local_config_has_ip_placeholders():
    provider = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and isinstance(provider["worker_ips"], list)
