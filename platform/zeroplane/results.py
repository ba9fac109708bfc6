"""Typed results of :class:`zeroplane.sdk.Client` calls. Each has ``to_dict()`` (what ``-o json`` prints).

Plain dataclasses; no ray/torch. Records that live in storage (checkpoint markers, registry versions)
stay the dicts their files hold and are carried inside these results as such.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from .backends.base import JobInfo, JobRequest


@dataclass
class JobPlan:
    """What ``train submit`` sends, as ``--dry-run`` shows it.

    Attributes:
        request: the checked request (its ``checks`` say which preflights ran, were skipped and why).
        spec: the resolved spec (JSON).
        deepspeed_config: the DeepSpeed config the workers build from it.
        memory_estimate: per-worker model-state memory (:func:`zeroplane.estimate.estimate`), or ``{"error"}``.
    """

    request: JobRequest
    spec: Dict[str, Any]
    deepspeed_config: Dict[str, Any]
    memory_estimate: Dict[str, Any]

    @property
    def job_id(self) -> str:
        """The zeroplane job id."""
        return self.request.job_id

    def to_dict(self) -> Dict[str, Any]:
        """``{"job_id", "spec", "deepspeed_config", "ray_job_request" (secrets masked), "memory_estimate",
        "storage", "preflight"}``."""
        return {"job_id": self.job_id, "spec": self.spec, "deepspeed_config": self.deepspeed_config,
                "ray_job_request": self.request.redacted(), "memory_estimate": self.memory_estimate,
                "storage": self.request.storage_uri, "preflight": [c.to_dict() for c in self.request.checks]}


@dataclass
class Submission:
    """A submitted (or resubmitted) job.

    Attributes:
        job_id: the submission id (``<job>-r<k>`` for a resume).
        zeroplane_job_id: the job (run folder) it runs under.
        storage: URI of the job's run folder.
        resume_step: for a resume, the step it continues from (None: no complete checkpoint, starts at 0).
        max_steps: the spec's ``train.max_steps``.
    """

    job_id: str
    zeroplane_job_id: str
    storage: str
    max_steps: int
    resume_step: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class JobStatus:
    """A job's state: the backend's view, the newest progress events and, once ended, its result file.

    Attributes:
        info: the backend's view of the submission.
        progress: the newest ``step`` event (``step``, ``max_steps``, ``loss``, ``tokens_per_s``…), or None.
        val_loss_step0: validation loss before training, or None.
        val_loss: the newest validation loss, or None.
        result: the driver's ``zeroplane_result.json`` once the job ended (None before, or if unreadable).
        loss_curve: ``[[step, train loss], …]`` of this submission's ``step`` events, in order.
    """

    info: JobInfo
    progress: Optional[Dict[str, Any]] = None
    val_loss_step0: Optional[float] = None
    val_loss: Optional[float] = None
    result: Optional[Dict[str, Any]] = None
    loss_curve: List[List[float]] = field(default_factory=list)

    @property
    def status(self) -> str:
        """PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED."""
        return self.info.status

    def to_dict(self) -> Dict[str, Any]:
        """The backend's fields flattened, plus ``progress``, ``val_loss_step0``, ``val_loss``, ``result``,
        ``loss_curve``."""
        return {**self.info.to_dict(), "progress": self.progress, "val_loss_step0": self.val_loss_step0,
                "val_loss": self.val_loss, "result": self.result, "loss_curve": self.loss_curve}


@dataclass
class PromotePlan:
    """What ``promote --dry-run`` shows: the checkpoint, the version it would become, the Serve config."""

    checkpoint: Dict[str, Any]
    would_register: str
    serve_application: Optional[Dict[str, Any]]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class Promotion:
    """A registered (and maybe deployed) version.

    Attributes:
        record: the version's registry record (``name``, ``version``, ``uri``, ``source``, ``verification``…).
        url: the application URL when deployed, else None.
    """

    record: Dict[str, Any]
    url: Optional[str] = None

    @property
    def version(self) -> str:
        """``vN``."""
        return self.record["version"]

    def to_dict(self) -> Dict[str, Any]:
        """The record plus ``url`` when deployed."""
        return {**self.record, **({"url": self.url} if self.url else {})}


@dataclass
class Rollback:
    """The outcome of ``serve rollback``: ``from_version`` -> ``to_version`` of ``name`` at ``url``."""

    name: str
    from_version: str
    to_version: str
    url: str

    def to_dict(self) -> Dict[str, Any]:
        """``{"name", "from", "to", "url"}``."""
        return {"name": self.name, "from": self.from_version, "to": self.to_version, "url": self.url}


@dataclass
class NewKey:
    """A created API key: ``key`` is shown once; ``record`` is what is stored (id, name, created_at, hash);
    ``saved_to`` is the local file it was also written to, if any."""

    key: str
    record: Dict[str, Any]
    saved_to: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (the key included)."""
        return {"key": self.key, **{k: v for k, v in self.record.items() if k != "sha256"}, "saved_to": self.saved_to}


@dataclass
class ClusterStatus:
    """Nodes, resources and job counts of a cluster (``cluster.cluster_status``).

    Attributes:
        dashboard_url: the cluster's dashboard.
        alive: the dashboard answered.
        nodes: ``[{"node_id", "ip", "alive", "cpus", "gpus"}]``.
        resources: ``{"CPU": total, "GPU": total}``.
        jobs: ``{status: count}``.
    """

    dashboard_url: str
    alive: bool
    nodes: List[Dict[str, Any]] = field(default_factory=list)
    resources: Dict[str, Any] = field(default_factory=dict)
    jobs: Dict[str, int] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ClusterStatus":
        """From ``cluster_status``'s dict; unknown keys are kept in ``extra``."""
        known = {"dashboard_url", "alive", "nodes", "resources", "jobs"}
        return cls(dashboard_url=d.get("dashboard_url", ""), alive=bool(d.get("alive")), nodes=d.get("nodes") or [],
                   resources=d.get("resources") or {}, jobs=d.get("jobs") or {},
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> Dict[str, Any]:
        """The dict ``cluster_status`` returned."""
        out = asdict(self)
        return {**out.pop("extra"), **out}


@dataclass
class ServeApp:
    """One zeroplane application on Ray Serve.

    Attributes:
        name: the model (and application) name.
        status: Serve's application status (RUNNING, DEPLOYING, DEPLOY_FAILED, …).
        url: its base URL.
        route_prefix: its HTTP route prefix (``/<name>``).
        versions: ``[{"version", "weight_percent", "deployment", "status", "replicas": {state: count},
            "running_replicas", "autoscaling", "requests", "errors"}]``, stable first; ``requests`` and
            ``errors`` are None when Ray's metrics export could not be read.
        last_change: the newest entry of its deployment history (``{"id", "at", "command", "from", "to",
            "outcome", "reason", "restored", "decision_s"}``; see :mod:`zeroplane.releases`), or None.
        release: its newest gated release (``{"id", "stable", "canary", "status", "percent", "decisions": [{"at",
            "decision", "reason", "numbers", "percent"}], …}``; see :mod:`zeroplane.runtime.release`), or None.
    """

    name: str
    status: Optional[str]
    url: str
    route_prefix: Optional[str] = None
    versions: List[Dict[str, Any]] = field(default_factory=list)
    last_change: Optional[Dict[str, Any]] = None
    release: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class ModelVersion:
    """One registered version: its registry record (``zeroplane_version.json``) with typed access.

    Attributes:
        record: ``{"name", "version", "uri", "source": {"job_id", "step", …}, "metrics", "registered_at",
            "verification", "serve_defaults", …}``.
    """

    record: Dict[str, Any]

    @property
    def name(self) -> str:
        """The model name."""
        return self.record["name"]

    @property
    def version(self) -> str:
        """``vN``."""
        return self.record["version"]

    @property
    def uri(self) -> str:
        """Where the Hugging Face folder is."""
        return self.record["uri"]

    def to_dict(self) -> Dict[str, Any]:
        """The record."""
        return dict(self.record)


@dataclass
class ApiKeyInfo:
    """A serving key as listed (never the key): ``id``, ``name``, ``created_at``, ``revoked``."""

    id: str
    name: Optional[str] = None
    created_at: Optional[str] = None
    revoked: Any = None

    @classmethod
    def from_record(cls, rec: Dict[str, Any]) -> "ApiKeyInfo":
        """From a key-file record (its hash is left out)."""
        return cls(id=rec["id"], name=rec.get("name"), created_at=rec.get("created_at"), revoked=rec.get("revoked"))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)
