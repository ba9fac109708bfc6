"""``zeroplane render kuberay rayjob|rayservice|raycluster``: print KubeRay manifests for ``kubectl apply``.

Rendering needs no cluster (``rayservice`` reads the model registry from the storage). The manifests
reference the Kubernetes Secrets ``zeroplane-s3`` (storage credentials) and ``zeroplane-ray-auth`` (Ray
token) and never contain secret values; see ``manifests/README.md``.
"""

from __future__ import annotations

from typing import Any, Dict

import click

from .context import pass_zp
from .options import Finite, NO_AUTH, SET, STORAGE

IMAGE_HELP = ("Container image with zeroplane installed (default rayproject/ray:2.60.0-py311, -gpu for GPU "
              "workers; build one FROM it with `pip install torch zeroplane`).")
_FORMAT = click.option("-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True,
                       help="Manifest format.")
_NAMESPACE = click.option("--namespace", "-n", default=None, help="Kubernetes namespace (default: kubectl's).")
_STORAGE_SECRET = click.option("--storage-secret", default="zeroplane-s3", show_default=True,
                               help="Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (+ AWS_ENDPOINT_URL).")
_AUTH_SECRET = click.option("--auth-secret", default="zeroplane-ray-auth", show_default=True,
                            help="Secret whose key auth_token holds the Ray auth token.")


def _K8S_OPTIONS(f):  # noqa: N802  (an option set, named like the single options)
    """--namespace, --storage-secret, --auth-secret and -o/--output: the options of every manifest."""
    return _NAMESPACE(_STORAGE_SECRET(_AUTH_SECRET(_FORMAT(f))))


def _emit(manifest: Dict[str, Any], output: str) -> None:
    from ..sdk import manifest_text

    click.echo(manifest_text(manifest, output), nl=False)


@click.group("render")
def render() -> None:
    """Render deployment manifests from job specs and model versions (prints; applies nothing)."""


@render.group("kuberay")
def kuberay() -> None:
    """KubeRay ray.io/v1 manifests: RayJob (training), RayService (serving), RayCluster."""


@kuberay.command("rayjob")
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=False))
@SET
@click.option("--job-id", default=None, help="Ray job id and storage folder jobs/<id> (default: <name>-<UTC time>-<hex>, "
                                              "as `train submit`; a fixed id resumes from its checkpoints).")
@click.option("--image", default=None, help=IMAGE_HELP)
@click.option("--ttl-s", "ttl_s", type=click.IntRange(0), default=600, show_default=True,
              help="Seconds the finished RayJob and its cluster are kept.")
@click.option("--worker-memory", default=None, help="Worker pod memory, e.g. 64Gi (default 4Gi per CPU).")
@_K8S_OPTIONS
def rayjob(spec_file, overrides, job_id, image, ttl_s, worker_memory, namespace, storage_secret, auth_secret,
           output) -> None:
    """A RayJob running the job spec SPEC on its own RayCluster (one worker pod per Ray Train worker)."""
    from ..sdk import load_spec, render_rayjob

    spec = load_spec(spec_file, list(overrides))
    _emit(render_rayjob(spec, job_id=job_id, image=image, namespace=namespace,
                        storage_secret=storage_secret, auth_secret=auth_secret, ttl_seconds_after_finished=ttl_s,
                        worker_memory=worker_memory), output)


@kuberay.command("rayservice")
@click.argument("ref", metavar="MODEL[:VERSION]")
@STORAGE
@click.option("--image", default=None, help=IMAGE_HELP)
@click.option("--min-replicas", type=click.IntRange(0), default=None, help="Override serve.autoscaling.min_replicas.")
@click.option("--max-replicas", type=click.IntRange(1), default=None, help="Override serve.autoscaling.max_replicas.")
@NO_AUTH
@_K8S_OPTIONS
@pass_zp
def rayservice(zp, ref, storage, image, min_replicas, max_replicas, no_auth, namespace, storage_secret, auth_secret,
               output) -> None:
    """A RayService serving a registered version MODEL[:vN] (newest by default), as `promote` deploys it."""
    from ..sdk import render_rayservice

    overrides: Dict[str, Any] = {"autoscaling": {k: v for k, v in {"min_replicas": min_replicas,
                                                                    "max_replicas": max_replicas}.items()
                                                 if v is not None}}
    if no_auth:
        overrides["auth"] = False
    _emit(render_rayservice(ref, storage, profile=zp.profile, image=image, namespace=namespace,
                            storage_secret=storage_secret, auth_secret=auth_secret, overrides=overrides), output)


@kuberay.command("raycluster")
@click.option("--name", default="zeroplane", show_default=True, help="RayCluster name.")
@click.option("--image", default=None, help=IMAGE_HELP)
@click.option("--workers", type=click.IntRange(0), default=2, show_default=True, help="Worker pods.")
@click.option("--max-workers", type=click.IntRange(0), default=None,
              help="Autoscale up to this many worker pods (default: --workers, no autoscaling).")
@click.option("--worker-cpus", type=Finite(min=0, min_open=True), default=4, show_default=True,
              help="CPUs per worker pod.")
@click.option("--worker-gpus", type=click.IntRange(0), default=0, show_default=True,
              help="GPUs (nvidia.com/gpu) per worker pod.")
@click.option("--worker-memory", default=None, help="Memory per worker pod, e.g. 32Gi (default 4Gi per CPU).")
@_K8S_OPTIONS
def raycluster(name, image, workers, max_workers, worker_cpus, worker_gpus, worker_memory, namespace,
               storage_secret, auth_secret, output) -> None:
    """A long-lived RayCluster; port-forward its head and use it with --address like any Ray cluster."""
    from ..sdk import render_raycluster

    _emit(render_raycluster(name=name, image=image,
                            workers=workers, max_workers=max_workers, worker_cpus=worker_cpus,
                            worker_gpus=worker_gpus, worker_memory=worker_memory, namespace=namespace,
                            storage_secret=storage_secret, auth_secret=auth_secret), output)
