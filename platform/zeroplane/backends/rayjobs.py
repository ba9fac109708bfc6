"""Run training jobs through the Ray Jobs API (``ray.job_submission.JobSubmissionClient``).

A zeroplane job is one Ray Job whose ``submission_id`` is the zeroplane job id; its entrypoint runs
:mod:`zeroplane.runtime.train.driver`. A resumed job (``zeroplane train resume``) is a further Ray Job
``<job_id>-r<k>`` that runs under the original job id (``ZEROPLANE_JOB_ID``, metadata
``zeroplane_job_id``): same run folder, same checkpoints. The resolved spec travels in the runtime environment
(``ZEROPLANE_SPEC_JSON``) and the zeroplane package itself as a ``py_modules`` upload, so the cluster
runs exactly the code that submitted the job.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import NotFoundError, ZeroplaneError
from ..spec import JobSpec

ENTRYPOINT = "python -m zeroplane.runtime.train.driver"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
#: Environment variables passed through to the job when set where the CLI runs (never printed).
PASSTHROUGH_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                   "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
#: Defaults for Ray's own settings in the job (the CLI's environment overrides them). Ray Train's controller
#: polls the workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray's default 2 s) and only notices that
#: training ended (or a worker died) at a poll, and shutting the worker group down waits on polls too; 0.5 s
#: cut "last step -> job ended" from 4.1 s to 1.9 s (mean of 3 two-step demo jobs each, interleaved, 2-core
#: machine; 2.1 s median in bench/train_bench.py's jobs), and a poll costs each worker one small RPC.
RAY_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def new_job_id(name: str) -> str:
    """A unique job id ``<name>-<UTC yyyymmdd-hhmmss>-<4 hex>``."""
    return f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def build_request(spec: JobSpec, job_id: str, submission_id: Optional[str] = None) -> Dict[str, Any]:
    """The exact ``submit_job`` keyword arguments for ``spec`` (shown by ``--dry-run``).

    Args:
        spec: the resolved job spec.
        job_id: the zeroplane job id (run folder ``jobs/<job_id>`` in storage).
        submission_id: the Ray Job id; default ``job_id`` (a resume passes ``<job_id>-r<k>``).

    Secret environment values are included here but masked by :func:`redact` for display.
    """
    pkg = Path(__file__).resolve().parents[1]
    env = {"ZEROPLANE_SPEC_JSON": json.dumps(spec.model_dump(mode="json"), separators=(",", ":")),
           "ZEROPLANE_JOB_ID": job_id, "PYTHONUNBUFFERED": "1"}
    env.update({k: os.environ.get(k) or v for k, v in RAY_ENV_DEFAULTS.items()})
    env.update({k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)})
    return {
        "entrypoint": ENTRYPOINT,
        "submission_id": submission_id or job_id,
        "runtime_env": {
            "py_modules": [str(pkg)],
            "excludes": list(UPLOAD_EXCLUDES),
            "env_vars": env,
        },
        "metadata": {"zeroplane": "train", "zeroplane_name": spec.name,
                     **({"zeroplane_job_id": job_id} if submission_id and submission_id != job_id else {})},
    }


#: What ``build_request`` leaves out of the ``py_modules`` upload (gitignore-style patterns, as Ray reads them).
UPLOAD_EXCLUDES = ("__pycache__", "*.pyc")
#: Ray's own cap on one runtime-env package (``GCS_STORAGE_MAX_SIZE``, 512 MiB); zeroplane refuses earlier.
DEFAULT_UPLOAD_LIMIT_MB = 100.0


def upload_size(request: Dict[str, Any]) -> int:
    """Bytes of the files a request's ``py_modules`` would upload (excludes applied like Ray: by name)."""
    import fnmatch

    total = 0
    for mod in request.get("runtime_env", {}).get("py_modules", []):
        for dirpath, dirnames, filenames in os.walk(mod):
            dirnames[:] = [d for d in dirnames if not any(fnmatch.fnmatch(d, p) for p in UPLOAD_EXCLUDES)]
            for f in filenames:
                if not any(fnmatch.fnmatch(f, p) for p in UPLOAD_EXCLUDES):
                    total += os.path.getsize(os.path.join(dirpath, f))
    return total


def check_upload_size(request: Dict[str, Any], limit_mb: Optional[float] = None) -> int:
    """Refuse a request whose upload is over ``limit_mb`` (default ``$ZEROPLANE_MAX_UPLOAD_MB`` or
    ``DEFAULT_UPLOAD_LIMIT_MB``); returns the size in bytes.

    Raises:
        ZeroplaneError: the size, the limit and what to do.
    """
    if limit_mb is None:
        limit_mb = float(os.environ.get("ZEROPLANE_MAX_UPLOAD_MB") or DEFAULT_UPLOAD_LIMIT_MB)
    size = upload_size(request)
    if size > limit_mb * 2**20:
        mods = ", ".join(request["runtime_env"]["py_modules"])
        raise ZeroplaneError(
            f"the job would upload {size / 2**20:.1f} MiB ({mods}), over the {limit_mb:g} MiB limit; remove large "
            "files from the package or raise ZEROPLANE_MAX_UPLOAD_MB (Ray's own cap is 512 MiB)"
        )
    return size


def redact(request: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a request with secret environment values replaced by ``***``."""
    out = json.loads(json.dumps(request))
    env = out.get("runtime_env", {}).get("env_vars", {})
    for k in list(env):
        if k in SECRET_ENV:
            env[k] = "***"
    return out


class RayJobsBackend:
    """Submit, follow and stop zeroplane jobs on one Ray cluster through its dashboard URL."""

    def __init__(self, dashboard_url: str, headers: Optional[Dict[str, str]] = None) -> None:
        self.dashboard_url = dashboard_url
        self._headers = headers
        self._client = None

    @property
    def client(self):
        """The ``JobSubmissionClient`` (created on first use).

        Raises:
            ZeroplaneError: the dashboard does not answer.
        """
        if self._client is None:
            import logging

            from ray.job_submission import JobSubmissionClient

            for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
                logging.getLogger(name).setLevel(logging.WARNING)  # per-submit upload chatter

            try:
                self._client = JobSubmissionClient(self.dashboard_url, headers=self._headers)
            except Exception as e:
                raise ZeroplaneError(f"cannot reach the Ray Jobs API at {self.dashboard_url}: {_first_line(e)}") from None
        return self._client

    def submit(self, request: Dict[str, Any]) -> str:
        """Submit a request from :func:`build_request` after checking its upload size; returns the job id.

        Raises:
            ZeroplaneError: the upload is too large, or the submission failed.
        """
        check_upload_size(request)
        try:
            return self.client.submit_job(**request)
        except Exception as e:
            raise ZeroplaneError(f"job submission to {self.dashboard_url} failed: {_first_line(e)}") from None

    def info(self, job_id: str) -> Dict[str, Any]:
        """Ray's JobDetails for ``job_id`` as a dict.

        Raises:
            NotFoundError: no such job on this cluster.
        """
        try:
            d = self.client.get_job_info(job_id)
        except Exception as e:
            if "404" in str(e) or "does not exist" in str(e) or "not found" in str(e).lower():
                raise NotFoundError(f"job {job_id!r} not found on {self.dashboard_url}; `zeroplane train list` shows jobs") from None
            raise ZeroplaneError(f"cannot get job {job_id!r}: {_first_line(e)}") from None
        return _details(d)

    def status(self, job_id: str) -> str:
        """PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED."""
        return self.info(job_id)["status"]

    def logs(self, job_id: str) -> str:
        """The job's whole log so far (driver output, including worker lines Ray forwards)."""
        self.info(job_id)
        return self.client.get_job_logs(job_id)

    def stop(self, job_id: str, wait_s: float = 120.0) -> str:
        """Stop the job and return its final status once its driver AND its actors are gone.

        Ray marks a job STOPPED when its driver process has been killed; the Ray Train controller and
        worker actors of the job are torn down after that. This waits (within the same ``wait_s``) until
        Ray's state API lists none of the job's actors as alive, so a STOPPED answer means nothing of
        the job still runs or holds resources.

        Args:
            job_id: Ray submission id.
            wait_s: overall seconds to wait (default 120).

        Raises:
            ZeroplaneError: the job, or one of its actors, was still there after ``wait_s`` seconds.
        """
        deadline = time.monotonic() + wait_s
        info = self.info(job_id)
        if info["status"] not in TERMINAL:
            self.client.stop_job(job_id)
            while (info := self.info(job_id))["status"] not in TERMINAL:
                if time.monotonic() > deadline:
                    raise ZeroplaneError(f"job {job_id} did not stop within {wait_s:.0f}s (status {info['status']})")
                time.sleep(0.5)
        ray_job = info.get("ray_job_id")
        while ray_job:
            alive = self.live_actors(ray_job)
            if not alive:
                break
            if time.monotonic() > deadline:
                raise ZeroplaneError(f"job {job_id} is {info['status']} but {len(alive)} of its actors are still "
                                     f"alive after {wait_s:.0f}s: {', '.join(sorted(set(alive)))[:200]}")
            time.sleep(0.5)
        return info["status"]

    def live_actors(self, ray_job_id: str) -> List[str]:
        """Class names of the actors of a Ray job (hex job id) that are not DEAD (Ray state API).

        Detached actors are left out: they belong to the cluster, not the job (Ray Train and Ray Data
        leave cluster-wide helpers such as ``_AutoscalingCoordinatorActor`` running on purpose).
        """
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard_url, filters=[("job_id", "=", ray_job_id)], limit=10_000,
                             detail=True, raise_on_missing_output=False)
        return [a.class_name for a in actors if a.state != "DEAD" and not a.is_detached]

    def list(self) -> List[Dict[str, Any]]:
        """zeroplane's jobs on this cluster, newest first."""
        try:
            jobs = self.client.list_jobs()
        except Exception as e:
            raise ZeroplaneError(f"cannot list jobs at {self.dashboard_url}: {_first_line(e)}") from None
        out = [_details(j) for j in jobs if (j.metadata or {}).get("zeroplane") == "train"]
        return sorted(out, key=lambda d: d.get("start_time") or 0, reverse=True)


def _details(d) -> Dict[str, Any]:
    return {
        "job_id": d.submission_id,
        "zeroplane_job_id": (d.metadata or {}).get("zeroplane_job_id") or d.submission_id,
        "name": (d.metadata or {}).get("zeroplane_name"),
        "status": str(getattr(d.status, "value", d.status)),
        "message": d.message,
        "start_time": d.start_time,
        "end_time": d.end_time,
        "driver_exit_code": getattr(d, "driver_exit_code", None),
        "ray_job_id": getattr(d, "job_id", None),
        "driver_pid": int(d.driver_info.pid) if getattr(d, "driver_info", None) else None,
    }


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
