"""The backend boundary: where a training job runs.

A :class:`Backend` turns a spec into a typed :class:`JobRequest` (``dryrun``, which runs every
preflight), submits exactly that request (``submit``), and reads, follows, stops and lists jobs. The SDK
submits with ``backend.submit(backend.dryrun(spec, job_id))`` and ``--dry-run`` prints the same
``dryrun`` result, so a dry run refuses what a submit refuses (pattern of TorchX's
``schedule(submit_dryrun(...))``).

Implementations: :class:`zeroplane.backends.rayjobs.RayJobsBackend` (the Ray Jobs API). KubeRay
manifests are rendered, not submitted (:mod:`zeroplane.kuberay`).
"""

from __future__ import annotations

import abc
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from ..spec import JobSpec

#: Ray's terminal job statuses.
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


@dataclass
class PreflightCheck:
    """One check run before a job is submitted.

    Attributes:
        name: ``cluster`` (its dashboard answers), ``storage`` (root writable), ``single_node`` (local storage on one node), ``resources``
            (workers fit the cluster), ``upload`` (package under the size limit).
        status: ``ok``, ``failed`` or ``skipped``.
        detail: what was checked, why it failed (the error submit raises) or why it was skipped.
    """

    name: str
    status: str
    detail: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class JobRequest:
    """Exactly what a backend submits, plus what the dry run shows about it.

    Attributes:
        job_id: the zeroplane job id (run folder ``<storage>/jobs/<job_id>``).
        submission_id: the backend's id of this submission: ``job_id``, or ``<job_id>-r<k>`` for a resume.
        entrypoint: the driver command.
        runtime_env: Ray runtime environment (``py_modules``, ``excludes``, ``env_vars``).
        metadata: job metadata (``zeroplane``, ``zeroplane_name``, ``zeroplane_job_id`` for resumes).
        storage_uri: where the job's checkpoints go (``<root>/jobs/<job_id>``).
        checks: the preflight checks and their outcome.
        secret_env: names of ``runtime_env.env_vars`` entries whose values are masked when shown.
    """

    job_id: str
    submission_id: str
    entrypoint: str
    runtime_env: Dict[str, Any]
    metadata: Dict[str, Any]
    storage_uri: str
    checks: List[PreflightCheck] = field(default_factory=list)
    secret_env: frozenset = frozenset()

    def submit_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of ``JobSubmissionClient.submit_job`` (secrets in clear)."""
        return {"entrypoint": self.entrypoint, "submission_id": self.submission_id,
                "runtime_env": json.loads(json.dumps(self.runtime_env)), "metadata": dict(self.metadata)}

    def redacted(self) -> Dict[str, Any]:
        """:meth:`submit_kwargs` with every secret environment value replaced by ``***``."""
        out = self.submit_kwargs()
        env = out["runtime_env"].get("env_vars", {})
        for k in env:
            if k in self.secret_env:
                env[k] = "***"
        return out

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict for display (secrets masked)."""
        return {"job_id": self.job_id, "submission_id": self.submission_id, "storage": self.storage_uri,
                "request": self.redacted(), "preflight": [c.to_dict() for c in self.checks]}


@dataclass
class JobInfo:
    """One submission as the backend reports it.

    Attributes:
        job_id: the submission id (a resume's is ``<job>-r<k>``).
        zeroplane_job_id: the job (run folder) it belongs to; equals ``job_id`` except for resumes.
        name: the spec's ``name``.
        status: PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED.
        message: the backend's status message.
        start_time, end_time: milliseconds since the epoch (None until known).
        driver_exit_code: the driver's exit status once it ended.
        ray_job_id: Ray's hex job id (for the state API).
        driver_pid: pid of the driver process.
    """

    job_id: str
    zeroplane_job_id: str
    name: Optional[str]
    status: str
    message: Optional[str] = None
    start_time: Optional[int] = None
    end_time: Optional[int] = None
    driver_exit_code: Optional[int] = None
    ray_job_id: Optional[str] = None
    driver_pid: Optional[int] = None

    @property
    def terminal(self) -> bool:
        """True once the job has ended (SUCCEEDED, FAILED or STOPPED)."""
        return self.status in TERMINAL

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


class Backend(abc.ABC):
    """Where jobs run. Every method raises :class:`zeroplane.errors.ZeroplaneError` subclasses only."""

    @abc.abstractmethod
    def dryrun(self, spec: JobSpec, job_id: str, submission_id: Optional[str] = None,
               pass_credentials: bool = False) -> JobRequest:
        """The request ``submit`` would send for ``spec``, after every preflight (``pass_credentials``:
        put the submitter's cloud credentials into the request; off by default, see SECURITY.md).

        Raises:
            ZeroplaneError: a preflight failed (the message names what, and the fix).
        """

    @abc.abstractmethod
    def submit(self, request: JobRequest) -> str:
        """Submit ``request``; returns its submission id.

        Raises:
            ZeroplaneError: the backend refused or could not be reached.
        """

    @abc.abstractmethod
    def info(self, job_id: str) -> JobInfo:
        """One submission.

        Raises:
            NotFoundError: no such submission.
        """

    @abc.abstractmethod
    def logs(self, job_id: str) -> str:
        """The whole log so far."""

    @abc.abstractmethod
    def tail_logs(self, job_id: str) -> Iterator[str]:
        """Log text as it is written, from the start, until the job ends (chunks, not lines)."""

    @abc.abstractmethod
    def stop(self, job_id: str, wait_s: float = 120.0) -> str:
        """Stop a submission; returns its final status once nothing of it runs."""

    @abc.abstractmethod
    def list(self) -> List[JobInfo]:
        """zeroplane's submissions, newest first."""
