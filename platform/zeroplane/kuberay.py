"""Render KubeRay (``ray.io/v1``) manifests: a RayJob per training job, a RayService per model version,
and a long-lived RayCluster.

Pure functions returning plain dicts (``yaml.safe_dump``-able); no ray/torch imports and no network.
The manifests carry no secret values, only references to Kubernetes Secrets:

* storage credentials (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optionally ``AWS_ENDPOINT_URL``,
  ``AWS_REGION``) come from the Secret ``zeroplane-s3`` through ``envFrom`` on every Ray pod;
* Ray token authentication: every Ray container (and the RayJob submitter) gets ``RAY_AUTH_MODE=token``
  and ``RAY_AUTH_TOKEN`` from key ``auth_token`` of the Secret ``zeroplane-ray-auth``.

The image must have zeroplane installed (the Jobs API path uploads the package with each job; a RayJob
does not): build one ``FROM rayproject/ray:<ray version>-py311`` (``-gpu`` for GPU jobs) that runs
``pip install torch`` and then ``pip install zeroplane`` (see ``manifests/README.md``).

``python -m zeroplane.kuberay --write manifests/`` regenerates the example manifests in ``manifests/``
(golden files compared by ``tests/unit/test_kuberay.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from . import layout
from .errors import SpecError
from .names import ENTRYPOINT
from .spec import JobSpec

API_VERSION = "ray.io/v1"
RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"
DEFAULT_GPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
STORAGE_SECRET = "zeroplane-s3"
AUTH_SECRET = "zeroplane-ray-auth"
AUTH_SECRET_KEY = "auth_token"
SERVE_PORT = 8000

#: KubeRay appends 6 characters to RayJob / RayService names for their RayCluster (max 53).
MAX_RAYJOB_NAME = 47
MAX_RAYCLUSTER_NAME = 53
_LABELS = {"app.kubernetes.io/managed-by": "zeroplane"}
_GPU = "nvidia.com/gpu"
#: Environment variables the Jobs API path forwards from the submitting shell; in Kubernetes they come
#: from the storage Secret instead, never from the machine that renders.
_FORWARDED_ENV = ("AWS_",)


# ---------------------------------------------------------------- helpers


def k8s_name(name: str, max_len: int = MAX_RAYJOB_NAME) -> str:
    """A DNS-1035 label (starts with a letter, ``[a-z0-9-]``, at most ``max_len`` chars) for ``name``.

    Names that are too long keep their head and get a 6-hex-digit hash of the whole name, so two long
    job ids that differ only at the end still map to different names.
    """
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "zeroplane"
    if not out[0].isalpha():
        out = "zp-" + out
    if len(out) > max_len:
        digest = hashlib.sha256(name.encode()).hexdigest()[:6]
        out = out[: max_len - 7].rstrip("-") + "-" + digest
    return out


def _cpu(n: float) -> str:
    """A Kubernetes CPU quantity: whole cores as ``"4"``, fractions in millicores (``"500m"``)."""
    if float(n).is_integer():
        return str(int(n))
    return f"{int(math.ceil(n * 1000))}m"


def _auth_env(auth_secret: str) -> List[Dict[str, Any]]:
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": auth_secret, "key": AUTH_SECRET_KEY}}},
    ]


def _env_from(storage_secret: Optional[str], optional: bool) -> List[Dict[str, Any]]:
    if not storage_secret:
        return []
    return [{"secretRef": {"name": storage_secret, "optional": optional}}]


def _container(name: str, image: str, cpu: float, memory: str, gpus: int, env: List[Dict[str, Any]],
               env_from: List[Dict[str, Any]], ports: Optional[List[Dict[str, Any]]] = None,
               shm: bool = False) -> Dict[str, Any]:
    resources: Dict[str, Any] = {"cpu": _cpu(cpu), "memory": memory}
    if gpus:
        resources[_GPU] = str(gpus)
    c: Dict[str, Any] = {"name": name, "image": image, "env": env}
    if env_from:
        c["envFrom"] = env_from
    if ports:
        c["ports"] = ports
    # Requests equal limits: Ray sizes the node from the limits and the pod gets Guaranteed QoS.
    c["resources"] = {"requests": dict(resources), "limits": dict(resources)}
    if shm:
        c["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    return c


def _pod(container: Dict[str, Any], gpus: int) -> Dict[str, Any]:
    spec: Dict[str, Any] = {"containers": [container]}
    if container.get("volumeMounts"):
        # NCCL and torch dataloaders use /dev/shm; the container default (64 MiB) is too small.
        spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if gpus:
        spec["tolerations"] = [{"key": _GPU, "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def _head_group(image: str, cpu: float, memory: str, env: List[Dict[str, Any]], env_from: List[Dict[str, Any]],
                serve: bool = False) -> Dict[str, Any]:
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}]
    if serve:
        ports.append({"containerPort": SERVE_PORT, "name": "serve"})
    return {
        # num-cpus 0: training workers and Serve replicas go to worker pods; the head keeps the GCS,
        # the dashboard, job drivers and the Serve controller.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": _pod(_container("ray-head", image, cpu, memory, 0, env, env_from, ports), 0),
    }


def _worker_group(group: str, image: str, replicas: int, min_replicas: int, max_replicas: int, cpu: float,
                  gpus: int, memory: str, env: List[Dict[str, Any]], env_from: List[Dict[str, Any]],
                  custom_resources: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    g: Dict[str, Any] = {
        "groupName": group,
        "replicas": replicas,
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "rayStartParams": {},
        "template": _pod(_container("ray-worker", image, cpu, memory, gpus, env, env_from, shm=True), gpus),
    }
    if custom_resources:
        g["resources"] = {k: f"{v:g}" for k, v in sorted(custom_resources.items())}
    return g


def _memory_for(cpus: float, memory: Optional[str]) -> str:
    return memory or f"{max(4, 4 * int(math.ceil(cpus)))}Gi"


def _metadata(name: str, namespace: Optional[str], labels: Dict[str, str]) -> Dict[str, Any]:
    md: Dict[str, Any] = {"name": name}
    if namespace:
        md["namespace"] = namespace
    md["labels"] = {**_LABELS, **labels}
    return md


def _check_shared_storage(storage_path: str, shared: bool, field: str) -> None:
    if storage_path.startswith("s3://") or shared:
        return
    raise SpecError(
        f"{field}={storage_path!r} is a local folder, which Kubernetes pods do not share; use "
        "s3://bucket/prefix (e.g. --set checkpoint.storage_path=s3://my-bucket/zeroplane), or mount one "
        "volume at that path on every pod and set checkpoint.shared_filesystem: true"
    )


# ---------------------------------------------------------------- RayJob


def render_rayjob(
    spec: JobSpec,
    job_id: Optional[str] = None,
    image: Optional[str] = None,
    namespace: Optional[str] = None,
    storage_secret: str = STORAGE_SECRET,
    auth_secret: str = AUTH_SECRET,
    ttl_seconds_after_finished: int = 600,
    head_cpu: float = 2,
    head_memory: str = "8Gi",
    worker_memory: Optional[str] = None,
) -> Dict[str, Any]:
    """A RayJob that runs ``spec`` on its own RayCluster, deleted when the job ends.

    The entrypoint and runtime environment mirror what ``zeroplane train submit`` sends through the
    Ray Jobs API (``ZEROPLANE_SPEC_JSON`` and ``ZEROPLANE_JOB_ID`` in ``runtimeEnvYAML``), except that
    the code comes from the image (no ``py_modules`` upload) and storage credentials come from the
    Secret ``storage_secret`` rather than from the rendering shell. One worker pod per Ray Train worker:
    CPU and ``nvidia.com/gpu`` from ``scaling.resources_per_worker``; other keys of it become Ray
    custom resources of the worker group.

    Args:
        spec: The validated job spec.
        job_id: Ray job id (``jobId``) and storage folder ``jobs/<job_id>``; default the spec name. The
            RayJob's name is this id as a DNS-1035 label of at most 47 characters.
        image: Container image with zeroplane installed; default ``rayproject/ray:2.60.0-py311`` (``-gpu``
            when ``scaling.use_gpu``).
        namespace: Kubernetes namespace; omitted (the ``kubectl`` context's) by default.
        storage_secret: Secret with the S3 credentials, mounted with ``envFrom``.
        auth_secret: Secret whose key ``auth_token`` holds the Ray auth token.
        ttl_seconds_after_finished: Seconds the finished RayJob (and its cluster) is kept (default 600).
        head_cpu: Head pod CPUs (default 2; the head runs no training worker).
        head_memory: Head pod memory quantity (default ``8Gi``; the driver tokenizes the data there).
        worker_memory: Worker pod memory quantity; default 4 GiB per CPU, at least ``4Gi``.

    Returns:
        The RayJob manifest as a dict.

    Raises:
        SpecError: ``checkpoint.storage_path`` is a local folder and ``checkpoint.shared_filesystem`` is
            false (pods do not share local disks).
    """
    from .backends.rayjobs import build_request

    ck = spec.checkpoint
    _check_shared_storage(ck.storage_path, ck.shared_filesystem, "checkpoint.storage_path")
    job_id = job_id or spec.name
    request = build_request(spec, job_id)
    env_vars = {k: v for k, v in request["runtime_env"]["env_vars"].items() if not k.startswith(_FORWARDED_ENV)}
    s = spec.scaling
    res = dict(s.resources_per_worker)
    gpus = int(math.ceil(res.pop("GPU", 1 if s.use_gpu else 0)))
    cpus = res.pop("CPU", 1)
    res.pop("memory", None)
    image = image or (DEFAULT_GPU_IMAGE if s.use_gpu else DEFAULT_IMAGE)
    env = _auth_env(auth_secret)
    env_from = _env_from(storage_secret, optional=not ck.storage_path.startswith("s3://"))
    name = k8s_name(job_id)
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": _metadata(name, namespace, {"zeroplane.io/job-name": spec.name}),
        "spec": {
            "entrypoint": ENTRYPOINT,
            "jobId": job_id,
            "metadata": dict(request["metadata"]),
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": env_vars}, sort_keys=True, width=1 << 20),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": ttl_seconds_after_finished,
            # Ray Train retries failed workers itself (failure.max_failures); a retried submission
            # would start a second driver for the same job id.
            "backoffLimit": 0,
            "submitterPodTemplate": {"spec": {
                "restartPolicy": "Never",
                # No command: KubeRay fills in `ray job submit ...`; the token comes from the Secret.
                "containers": [{"name": "ray-job-submitter", "image": image, "env": env,
                                "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                                              "limits": {"cpu": "1", "memory": "1Gi"}}}],
            }},
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": _head_group(image, head_cpu, head_memory, env, env_from),
                "workerGroupSpecs": [_worker_group(
                    "gpu-workers" if gpus else "workers", image, s.num_workers, s.num_workers, s.num_workers,
                    cpus, gpus, _memory_for(cpus, worker_memory), env, env_from, res)],
            },
        },
    }


# ---------------------------------------------------------------- RayService


def render_rayservice(
    model_name: str,
    version_record: Dict[str, Any],
    storage_uri: str,
    serve_defaults: Optional[Dict[str, Any]] = None,
    image: Optional[str] = None,
    namespace: Optional[str] = None,
    storage_secret: str = STORAGE_SECRET,
    auth_secret: str = AUTH_SECRET,
    overrides: Optional[Dict[str, Any]] = None,
    head_cpu: float = 2,
    head_memory: str = "8Gi",
    worker_cpus: Optional[float] = None,
    worker_memory: Optional[str] = None,
) -> Dict[str, Any]:
    """A RayService serving one registered model version (the same Serve application as ``promote``).

    ``serveConfigV2`` holds the application built by :func:`zeroplane.serving.app_config`. The worker
    group autoscales between the Serve autoscaling bounds (one replica per worker pod by default; the
    in-tree Ray autoscaler adds pods as Serve adds replicas).

    Args:
        model_name: Model (and Serve application) name; the RayService name is derived from it.
        version_record: Registry record with at least ``version`` and ``uri`` (``s3://…`` in practice).
        storage_uri: Storage root holding the registry and the serving API keys.
        serve_defaults: The job spec's ``serve`` section (default: ServeSpec defaults).
        image: Image with zeroplane installed (default ``rayproject/ray:2.60.0-py311``, ``-gpu`` when the
            replicas ask for GPUs).
        namespace: Kubernetes namespace (default: omitted).
        storage_secret: Secret with the S3 credentials (``envFrom``).
        auth_secret: Secret whose key ``auth_token`` holds the Ray auth token.
        overrides: ``autoscaling`` / ``auth`` / ``ray_actor_options`` overrides, as for ``promote``.
        head_cpu: Head pod CPUs (default 2).
        head_memory: Head pod memory (default ``8Gi``).
        worker_cpus: CPUs per worker pod; default the replica's ``num_cpus`` rounded up to whole cores
            (at least 1) plus one for Ray's own processes.
        worker_memory: Memory per worker pod; default 4 GiB per CPU.

    Returns:
        The RayService manifest as a dict.

    Raises:
        SpecError: the storage or the version's URI is a local folder (pods cannot read it).
    """
    from .serving import app_config

    _check_shared_storage(storage_uri, False, "storage")
    _check_shared_storage(str(version_record.get("uri", "")), False, "version uri")
    app = app_config(model_name, version_record, storage_uri, serve_defaults or {}, overrides)
    dep = app["deployments"][0]
    actor = dep["ray_actor_options"]
    gpus = int(math.ceil(float(actor.get("num_gpus", 0) or 0)))
    cpus = worker_cpus or max(1, math.ceil(float(actor.get("num_cpus", 1) or 1))) + 1
    scaling = dep["autoscaling_config"]
    image = image or (DEFAULT_GPU_IMAGE if gpus else DEFAULT_IMAGE)
    env = _auth_env(auth_secret)
    env_from = _env_from(storage_secret, optional=False)
    serve_config = {"applications": [app]}
    name = k8s_name(model_name)
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": _metadata(name, namespace, {"zeroplane.io/model": model_name,
                                                 "zeroplane.io/version": str(version_record["version"])}),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False, width=1 << 20),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "headGroupSpec": _head_group(image, head_cpu, head_memory, env, env_from, serve=True),
                "workerGroupSpecs": [_worker_group(
                    "serve-gpu" if gpus else "serve", image, max(1, scaling["min_replicas"]),
                    max(1, scaling["min_replicas"]), max(1, scaling["max_replicas"]), cpus, gpus,
                    _memory_for(cpus, worker_memory), env, env_from)],
            },
        },
    }


# ---------------------------------------------------------------- RayCluster


def render_raycluster(
    name: str = "zeroplane",
    image: Optional[str] = None,
    workers: int = 2,
    max_workers: Optional[int] = None,
    worker_cpus: float = 4,
    worker_gpus: int = 0,
    worker_memory: Optional[str] = None,
    head_cpu: float = 2,
    head_memory: str = "8Gi",
    namespace: Optional[str] = None,
    storage_secret: Optional[str] = STORAGE_SECRET,
    auth_secret: str = AUTH_SECRET,
) -> Dict[str, Any]:
    """A long-lived RayCluster that ``zeroplane`` talks to like any other cluster (``--address``).

    ``kubectl port-forward svc/<name>-head-svc 8265:8265 8000:8000`` then
    ``zeroplane train submit ... --address http://127.0.0.1:8265``. With ``max_workers > workers`` the
    in-tree Ray autoscaler adds worker pods up to ``max_workers``.

    Args:
        name: RayCluster name (made a DNS-1035 label of at most 53 characters).
        image: Image with zeroplane installed (default ``rayproject/ray:2.60.0-py311``, ``-gpu`` when
            ``worker_gpus > 0``).
        workers: Worker pods to start with (default 2; also the autoscaling minimum).
        max_workers: Autoscaling maximum (default ``workers``: no autoscaling).
        worker_cpus: CPUs per worker pod (default 4).
        worker_gpus: GPUs (``nvidia.com/gpu``) per worker pod (default 0).
        worker_memory: Memory per worker pod; default 4 GiB per CPU.
        head_cpu: Head pod CPUs (default 2).
        head_memory: Head pod memory (default ``8Gi``).
        namespace: Kubernetes namespace (default: omitted).
        storage_secret: Secret with S3 credentials mounted as optional ``envFrom`` (None: none).
        auth_secret: Secret whose key ``auth_token`` holds the Ray auth token.

    Returns:
        The RayCluster manifest as a dict.

    Raises:
        SpecError: a negative count, or ``max_workers < workers``.
    """
    if workers < 0 or worker_gpus < 0 or worker_cpus <= 0:
        raise SpecError(f"workers={workers}, worker_cpus={worker_cpus:g}, worker_gpus={worker_gpus}: "
                        "counts must be >= 0 (CPUs > 0)")
    max_workers = workers if max_workers is None else max_workers
    image = image or (DEFAULT_GPU_IMAGE if worker_gpus else DEFAULT_IMAGE)
    if max_workers < workers:
        raise SpecError(f"max_workers={max_workers} is below workers={workers}; raise --max-workers")
    env = _auth_env(auth_secret)
    env_from = _env_from(storage_secret, optional=True)
    spec: Dict[str, Any] = {"rayVersion": RAY_VERSION}
    if max_workers > workers:
        spec["enableInTreeAutoscaling"] = True
    spec["headGroupSpec"] = _head_group(image, head_cpu, head_memory, env, env_from, serve=True)
    spec["workerGroupSpecs"] = [_worker_group(
        "gpu-workers" if worker_gpus else "workers", image, workers, workers, max_workers, worker_cpus,
        worker_gpus, _memory_for(worker_cpus, worker_memory), env, env_from)]
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": _metadata(k8s_name(name, MAX_RAYCLUSTER_NAME), namespace, {}),
        "spec": spec,
    }


# ---------------------------------------------------------------- output


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (``serveConfigV2``, ``runtimeEnvYAML``); no anchors/aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(manifest: Dict[str, Any]) -> str:
    """A manifest as YAML (keys in insertion order, multi-line strings as ``|`` blocks)."""
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=1 << 20, allow_unicode=True)


def to_json(manifest: Dict[str, Any]) -> str:
    """A manifest as indented JSON (``kubectl apply -f`` reads JSON too)."""
    return json.dumps(manifest, indent=2) + "\n"


# ---------------------------------------------------------------- example manifests (golden files)

#: The example model version rendered into ``manifests/pydoc-gpt.rayservice.yaml``.
EXAMPLE_STORAGE = "s3://zeroplane-example/storage"
EXAMPLE_VERSION = {"name": "pydoc-gpt", "version": "v1",
                   "uri": f"{EXAMPLE_STORAGE}/{layout.version_dir('pydoc-gpt', 'v1')}"}


def example_manifests(repo: Path) -> Dict[str, str]:
    """The example manifests of ``manifests/``: ``{file name: YAML text}``.

    Every job spec in ``<repo>/jobs`` becomes ``<stem>.rayjob.yaml`` (job id = spec name; a local
    storage path is replaced by ``s3://zeroplane-example/storage``), plus one RayService for
    :data:`EXAMPLE_VERSION` with the demo job's serving defaults and one RayCluster. Each file starts
    with a comment naming the command that renders it.
    """
    from .spec import load_spec

    out: Dict[str, str] = {}
    demo_serve: Dict[str, Any] = {}
    for path in sorted((repo / "jobs").glob("*.yaml")):
        spec = load_spec(path)
        cmd = f"zeroplane render kuberay rayjob jobs/{path.name} --job-id {spec.name}"
        if not spec.checkpoint.storage_path.startswith("s3://"):
            override = f"checkpoint.storage_path={EXAMPLE_STORAGE}"
            spec = load_spec(path, [override])
            cmd += f" --set {override}"
        if spec.name == EXAMPLE_VERSION["name"]:
            demo_serve = spec.serve.model_dump(mode="json")
        out[f"{path.stem}.rayjob.yaml"] = _header(cmd) + to_yaml(render_rayjob(spec, job_id=spec.name))
    out["pydoc-gpt.rayservice.yaml"] = _header(
        "python -m zeroplane.kuberay --write manifests/` from the example version record EXAMPLE_VERSION in "
        "zeroplane/kuberay.py; for a registered version: `zeroplane render kuberay rayservice pydoc-gpt:v1 "
        "--storage s3://BUCKET/PREFIX") + to_yaml(
        render_rayservice(EXAMPLE_VERSION["name"], EXAMPLE_VERSION, EXAMPLE_STORAGE, demo_serve))
    out["raycluster.yaml"] = _header("zeroplane render kuberay raycluster") + to_yaml(render_raycluster())
    return out


HEADER_PREFIX = "# Rendered by `"


def _header(how: str) -> str:
    return (f"{HEADER_PREFIX}{how}`; regenerate all examples with `python -m zeroplane.kuberay --write manifests/`.\n"
            "# Needs the Secrets zeroplane-s3 and zeroplane-ray-auth and an image with zeroplane installed: "
            "see manifests/README.md.\n")


def write_examples(out_dir: Path, repo: Path) -> List[Path]:
    """Write :func:`example_manifests` into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, text in example_manifests(repo).items():
        p = out_dir / fname
        p.write_text(text)
        written.append(p)
    return written


def _main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m zeroplane.kuberay",
                                 description="Regenerate the example KubeRay manifests from jobs/*.yaml.")
    ap.add_argument("--write", metavar="DIR", required=True, help="output folder, e.g. manifests/")
    ap.add_argument("--repo", default=".", help="repository root holding jobs/ (default: .)")
    args = ap.parse_args(argv)
    for p in write_examples(Path(args.write), Path(args.repo)):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
