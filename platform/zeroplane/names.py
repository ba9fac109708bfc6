"""Names both sides of zeroplane must agree on: the CLI/SDK that submits and reads, and the driver,
workers and Serve replicas that run on the cluster. Each fact is written here once.

Imports nothing of zeroplane but :mod:`zeroplane.errors` (a layering test holds that).
"""

from __future__ import annotations

import re

from .errors import SpecError

# ------------------------------------------------------------------ environment variables
#: The resolved job spec as compact JSON, in the job's runtime environment (read by the driver).
ENV_SPEC_JSON = "ZEROPLANE_SPEC_JSON"
#: The zeroplane job id (run folder) in the job's runtime environment; a resume keeps the original.
ENV_JOB_ID = "ZEROPLANE_JOB_ID"
#: Default storage root for commands that take ``--storage`` (default :data:`DEFAULT_STORAGE`).
ENV_STORAGE = "ZEROPLANE_STORAGE"
#: zeroplane's own folder: cluster record, Ray temp dir, saved API key, profiles (default ``~/.zeroplane``).
ENV_HOME = "ZEROPLANE_HOME"
#: Named profile of ``<home>/config.yaml`` (same as ``--profile``).
ENV_PROFILE = "ZEROPLANE_PROFILE"
#: Bearer key for ``zeroplane complete`` (same as ``--api-key``).
ENV_API_KEY = "ZEROPLANE_API_KEY"
#: ``1``: the CLI re-raises unexpected exceptions with their traceback.
ENV_DEBUG = "ZEROPLANE_DEBUG"
#: Largest ``py_modules`` upload of a job in MiB (default ``backends.rayjobs.DEFAULT_UPLOAD_LIMIT_MB``).
ENV_MAX_UPLOAD_MB = "ZEROPLANE_MAX_UPLOAD_MB"
#: ``1``: submit without comparing the job's resources with the cluster's (autoscaling clusters).
ENV_SKIP_RESOURCE_CHECK = "ZEROPLANE_SKIP_RESOURCE_CHECK"
#: Ray Serve HTTP port of a cluster zeroplane did not start (default 8000).
ENV_SERVE_PORT = "ZEROPLANE_SERVE_PORT"
#: Where a local head started by ``cluster up`` listens: ``127.0.0.1`` (default) or ``0.0.0.0`` (same as ``--host``).
ENV_BIND_HOST = "ZEROPLANE_BIND_HOST"

DEFAULT_HOME = "~/.zeroplane"
DEFAULT_STORAGE = "~/.zeroplane/storage"

# ------------------------------------------------------------------ job submission
#: The job's entrypoint: the driver module, run by the Ray Jobs API on the head node.
ENTRYPOINT = "python -m zeroplane.runtime.train.driver"
#: Ray job metadata: ``{META_KIND: "train", META_NAME: spec.name, META_JOB_ID: run id (resumes only)}``.
META_KIND = "zeroplane"
META_KIND_TRAIN = "train"
META_NAME = "zeroplane_name"
META_JOB_ID = "zeroplane_job_id"
#: Submission id of the k-th resume of job ``job_id``: ``<job_id>-r<k>``.
RESUME_SUFFIX = "-r"

# ------------------------------------------------------------------ progress events
#: Rank 0 prints one line per event, ``ZEROPLANE_PROGRESS {json}``; the CLI follows the driver log for them.
PROGRESS_PREFIX = "ZEROPLANE_PROGRESS "

# ------------------------------------------------------------------ serving
#: ``import_path`` of the Serve application builder.
SERVE_IMPORT_PATH = "zeroplane.runtime.serve.app:build_app"
#: The Serve application of the one OpenAI base URL for all models (``/v1``; not a valid model name) and its
#: builder; see ``zeroplane.runtime.serve.gateway``.
GATEWAY_APP = "zeroplane_v1"
GATEWAY_IMPORT_PATH = "zeroplane.runtime.serve.gateway:build_gateway"
GATEWAY_PREFIX = "/v1"
#: Deployment serving the stable version of a model's application (also the HTTP ingress).
DEPLOYMENT = "ModelServer"
#: Deployment serving the canary version of a traffic split.
CANARY_DEPLOYMENT = "ModelServerCanary"
#: Prometheus counters each replica exports per (model, version); ``serve status`` sums them over replicas.
METRIC_REQUESTS = "zeroplane_requests_total"
METRIC_ERRORS = "zeroplane_request_errors_total"

# ------------------------------------------------------------------ names users give
#: Job and model names: lowercase letters, digits and '-', 1-48 chars, starting and ending with a letter
#: or digit. They become storage folder names, Ray job ids, Serve application names and route prefixes,
#: and (truncated) Kubernetes object names.
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?$")
NAME_RULE = "use lowercase letters, digits and '-', 1-48 chars, starting and ending with a letter or digit"


def check_name(value: str, what: str) -> str:
    """Validate a job or model name against :data:`NAME_RE`; returns it.

    Args:
        value: the name.
        what: how the user gave it, for the message (``"--name"``, ``"name"``, ``"job id"``).

    Raises:
        SpecError: ``<what> '<value>': <the rule>``.
    """
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise SpecError(f"{what} {value!r}: {NAME_RULE}")
    return value

#: A gated canary release runs on the cluster as a Ray Job with this entrypoint (zeroplane.runtime.release);
#: its input is the JSON document in ``ENV_RELEASE_JSON``; its job metadata kind is ``META_KIND_RELEASE``.
RELEASE_ENTRYPOINT = "python -m zeroplane.runtime.release"
ENV_RELEASE_JSON = "ZEROPLANE_RELEASE_JSON"
META_KIND_RELEASE = "release"

#: File endings a corpus (``data.source``) may have: plain text, JSONL (optionally gzip/zstd), Parquet.
DATA_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
