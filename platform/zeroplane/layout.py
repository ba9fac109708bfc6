"""The storage layout: every folder and file name under a storage root, and the one parser of
checkpoint references. Pure names: no I/O, no ray/torch; imports nothing of zeroplane but
:mod:`zeroplane.errors` (a layering test holds that).

Layout under a storage root (a local folder or ``s3://bucket/prefix``)::

    jobs/<job_id>/                     Ray Train run folder (RunConfig storage_path=<root>/jobs, name=<job_id>)
      zeroplane_result.json            the driver's final result (status, steps, losses), written at the end
      checkpoint_step_0000100/         one Ray checkpoint (see below)
      tensorboard/                     rank 0's TensorBoard event files, one file per run attempt
    models/<name>/v<N>/                registered model versions (plain Hugging Face folders)
      zeroplane_version.json           registration marker, written last (each file's size and SHA-256)
    models/<name>/.claims/v<N>         version N taken by one promotion (created if absent, before the upload)
    serve/api_keys.json                hashed serving API keys
    serve/history/<name>.json          every rollout of application <name>: from, to, outcome (zeroplane.releases)
    serve/releases/<name>.json         the newest gated canary release of <name>: status, every decision
    serve/api_keys.json.lock           local storage only: the lock every key-file update holds
    cache/tokenizers/<sha256>.json     BPE tokenizers trained by earlier jobs, by corpus + settings

One checkpoint folder ``checkpoint_step_0000100/``::

    ds/<tag>/...                       every rank's DeepSpeed shards (engine.save_checkpoint on all ranks)
    ds/latest                          DeepSpeed's pointer to <tag>
    hf/                                model config + tokenizer files (a Hugging Face folder without weights)
    rng/rank_<r>.pt                    each rank's RNG state (exact resume)
    digests/rank_<r>.json              size and SHA-256 of each file rank r wrote, hashed before its upload
    probe.json, probe.safetensors      probe input ids; their eval-mode logits
    meta.json                          step, tag, data position, metrics, zero_stage, world_size, spec
    zeroplane_complete.json            the completion marker: written last, lists every file with its size
                                       and SHA-256 (from digests/)

Functions return paths relative to the root, joined with ``/``; ``Storage.path(rel)`` makes them absolute.
Every name a user gives (a job id here, a model name in :mod:`zeroplane.registry`) is checked before it
becomes part of a path, so that no name can leave its folder (``..``, ``/``, absolute paths).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .errors import SpecError

JOBS_DIR = "jobs"
MODELS_DIR = "models"
RESULT_FILE = "zeroplane_result.json"
CHECKPOINT_MARKER = "zeroplane_complete.json"
VERSION_MARKER = "zeroplane_version.json"
KEYS_FILE = "serve/api_keys.json"
TOKENIZER_CACHE_DIR = "cache/tokenizers"
#: A job's TensorBoard event files, inside its run folder.
TENSORBOARD_DIR = "tensorboard"
#: Written and deleted by the submit preflight to prove the root is writable.
PREFLIGHT_FILE = ".zeroplane-preflight"

# inside one checkpoint folder
CKPT_DEEPSPEED_DIR = "ds"
CKPT_HF_DIR = "hf"
CKPT_RNG_DIR = "rng"
CKPT_META = "meta.json"
CKPT_DIGESTS_DIR = "digests"
#: The probe: its input ids, and the logits the model gave for them when the checkpoint was taken.
CKPT_PROBE_IDS, CKPT_PROBE_LOGITS = "probe.json", "probe.safetensors"

#: A checkpoint folder is ``CKPT_PREFIX + tag``, the tag ``step_NNNNNNN``.
CKPT_PREFIX = "checkpoint_"
_TAG_RE = re.compile(r"^step_(\d+)$")
_VERSION_RE = re.compile(r"^v(\d+)$")
#: Job ids are ``<name>-<yyyymmdd-hhmmss>-<4hex>`` (``-r<k>`` for the k-th resume); any letters, digits,
#: '.', '_' and '-' are accepted (Ray submission ids too), never '..' (no '/' at all), so that a job id is
#: always one folder name under ``jobs/``.
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
JOB_ID_RULE = ("a job id is one folder name: letters, digits, '.', '_' and '-' (e.g. "
               "<name>-<yyyymmdd-hhmmss>-<4hex>[-r<k>]), never '/' or '..'")


def check_job_id(job_id: str, what: str = "job id") -> str:
    """Validate a job id (:data:`JOB_ID_RULE`) before it becomes a folder name; returns it.

    Args:
        job_id: the id as the user gave it.
        what: how the user gave it, for the message.

    Raises:
        SpecError: ``<what> '<value>': <the rule>`` for an empty id, one with characters outside
            ``[A-Za-z0-9._-]`` (a '/' included), or one containing '..'.
    """
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id) or ".." in job_id or not job_id.strip("."):
        raise SpecError(f"{what} {job_id!r}: {JOB_ID_RULE}")
    return job_id


def job_dir(job_id: str) -> str:
    """``jobs/<job_id>``: a job's run folder.

    Raises:
        SpecError: ``job_id`` breaks :data:`JOB_ID_RULE` (see :func:`check_job_id`).
    """
    return f"{JOBS_DIR}/{check_job_id(job_id)}"


def result_file(job_id: str) -> str:
    """``jobs/<job_id>/zeroplane_result.json``."""
    return f"{job_dir(job_id)}/{RESULT_FILE}"


def tensorboard_dir(job_id: str) -> str:
    """``jobs/<job_id>/tensorboard``: the job's TensorBoard event files (one per run attempt).

    Raises:
        SpecError: ``job_id`` breaks :data:`JOB_ID_RULE`.
    """
    return f"{job_dir(job_id)}/{TENSORBOARD_DIR}"


def tag_for_step(step: int) -> str:
    """DeepSpeed tag for an optimizer step, e.g. ``step_0000100`` (7 digits, so tags sort in step order)."""
    return f"step_{step:07d}"


def dir_name_for_step(step: int) -> str:
    """Ray checkpoint folder name for a step, e.g. ``checkpoint_step_0000100``."""
    return CKPT_PREFIX + tag_for_step(step)


def step_of(dir_name: str) -> Optional[int]:
    """The step encoded in a checkpoint folder name, or None for other names."""
    if not dir_name.startswith(CKPT_PREFIX):
        return None
    m = _TAG_RE.fullmatch(dir_name[len(CKPT_PREFIX):])
    return int(m.group(1)) if m else None


def checkpoint_dir(job_id: str, step: int) -> str:
    """``jobs/<job_id>/checkpoint_step_NNNNNNN``."""
    return f"{job_dir(job_id)}/{dir_name_for_step(step)}"


def model_dir(name: str) -> str:
    """``models/<name>``."""
    return f"{MODELS_DIR}/{name}"


def version_dir(name: str, version: str) -> str:
    """``models/<name>/<version>`` (version ``vN``)."""
    return f"{model_dir(name)}/{version}"


def claims_dir(name: str) -> str:
    """``models/<name>/.claims``: one file per version number taken."""
    return f"{model_dir(name)}/.claims"


def version_claim(name: str, version: str) -> str:
    """``models/<name>/.claims/<version>``: created if absent by the one promotion that takes ``version``."""
    return f"{claims_dir(name)}/{version}"


def version_number(version: str) -> Optional[int]:
    """N of a version folder name ``vN``, or None for other names."""
    m = _VERSION_RE.fullmatch(version)
    return int(m.group(1)) if m else None


def serve_history_file(name: str) -> str:
    """``serve/history/<name>.json``: the deployment history of application ``name`` (a checked model name)."""
    return f"serve/history/{name}.json"


def release_file(name: str) -> str:
    """``serve/releases/<name>.json``: the newest gated release of application ``name`` (a checked model name)."""
    return f"serve/releases/{name}.json"


def tokenizer_cache_file(key: str) -> str:
    """``cache/tokenizers/<key>.json``."""
    return f"{TOKENIZER_CACHE_DIR}/{key}.json"


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint as the user names it: ``JOB`` (its newest complete checkpoint), ``JOB@STEP``, or
    the path of a checkpoint folder ``<root>/jobs/<job>/checkpoint_step_NNNNNNN`` (local or ``s3://``).

    Attributes:
        job_id: the job (or resume submission) id.
        step: the step, or None for the newest complete one.
        storage_uri: for a path, the storage root holding it (``s3://bucket/prefix`` or a local folder
            as given, ``~`` not yet expanded); None for ``JOB`` and ``JOB@STEP``.
    """

    job_id: str
    step: Optional[int] = None
    storage_uri: Optional[str] = None

    @property
    def is_path(self) -> bool:
        """True when the reference was a checkpoint folder path."""
        return self.storage_uri is not None

    def with_job(self, job_id: str) -> "CheckpointRef":
        """The same reference for another job id (a resume submission id -> the job it resumes)."""
        return CheckpointRef(job_id, self.step, self.storage_uri)

    def __str__(self) -> str:
        if self.storage_uri is not None:
            return f"{self.storage_uri.rstrip('/')}/{checkpoint_dir(self.job_id, self.step or 0)}"
        return self.job_id if self.step is None else f"{self.job_id}@{self.step}"


def parse_checkpoint_ref(ref: str) -> CheckpointRef:
    """Parse ``JOB``, ``JOB@STEP`` or a checkpoint folder path (anything with a ``/``).

    Raises:
        SpecError: an empty reference, a step that is not a whole number >= 0, a path that is not
            ``<storage>/jobs/<job>/checkpoint_step_NNNNNNN``, a job id that breaks :data:`JOB_ID_RULE`,
            or an ``s3://`` path with a '.' or '..' segment.
    """
    ref = (ref or "").strip()
    what = f"checkpoint reference {ref!r}: job id"
    if not ref:
        raise SpecError("checkpoint reference '': give a job id, JOB@STEP or a checkpoint folder path")
    if "/" in ref:
        parts = ref.rstrip("/").rsplit("/", 3)
        if len(parts) != 4 or parts[1] != JOBS_DIR or step_of(parts[3]) is None or not parts[2]:
            raise SpecError(f"{ref!r} is not a checkpoint folder <storage>/{JOBS_DIR}/<job>/{CKPT_PREFIX}step_NNNNNNN; "
                            "give a job id, JOB@STEP or such a path")
        root = parts[0] or "/"
        if root == "s3:/" or root == "s3:":
            raise SpecError(f"{ref!r} names no bucket; use s3://bucket/prefix/{JOBS_DIR}/<job>/<checkpoint>")
        if root.startswith("s3://") and {".", ".."} & set(root[len("s3://"):].split("/")):
            raise SpecError(f"{ref!r}: '.' and '..' are not allowed in an s3:// path")
        return CheckpointRef(check_job_id(parts[2], what), step_of(parts[3]), root)
    job_id, at, step = ref.partition("@")
    if not job_id:
        raise SpecError(f"checkpoint reference {ref!r} has no job id; use JOB or JOB@STEP")
    if at:
        if not step.isdigit():
            raise SpecError(f"checkpoint reference {ref!r}: the step after '@' must be a whole number, e.g. {job_id}@100")
        return CheckpointRef(check_job_id(job_id, what), int(step))
    return CheckpointRef(check_job_id(job_id, what))
