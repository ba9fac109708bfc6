"""Run training jobs through the Ray Jobs API (``ray.job_submission.JobSubmissionClient``).

A zeroplane job is one Ray Job whose ``submission_id`` is the zeroplane job id; its entrypoint runs
:mod:`zeroplane.runtime.train.driver`. The resolved spec travels in the runtime environment
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


def new_job_id(name: str) -> str:
    """A unique job id ``<name>-<UTC yyyymmdd-hhmmss>-<4 hex>``."""
    return f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def build_request(spec: JobSpec, job_id: str) -> Dict[str, Any]:
    """The exact ``submit_job`` keyword arguments for ``spec`` (shown by ``--dry-run``).

    Secret environment values are included here but masked by :func:`redact` for display.
    """
    pkg = Path(__file__).resolve().parents[1]
    env = {"ZEROPLANE_SPEC_JSON": json.dumps(spec.model_dump(mode="json"), separators=(",", ":")),
           "ZEROPLANE_JOB_ID": job_id, "PYTHONUNBUFFERED": "1"}
    env.update({k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)})
    return {
        "entrypoint": ENTRYPOINT,
        "submission_id": job_id,
        "runtime_env": {
            "py_modules": [str(pkg)],
            "excludes": ["__pycache__", "*.pyc"],
            "env_vars": env,
        },
        "metadata": {"zeroplane": "train", "zeroplane_name": spec.name},
    }


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
        """Submit a request from :func:`build_request`; returns the job id."""
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
        """Ask Ray to stop the job and wait until it is terminal; returns the final status.

        Raises:
            ZeroplaneError: the job did not reach a terminal state within ``wait_s`` seconds.
        """
        if self.status(job_id) in TERMINAL:
            return self.status(job_id)
        self.client.stop_job(job_id)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            st = self.status(job_id)
            if st in TERMINAL:
                return st
            time.sleep(1.0)
        raise ZeroplaneError(f"job {job_id} did not stop within {wait_s:.0f}s (status {self.status(job_id)})")

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
        "name": (d.metadata or {}).get("zeroplane_name"),
        "status": str(getattr(d.status, "value", d.status)),
        "message": d.message,
        "start_time": d.start_time,
        "end_time": d.end_time,
        "driver_exit_code": getattr(d, "driver_exit_code", None),
    }


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
