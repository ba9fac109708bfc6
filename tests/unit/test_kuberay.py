"""KubeRay manifests: every example in manifests/ is what the renderer produces today (golden files),
validates against the KubeRay CRD schemas (tests/data/kuberay-crds), carries no secret values, and
sizes pods from the spec (nvidia.com/gpu for GPU workers). Also the `render kuberay` CLI."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Dict

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from zeroplane import kuberay
from zeroplane.cli.main import main
from zeroplane.errors import SpecError
from zeroplane.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
CRDS = REPO / "tests" / "data" / "kuberay-crds"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}
REGENERATE = "regenerate with `python -m zeroplane.kuberay --write manifests/` and review the diff"


def _strict(schema: Any) -> Any:
    """The CRD schema with ``additionalProperties: false`` on every object that lists its properties.

    The API server prunes unknown fields silently; failing on them instead catches a misspelt field.
    Objects marked ``x-kubernetes-preserve-unknown-fields`` keep accepting anything.
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def _crd(kind: str) -> Dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each: libyaml when present
    return yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=loader)


@functools.lru_cache(maxsize=None)
def _validator(kind: str) -> jsonschema.protocols.Validator:
    crd = _crd(kind)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def validate(manifest: Dict[str, Any]) -> None:
    """Raise AssertionError listing every schema violation of ``manifest``."""
    kind = manifest["kind"]
    crd = _crd(kind)
    assert manifest["apiVersion"] == f"{crd['spec']['group']}/v1"
    assert crd["spec"]["names"]["kind"] == kind
    errors = sorted(_validator(kind).iter_errors(manifest), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:20])


def _example_files():
    return sorted(MANIFESTS.glob("*.yaml"))


def _walk(obj: Any, path: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}/{i}")
    yield path, obj


def _containers(manifest: Dict[str, Any]):
    for path, obj in _walk(manifest):
        if path.endswith("/containers") and isinstance(obj, list):
            yield from obj


SECRETISH = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.I)
CREDENTIAL_VALUE = re.compile(r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|[A-Za-z0-9/+]{40}|^[0-9a-f]{32,}$")


def assert_no_secret_values(manifest: Dict[str, Any], text: str) -> None:
    """Credential-like env vars only through valueFrom/envFrom; nothing that looks like a key anywhere."""
    for c in _containers(manifest):
        for env in c.get("env", []):
            if SECRETISH.search(env["name"]):
                assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), env
        for src in c.get("envFrom", []):
            assert set(src) == {"secretRef"}, src
    runtime_env = yaml.safe_load(manifest["spec"].get("runtimeEnvYAML", "") or "{}")
    assert not any(SECRETISH.search(k) for k in (runtime_env.get("env_vars") or {})), runtime_env
    for line in text.splitlines():
        for word in re.split(r"[\s'\",:{}\[\]]+", line):
            assert not CREDENTIAL_VALUE.search(word), f"credential-like value in manifest: {line.strip()[:80]}"


# ---------------------------------------------------------------- the examples in manifests/


def test_examples_cover_every_job_spec():
    names = {p.name for p in _example_files()}
    for job in (REPO / "jobs").glob("*.yaml"):
        assert f"{job.stem}.rayjob.yaml" in names, f"manifests/ lacks {job.stem}.rayjob.yaml; {REGENERATE}"
    assert {"pydoc-gpt.rayservice.yaml", "raycluster.yaml"} <= names
    assert (MANIFESTS / "README.md").is_file()


def test_examples_are_up_to_date():
    """Golden files: the committed manifests are exactly what the renderer produces now."""
    rendered = kuberay.example_manifests(REPO)
    committed = {p.name: p.read_text() for p in _example_files()}
    assert sorted(rendered) == sorted(committed), REGENERATE
    for name, text in rendered.items():
        assert committed[name] == text, f"manifests/{name} is stale; {REGENERATE}"


@pytest.mark.parametrize("path", _example_files(), ids=lambda p: p.name)
def test_example_validates_against_the_crd(path: Path):
    text = path.read_text()
    manifest = yaml.safe_load(text)
    validate(manifest)
    assert_no_secret_values(manifest, text)
    assert manifest["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "zeroplane"
    for c in _containers(manifest):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "zeroplane-ray-auth", "key": "auth_token"}


@pytest.mark.parametrize("path", [p for p in _example_files() if p.name.endswith(".rayjob.yaml")], ids=lambda p: p.name)
def test_example_header_command_reproduces_the_file(path: Path):
    """The command in each RayJob example's first line, run through the CLI, prints the same manifest."""
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith(kuberay.HEADER_PREFIX)
    cmd = first[len(kuberay.HEADER_PREFIX):].split("`", 1)[0].split()
    assert cmd[:4] == ["zeroplane", "render", "kuberay", "rayjob"]
    result = CliRunner().invoke(main, cmd[1:], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    body = "".join(text.splitlines(keepends=True)[2:])
    assert result.stdout == body


# ---------------------------------------------------------------- rendering details


def _spec(path: str, *overrides: str):
    return load_spec(REPO / path, list(overrides))


def test_rayjob_mirrors_the_jobs_api_request():
    from zeroplane.backends.rayjobs import ENTRYPOINT, build_request

    spec = _spec("jobs/tiny-cpu.yaml", "checkpoint.storage_path=s3://b/p")
    m = kuberay.render_rayjob(spec, job_id="tiny-cpu-20260101-000000-abcd")
    validate(m)
    s = m["spec"]
    req = build_request(spec, "tiny-cpu-20260101-000000-abcd")
    assert s["entrypoint"] == ENTRYPOINT == "python -m zeroplane.runtime.train.driver"
    assert s["jobId"] == "tiny-cpu-20260101-000000-abcd"
    assert s["metadata"] == req["metadata"]
    env = yaml.safe_load(s["runtimeEnvYAML"])["env_vars"]
    assert env["ZEROPLANE_JOB_ID"] == "tiny-cpu-20260101-000000-abcd"
    assert env["ZEROPLANE_SPEC_JSON"] == req["runtime_env"]["env_vars"]["ZEROPLANE_SPEC_JSON"]
    assert json.loads(env["ZEROPLANE_SPEC_JSON"]) == spec.model_dump(mode="json")
    assert s["shutdownAfterJobFinishes"] is True and s["ttlSecondsAfterFinished"] == 600
    (group,) = s["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"] == res["requests"] == {"cpu": "1", "memory": "4Gi"}
    assert s["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_gpu_spec_requests_nvidia_gpus():
    spec = _spec("jobs/gpt2-124m-8xgpu-zero3.yaml")
    m = kuberay.render_rayjob(spec)
    validate(m)
    (group,) = m["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 8
    pod = group["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert c["resources"]["requests"] == c["resources"]["limits"]
    assert c["image"].endswith("-gpu")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert c["envFrom"] == [{"secretRef": {"name": "zeroplane-s3", "optional": False}}]
    head = m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_rayjob_custom_resources_fractional_cpu_and_options():
    spec = _spec("jobs/tiny-cpu.yaml", "checkpoint.storage_path=s3://b/p",
                 "scaling.resources_per_worker={CPU: 0.5, node_a: 1}")
    m = kuberay.render_rayjob(spec, job_id="x" * 80, image="registry.example/zp:1", namespace="ml",
                              storage_secret="my-s3", auth_secret="my-auth", ttl_seconds_after_finished=60)
    validate(m)
    assert len(m["metadata"]["name"]) <= kuberay.MAX_RAYJOB_NAME and m["metadata"]["namespace"] == "ml"
    assert m["spec"]["ttlSecondsAfterFinished"] == 60
    (group,) = m["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["resources"] == {"node_a": "1"}
    c = group["template"]["spec"]["containers"][0]
    assert c["image"] == "registry.example/zp:1" and c["resources"]["limits"]["cpu"] == "500m"
    assert c["envFrom"] == [{"secretRef": {"name": "my-s3", "optional": False}}]
    assert {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "my-auth", "key": "auth_token"}}} in c["env"]


def test_rayjob_never_copies_credentials_from_the_shell(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAABCDEFGHIJKLMNOP")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-that-must-not-leak")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    m = kuberay.render_rayjob(_spec("jobs/tiny-cpu.yaml", "checkpoint.storage_path=s3://b/p"))
    text = kuberay.to_yaml(m)
    assert "AKIA" not in text and "s3cr3t" not in text and "minio.internal" not in text
    assert_no_secret_values(m, text)


def test_rayjob_rejects_local_storage_unless_shared():
    spec = _spec("jobs/tiny-cpu.yaml")
    with pytest.raises(SpecError, match=r"checkpoint.storage_path='~/.zeroplane/storage' is a local folder.*s3://"):
        kuberay.render_rayjob(spec)
    shared = _spec("jobs/tiny-cpu.yaml", "checkpoint.storage_path=/mnt/shared/zp", "checkpoint.shared_filesystem=true")
    m = kuberay.render_rayjob(shared)
    validate(m)
    c = m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert c["envFrom"][0]["secretRef"]["optional"] is True


def test_k8s_name_is_a_dns1035_label():
    for raw in ("tiny-cpu", "9lives", "a" * 100, "pydoc-gpt-20260101-120000-ab12" + "-x" * 20):
        name = kuberay.k8s_name(raw)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47, name
    assert kuberay.k8s_name("a" * 60 + "1") != kuberay.k8s_name("a" * 60 + "2")


def test_rayservice_serves_the_promote_app_config():
    from zeroplane.serving import app_config

    rec = {"version": "v3", "uri": "s3://b/p/models/tiny/v3"}
    serve = {"autoscaling": {"min_replicas": 2, "max_replicas": 5}, "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}
    m = kuberay.render_rayservice("tiny", rec, "s3://b/p", serve)
    validate(m)
    cfg = yaml.safe_load(m["spec"]["serveConfigV2"])
    assert cfg["applications"] == [app_config("tiny", rec, "s3://b/p", serve)]
    (group,) = m["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (2, 2, 5)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert m["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    with pytest.raises(SpecError, match="local folder"):
        kuberay.render_rayservice("tiny", {"version": "v1", "uri": "/tmp/x/models/tiny/v1"}, "/tmp/x", {})


def test_raycluster_sizes_and_autoscaling():
    m = kuberay.render_raycluster(name="team-a", workers=1, max_workers=4, worker_cpus=8, worker_gpus=2)
    validate(m)
    (group,) = m["spec"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 1, 4)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert m["spec"]["enableInTreeAutoscaling"] is True
    with pytest.raises(SpecError, match="max_workers=1 is below workers=2"):
        kuberay.render_raycluster(workers=2, max_workers=1)


def test_a_misspelt_field_fails_validation():
    m = kuberay.render_raycluster()
    m["spec"]["workerGroupSpecs"][0]["replica"] = 3
    with pytest.raises(AssertionError, match="replica"):
        validate(m)


# ---------------------------------------------------------------- CLI


def test_cli_render_json_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    runner = CliRunner()
    r = runner.invoke(main, ["render", "kuberay", "rayjob", "jobs/gpt2-124m-8xgpu-zero3.yaml", "-o", "json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    validate(m)
    assert re.fullmatch(r"gpt2-124m-8xgpu-zero3-\d{8}-\d{6}-[0-9a-f]{4}", m["spec"]["jobId"])  # unique like `submit`

    r = runner.invoke(main, ["render", "kuberay", "rayjob", "jobs/tiny-cpu.yaml"])
    assert r.exit_code == 2 and "local folder" in r.output and "Traceback" not in r.output

    r = runner.invoke(main, ["render", "kuberay", "raycluster", "--workers", "3", "--worker-gpus", "1"])
    assert r.exit_code == 0, r.output
    validate(yaml.safe_load(r.stdout))

    monkeypatch.setenv("ZEROPLANE_STORAGE", str(tmp_path))
    r = runner.invoke(main, ["render", "kuberay", "rayservice", "nope:v1"])
    assert r.exit_code == 1 and "no registered versions" in r.output
