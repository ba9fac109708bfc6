"""Run training jobs through the Ray Jobs API (``ray.job_submission.JobSubmissionClient``).

A zeroplane job is one Ray Job whose ``submission_id`` is the zeroplane job id; its entrypoint runs
:mod:`zeroplane.runtime.train.driver`. A resumed job (``zeroplane train resume``) is a further Ray Job
``<job_id>-r<k>`` that runs under the original job id (``ZEROPLANE_JOB_ID``, metadata
``zeroplane_job_id``): same run folder, same checkpoints. The resolved spec travels in the runtime environment
(``ZEROPLANE_SPEC_JSON``) and the zeroplane package itself as a ``py_modules`` upload, so the cluster
runs exactly the code that submitted the job.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

from .. import layout, names
from ..errors import NotFoundError, SpecError, ZeroplaneError, first_line
from ..spec import JobSpec
from ..storage import Storage, storage_error
from .base import TERMINAL, Backend, JobInfo, JobRequest, PreflightCheck

if TYPE_CHECKING:
    from ..cluster import ClusterInfo

ENTRYPOINT = names.ENTRYPOINT
#: Environment variables passed through to the job when set where the CLI runs: where S3 is, never who.
PASSTHROUGH_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
#: Credentials. A job request is readable by every holder of the cluster token (``ray job list``, the Jobs
#: API, the dashboard), so these never travel in one unless the submitter opts in (``pass_credentials``);
#: the nodes use their own (instance profile / workload identity, the environment the cluster was started
#: with, the Kubernetes Secret of the rendered manifests). Masked wherever a request is shown.
SECRET_ENV = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})
#: Printed when credentials are passed on purpose.
CREDENTIALS_WARNING = ("WARNING: --pass-credentials: the AWS credentials of this shell travel in the job request, "
                       "where every holder of the cluster's token can read them (ray job list, the Jobs API)")
#: Defaults for Ray's own settings in the job (the CLI's environment overrides them). Ray Train's controller
#: polls the workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray's default 2 s) and only notices that
#: training ended (or a worker died) at a poll, and shutting the worker group down waits on polls too; 0.5 s
#: cut "last step -> job ended" from 4.1 s to 1.9 s (mean of 3 two-step demo jobs each, interleaved, 2-core
#: machine; 2.1 s median in bench/train_bench.py's jobs), and a poll costs each worker one small RPC.
RAY_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
#: What the ``py_modules`` upload leaves out (gitignore-style patterns, as Ray reads them).
UPLOAD_EXCLUDES = ("__pycache__", "*.pyc")
#: Ray's own cap on one runtime-env package (``GCS_STORAGE_MAX_SIZE``) is 512 MiB; zeroplane refuses earlier.
DEFAULT_UPLOAD_LIMIT_MB = 100.0


def new_job_id(name: str) -> str:
    """A unique job id ``<name>-<UTC yyyymmdd-hhmmss>-<4 hex>``."""
    return f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def build_request(spec: JobSpec, job_id: str, submission_id: Optional[str] = None,
                  pass_credentials: bool = False) -> Dict[str, Any]:
    """The ``submit_job`` keyword arguments for ``spec``, without any preflight (see
    :meth:`RayJobsBackend.dryrun` for the checked, typed request).

    Args:
        spec: the resolved job spec.
        job_id: the zeroplane job id (run folder ``jobs/<job_id>`` in storage).
        submission_id: the Ray Job id; default ``job_id`` (a resume passes ``<job_id>-r<k>``).
        pass_credentials: also put this process's ``SECRET_ENV`` values into the job's environment
            (default False: see ``SECRET_ENV``); they are masked by :func:`redact` for display.
    """
    pkg = Path(__file__).resolve().parents[1]
    env = {names.ENV_SPEC_JSON: json.dumps(spec.model_dump(mode="json"), separators=(",", ":")),
           names.ENV_JOB_ID: job_id, "PYTHONUNBUFFERED": "1"}
    env.update({k: os.environ.get(k) or v for k, v in RAY_ENV_DEFAULTS.items()})
    env.update({k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)})
    if pass_credentials:
        env.update({k: os.environ[k] for k in sorted(SECRET_ENV) if os.environ.get(k)})
    metadata = {names.META_KIND: names.META_KIND_TRAIN, names.META_NAME: spec.name}
    if submission_id and submission_id != job_id:
        metadata[names.META_JOB_ID] = job_id
    return {
        "entrypoint": ENTRYPOINT,
        "submission_id": submission_id or job_id,
        "runtime_env": {"py_modules": [str(pkg)], "excludes": list(UPLOAD_EXCLUDES), "env_vars": env},
        "metadata": metadata,
    }


def redact(request: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a :func:`build_request` dict with secret environment values replaced by ``***``."""
    out = json.loads(json.dumps(request))
    env = out.get("runtime_env", {}).get("env_vars", {})
    for k in env:
        if k in SECRET_ENV:
            env[k] = "***"
    return out


def upload_size(request: Dict[str, Any]) -> int:
    """Bytes of the files a request's ``py_modules`` would upload (excludes applied like Ray: by name)."""
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
        SpecError: ``$ZEROPLANE_MAX_UPLOAD_MB`` is not a positive number.
    """
    if limit_mb is None:
        raw = os.environ.get(names.ENV_MAX_UPLOAD_MB) or str(DEFAULT_UPLOAD_LIMIT_MB)
        try:
            limit_mb = float(raw)
        except ValueError:
            limit_mb = float("nan")
        if not 0 < limit_mb < float("inf"):
            raise SpecError(f"{names.ENV_MAX_UPLOAD_MB}={raw!r}: give a number of MiB above 0, e.g. 200")
    size = upload_size(request)
    if size > limit_mb * 2**20:
        mods = ", ".join(request["runtime_env"]["py_modules"])
        raise ZeroplaneError(
            f"the job would upload {size / 2**20:.1f} MiB ({mods}), over the {limit_mb:g} MiB limit; remove large "
            f"files from the package or raise {names.ENV_MAX_UPLOAD_MB} (Ray's own cap is 512 MiB)"
        )
    return size


def preflight_storage(storage: Storage) -> None:
    """Check that the storage root is writable by writing and deleting a small file.

    Raises:
        ZeroplaneError: one line naming the storage (for S3: bucket and endpoint) and the error; never
            the credentials.
    """
    probe = storage.path(f"{layout.PREFLIGHT_FILE}-{secrets.token_hex(4)}")  # one per call: submits run at once
    try:
        storage.write_bytes(probe, b"ok")
        storage.fs.delete_file(probe)
    except Exception as e:
        raise ZeroplaneError(storage_error(storage, "is not writable", e)) from None


def check_fits(spec: JobSpec, storage: Storage, nodes: List[Dict[str, Any]], where: str) -> None:
    """Refuse a job the cluster as it is now cannot run.

    * A node-local storage folder when the cluster has more than one alive node (without
      ``checkpoint.shared_filesystem``): Ray Train workers on other nodes would persist their shards to
      their own disks, so no node would hold a complete checkpoint.
    * One worker's CPUs/GPUs above every node's, or all workers' above the cluster's total: Ray would keep
      the job waiting for workers without end. An autoscaling cluster that will grow: set
      ``ZEROPLANE_SKIP_RESOURCE_CHECK=1``.

    Args:
        spec: the job.
        storage: its checkpoint storage.
        nodes: alive nodes, ``[{"cpus", "gpus", ...}]`` (from ``cluster_status``); empty: nothing is refused.
        where: the cluster, for messages.

    Raises:
        ZeroplaneError: naming the field, what the job needs and what the cluster has.
    """
    if storage.is_local and not spec.checkpoint.shared_filesystem and len(nodes) > 1:
        raise ZeroplaneError(
            f"checkpoint.storage_path {storage.uri} is a local folder but {where} has {len(nodes)} nodes, whose "
            "workers would each write to their own disk; use s3://bucket/prefix, or set "
            "checkpoint.shared_filesystem: true if that path is one shared mount (NFS) on every node")
    if not nodes or os.environ.get(names.ENV_SKIP_RESOURCE_CHECK) == "1":
        return
    s = spec.scaling
    per_worker = {"CPU": float(s.resources_per_worker.get("CPU", 1)),
                  "GPU": float(s.resources_per_worker.get("GPU", 1 if s.use_gpu else 0))}
    hint = f"(or {names.ENV_SKIP_RESOURCE_CHECK}=1 for an autoscaling cluster)"
    for kind, key in (("CPU", "cpus"), ("GPU", "gpus")):
        need = per_worker[kind]
        if need <= 0:
            continue
        biggest = max(float(n.get(key) or 0) for n in nodes)
        total = sum(float(n.get(key) or 0) for n in nodes)
        if need > biggest:
            raise ZeroplaneError(f"scaling.resources_per_worker.{kind}={need:g}: no node of {where} has that many "
                                 f"(largest: {biggest:g}); lower it {hint}")
        if need * s.num_workers > total:
            raise ZeroplaneError(
                f"scaling.num_workers={s.num_workers} x {need:g} {kind} = {need * s.num_workers:g} {kind}, but {where} "
                f"has {total:g}; lower scaling.num_workers or resources_per_worker {hint}")


class RayJobsBackend(Backend):
    """Submit, follow and stop zeroplane jobs on one Ray cluster through its Jobs API.

    Args:
        cluster: the resolved cluster; None for an offline plan (``dryrun`` then skips the checks that need
            the cluster and says why; every other method raises).
        no_cluster_reason: why there is no cluster (shown by ``dryrun`` and raised by the other methods).
    """

    def __init__(self, cluster: Optional["ClusterInfo"], no_cluster_reason: str = "no cluster") -> None:
        self.cluster = cluster
        self.dashboard_url = cluster.dashboard_url if cluster else None
        self._no_cluster_reason = no_cluster_reason
        self._client = None

    @property
    def client(self):
        """The ``JobSubmissionClient`` (created on first use).

        Raises:
            ZeroplaneError: there is no cluster, or its dashboard does not answer.
        """
        if self.cluster is None:
            raise ZeroplaneError(self._no_cluster_reason)
        if self._client is None:
            import logging

            from ray.job_submission import JobSubmissionClient

            for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging",
                         "ray.dashboard.modules.job.sdk"):
                logging.getLogger(name).setLevel(logging.WARNING)  # upload and websocket chatter
            from ..cluster import exact_api_address

            try:
                with exact_api_address(self.dashboard_url):  # not $RAY_ADDRESS: the address was resolved already
                    self._client = JobSubmissionClient(self.dashboard_url)
            except Exception as e:
                raise ZeroplaneError(f"cannot reach the Ray Jobs API at {self.dashboard_url}: {first_line(e)}") from None
        return self._client

    # ------------------------------------------------------------------ dry run and submit
    def dryrun(self, spec: JobSpec, job_id: str, submission_id: Optional[str] = None,
               pass_credentials: bool = False) -> JobRequest:
        """The checked request for ``spec``: upload size always; the cluster answers, storage writable,
        local storage on a single node and resources that fit, against the cluster (skipped, with the
        reason, without one). ``pass_credentials``: see :func:`build_request`.

        Raises:
            ZeroplaneError: a check failed.
        """
        raw = build_request(spec, job_id, submission_id, pass_credentials=pass_credentials)
        storage = Storage.for_checkpoint_spec(spec.checkpoint)
        size = check_upload_size(raw)
        checks = [PreflightCheck("upload", "ok", f"{size / 2**20:.2f} MiB")]
        if self.cluster is None:
            why = f"skipped: {self._no_cluster_reason}"
            checks += [PreflightCheck(n, "skipped", why) for n in ("cluster", "storage", "single_node", "resources")]
        else:
            from ..cluster import cluster_status

            status = cluster_status(self.cluster)
            if not status.get("alive"):
                why = "; ".join(status.get("errors") or []) or "no answer"
                raise ZeroplaneError(f"cannot reach the Ray cluster at {self.dashboard_url}: {why}")
            checks.append(PreflightCheck("cluster", "ok", f"{self.dashboard_url} answers"))
            nodes = [n for n in status.get("nodes", []) if n.get("alive")]
            check_fits(spec, storage, nodes, f"the cluster at {self.dashboard_url}")
            preflight_storage(storage)
            checks.append(PreflightCheck("storage", "ok", f"{storage.uri} is writable"))
            checks.append(PreflightCheck("single_node", "ok", f"{len(nodes)} alive node(s)"))
            checks.append(PreflightCheck("resources", "ok" if nodes else "skipped",
                                         f"{spec.scaling.num_workers} workers fit" if nodes else "node list unreadable"))
        return JobRequest(job_id=job_id, submission_id=raw["submission_id"], entrypoint=raw["entrypoint"],
                          runtime_env=raw["runtime_env"], metadata=raw["metadata"],
                          storage_uri=storage.uri_of(storage.path(layout.job_dir(job_id))),
                          checks=checks, secret_env=SECRET_ENV)

    def submit(self, request: JobRequest) -> str:
        """Submit a request from :meth:`dryrun`; returns the submission id.

        Raises:
            ZeroplaneError: the submission failed.
        """
        try:
            return self.client.submit_job(**request.submit_kwargs())
        except ZeroplaneError:
            raise
        except Exception as e:
            raise ZeroplaneError(f"job submission to {self.dashboard_url} failed: {first_line(e)}") from None

    # ------------------------------------------------------------------ reading
    def info(self, job_id: str) -> JobInfo:
        """Ray's JobDetails of ``job_id``.

        Raises:
            NotFoundError: no such job on this cluster.
            ZeroplaneError: the Jobs API failed.
        """
        try:
            d = self.client.get_job_info(job_id)
        except ZeroplaneError:
            raise
        except Exception as e:
            if "404" in str(e) or "does not exist" in str(e) or "not found" in str(e).lower():
                raise NotFoundError(f"job {job_id!r} not found on {self.dashboard_url}; `zeroplane train list` shows jobs") from None
            raise ZeroplaneError(f"cannot get job {job_id!r}: {first_line(e)}") from None
        return _job_info(d)

    def status(self, job_id: str) -> str:
        """PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED."""
        return self.info(job_id).status

    def spec_json(self, job_id: str) -> Optional[str]:
        """The resolved spec a job was submitted with (JSON from its runtime environment), or None for a
        job zeroplane did not submit.

        Raises:
            NotFoundError: no such job.
        """
        self.info(job_id)
        d = self.client.get_job_info(job_id)
        return ((d.runtime_env or {}).get("env_vars") or {}).get(names.ENV_SPEC_JSON)

    def logs(self, job_id: str) -> str:
        """The job's whole log so far (driver output, including worker lines Ray forwards)."""
        self.info(job_id)
        return self.client.get_job_logs(job_id)

    def tail_logs(self, job_id: str, timeout_s: Optional[float] = None) -> Iterator[str]:
        """Log text as the driver writes it, from the start, until the job ends (Ray's websocket
        ``tail_job_logs``: a follower's cost grows with the new bytes, not with the log's size).

        A dropped connection is reopened and the text already yielded is skipped, so no chunk is lost
        or repeated. Ends when the job is terminal.

        Args:
            job_id: submission id.
            timeout_s: give up after this many seconds (None: never).

        Raises:
            NotFoundError: no such job.
            TimeoutError: ``timeout_s`` passed first.
        """
        self.info(job_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        sent = 0  # characters yielded so far
        loop = asyncio.new_event_loop()
        try:
            while True:
                agen = self.client.tail_job_logs(job_id)
                seen = 0  # characters received on this connection
                try:
                    while True:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            raise TimeoutError(job_id)
                        try:
                            chunk = loop.run_until_complete(asyncio.wait_for(agen.__anext__(), left))
                        except StopAsyncIteration:
                            break
                        except asyncio.TimeoutError:
                            raise TimeoutError(job_id) from None
                        new = chunk[max(0, sent - seen):]
                        seen += len(chunk)
                        if new:
                            sent += len(new)
                            yield new
                except RuntimeError:  # the websocket closed abnormally: reopen it below
                    pass
                finally:
                    loop.run_until_complete(agen.aclose())
                if self.status(job_id) in TERMINAL:
                    return
                time.sleep(0.5)
        finally:
            loop.close()

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
        if not info.terminal:
            self.client.stop_job(job_id)
            while not (info := self.info(job_id)).terminal:
                if time.monotonic() > deadline:
                    raise ZeroplaneError(f"job {job_id} did not stop within {wait_s:.0f}s (status {info.status})")
                time.sleep(0.5)
        while info.ray_job_id:
            alive = self.live_actors(info.ray_job_id)
            if not alive:
                break
            if time.monotonic() > deadline:
                raise ZeroplaneError(f"job {job_id} is {info.status} but {len(alive)} of its actors are still "
                                     f"alive after {wait_s:.0f}s: {', '.join(sorted(set(alive)))[:200]}")
            time.sleep(0.5)
        return info.status

    def live_actors(self, ray_job_id: str) -> List[str]:
        """Class names of the actors of a Ray job (hex job id) that are not DEAD (Ray state API).

        Detached actors are left out: they belong to the cluster, not the job (Ray Train and Ray Data
        leave cluster-wide helpers such as ``_AutoscalingCoordinatorActor`` running on purpose).
        """
        from ray.util.state import list_actors

        from ..cluster import exact_api_address

        with exact_api_address(self.dashboard_url):
            actors = list_actors(address=self.dashboard_url, filters=[("job_id", "=", ray_job_id)], limit=10_000,
                                 detail=True, raise_on_missing_output=False)
        return [a.class_name for a in actors if a.state != "DEAD" and not a.is_detached]

    def list(self) -> List[JobInfo]:
        """zeroplane's jobs on this cluster, newest first.

        Raises:
            ZeroplaneError: the Jobs API failed.
        """
        try:
            jobs = self.client.list_jobs()
        except ZeroplaneError:
            raise
        except Exception as e:
            raise ZeroplaneError(f"cannot list jobs at {self.dashboard_url}: {first_line(e)}") from None
        out = [_job_info(j) for j in jobs if (j.metadata or {}).get(names.META_KIND) == names.META_KIND_TRAIN]
        return sorted(out, key=lambda d: d.start_time or 0, reverse=True)


def _job_info(d) -> JobInfo:
    meta = d.metadata or {}
    return JobInfo(
        job_id=d.submission_id,
        zeroplane_job_id=meta.get(names.META_JOB_ID) or d.submission_id,
        name=meta.get(names.META_NAME),
        status=str(getattr(d.status, "value", d.status)),
        message=d.message,
        start_time=d.start_time,
        end_time=d.end_time,
        driver_exit_code=getattr(d, "driver_exit_code", None),
        ray_job_id=getattr(d, "job_id", None),
        driver_pid=int(d.driver_info.pid) if getattr(d, "driver_info", None) else None,
    )
