"""The Python API that the ``zeroplane`` CLI is a thin layer over.

>>> zp = Client()                              # finds the cluster: address, RAY_ADDRESS, profile, local head
>>> job = zp.submit(load_spec("jobs/tiny-cpu.yaml")).job_id
>>> zp.wait(job)                               # -> "SUCCEEDED"
>>> zp.promote(job, name="tiny")               # consolidate, verify, register, deploy

Every method returns a typed result (:mod:`zeroplane.results`, each with ``to_dict()``) and raises only
:class:`zeroplane.errors.ZeroplaneError` subclasses for what it documents. The cluster is resolved on
first use, so storage-only calls (keys, models, checkpoints with ``storage=``) need none.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

from . import layout, names
from .backends.base import TERMINAL, JobInfo
from .backends.rayjobs import CREDENTIALS_WARNING, RayJobsBackend, new_job_id, preflight_storage  # noqa: F401
from .checkpoints import CheckpointInfo, list_checkpoints
from .errors import ConflictError, NotFoundError, SpecError, ZeroplaneError, first_line  # noqa: F401  (the CLI's)
from .registry import Registry, parse_ref
from .releases import describe as describe_state  # noqa: F401  (the CLI's)
from .results import JobPlan, JobStatus, Submission
from .spec import JobSpec, parse_spec
from .spec.deepspeed import build_deepspeed_config
from .sdk_serving import ServingMixin, running_overrides  # noqa: F401  (running_overrides: the release job's)
from .storage import Storage
# re-exported: the SDK is the CLI's one import
from .completions import complete  # noqa: F401
from .progress import PROGRESS_PREFIX, ProgressParser, parse_progress  # noqa: F401
from .metrics_view import JobScalars, plot_jobs, read_scalars, sparkline, start_tensorboard  # noqa: F401
from .saved_key import api_key_path, check_writable_file, save_api_key, saved_api_key  # noqa: F401

DEFAULT_STORAGE = names.DEFAULT_STORAGE


def default_storage(profile: Optional[str] = None) -> str:
    """The storage root when none is given: ``$ZEROPLANE_STORAGE``, else the ``storage`` of the selected
    profile (``profile``, else ``$ZEROPLANE_PROFILE``), else ``~/.zeroplane/storage``.

    Raises:
        SpecError: a selected profile that does not exist or is invalid.
    """
    if os.environ.get(names.ENV_STORAGE):
        return os.environ[names.ENV_STORAGE]
    from .cluster import load_profile

    prof = load_profile(profile) or {}
    return prof.get("storage") or DEFAULT_STORAGE


def storage_of_checkpoint_path(path: str) -> Storage:
    """The storage root holding a checkpoint folder ``<root>/jobs/<job_id>/checkpoint_step_N``.

    Raises:
        SpecError: the path does not have that shape.
    """
    ref = layout.parse_checkpoint_ref(path)
    if not ref.is_path:
        raise SpecError(f"{path!r} is not a checkpoint folder <storage>/jobs/<job>/checkpoint_step_NNNNNNN; "
                        "give a job id or such a path")
    return Storage.from_uri(ref.storage_uri)


def memory_estimate(spec: JobSpec) -> Dict[str, Any]:
    """Per-worker model-state memory for ``--dry-run``: :func:`zeroplane.estimate.estimate` without the
    runtime (no torch/deepspeed import); ``{"error": …}`` when the model cannot be counted from its config."""
    from .estimate import estimate

    try:
        return estimate(spec, runtime=False)
    except Exception as e:  # a dry run must still show the request
        return {"error": f"{type(e).__name__}: {first_line(e)}"}


class Client(ServingMixin):
    """zeroplane against one Ray cluster and one storage.

    Args:
        address: dashboard URL (``http://host:8265``) or GCS address; default ``RAY_ADDRESS``, the
            profile's address, or the local head started by ``zeroplane cluster up``.
        profile: named profile of ``~/.zeroplane/config.yaml`` (default ``$ZEROPLANE_PROFILE``).

    The cluster is resolved on first use (:attr:`cluster`); until then nothing is contacted.
    """

    def __init__(self, address: Optional[str] = None, profile: Optional[str] = None) -> None:
        self.address = address
        self.profile = profile
        self._cluster = None
        self._jobs: Optional[RayJobsBackend] = None

    # ------------------------------------------------------------------ where
    @property
    def cluster(self):
        """The resolved :class:`zeroplane.cluster.ClusterInfo` (with Ray's token auth applied).

        Raises:
            ZeroplaneError: no address given and no live local cluster.
            SpecError: a malformed address or a bad profile.
        """
        if self._cluster is None:
            from .cluster import apply_auth_env, resolve_cluster

            self._cluster = resolve_cluster(self.address, self.profile)
            apply_auth_env()
        return self._cluster

    @property
    def jobs(self) -> RayJobsBackend:
        """The job backend of :attr:`cluster` (see :class:`zeroplane.backends.base.Backend`)."""
        if self._jobs is None:
            self._jobs = RayJobsBackend(self.cluster)
        return self._jobs

    def storage(self, storage: Optional[str] = None) -> Storage:
        """``storage`` opened, or the default storage (see :func:`default_storage`)."""
        return Storage.from_uri(storage or default_storage(self.profile))

    # ------------------------------------------------------------------ training
    @staticmethod
    def plan(spec: JobSpec, job_id: Optional[str] = None, backend: Optional[RayJobsBackend] = None,
             no_cluster_reason: str = "no cluster to check against", pass_credentials: bool = False) -> JobPlan:
        """What ``submit`` would send: the checked request, the resolved spec, the DeepSpeed config and the
        memory estimate. With ``backend`` every preflight runs against its cluster (and raises as
        ``submit`` would); without, the cluster checks are skipped with ``no_cluster_reason``.
        ``pass_credentials``: see :meth:`submit`.

        Raises:
            ZeroplaneError: a preflight failed.
        """
        backend = backend or RayJobsBackend(None, no_cluster_reason)
        request = backend.dryrun(spec, job_id or new_job_id(spec.name), pass_credentials=pass_credentials)
        return JobPlan(request=request, spec=spec.model_dump(mode="json"),
                       deepspeed_config=build_deepspeed_config(spec), memory_estimate=memory_estimate(spec))

    def dryrun(self, spec: JobSpec, job_id: Optional[str] = None, pass_credentials: bool = False) -> JobPlan:
        """:meth:`plan` against this client's cluster: every preflight ``submit`` runs, and fails as it
        would. When no cluster can be found (nothing given, no local head) a submit could not run at
        all; the plan is then made without the cluster checks, which it lists as skipped with the reason.

        Raises:
            SpecError: a malformed address or a bad profile.
            ZeroplaneError: a preflight failed.
        """
        try:
            backend = self.jobs
        except SpecError:
            raise
        except ZeroplaneError as e:  # no cluster: plan only
            return self.plan(spec, job_id, no_cluster_reason=e.message, pass_credentials=pass_credentials)
        return self.plan(spec, job_id, backend=backend, pass_credentials=pass_credentials)

    def submit(self, spec: JobSpec, job_id: Optional[str] = None, pass_credentials: bool = False) -> Submission:
        """Submit ``spec`` as a Ray Job: exactly the request :meth:`dryrun` returns, after its preflights.

        The job gets no credentials of this process: the nodes use their own (instance profile, workload
        identity, the environment the cluster was started with). ``pass_credentials=True`` puts this
        process's AWS keys into the job request, where every holder of the cluster token can read them.

        Raises:
            ZeroplaneError: a preflight failed (storage not writable; local storage on a multi-node
                cluster without ``checkpoint.shared_filesystem``; workers that do not fit; upload too
                large) or the submission failed.
        """
        request = self.jobs.dryrun(spec, job_id or new_job_id(spec.name), pass_credentials=pass_credentials)
        self.jobs.submit(request)
        return Submission(job_id=request.submission_id, zeroplane_job_id=request.job_id,
                          storage=request.storage_uri, max_steps=spec.train.max_steps)

    # ------------------------------------------------------------------ datasets
    @staticmethod
    def dataset_status(spec: JobSpec) -> Dict[str, Any]:
        """Whether the dataset ``spec`` trains on is prepared in its storage, as seen from this machine.

        Returns:
            ``{"id", "prepared", "uri", "note"}``: ``prepared`` True (a job reuses it), False (the job
            prepares it first), or None with ``id`` None when the source or storage cannot be read from
            here (the job decides on the cluster); ``note`` is one line saying so.
        """
        from . import datasets

        try:
            st = Storage.for_checkpoint_spec(spec.checkpoint)
            _, files = datasets.list_source(spec.data.source, spec.checkpoint.s3_endpoint_url)
            ds_id = datasets.fingerprint(spec, files)
            uri = st.uri_of(st.path(datasets.dataset_dir(ds_id)))
            prepared = datasets.read_manifest(st, ds_id) is not None
        except Exception as e:  # noqa: BLE001 - only a note: the job itself checks and says why
            return {"id": None, "prepared": None, "uri": None,
                    "note": f"data: the job finds or prepares the dataset ({first_line(e)} from here)"}
        note = (f"data: dataset {ds_id} is prepared ({uri}); the job reuses it" if prepared else
                f"data: dataset {ds_id} is not prepared yet; the job prepares it first (Ray Data) into {uri}")
        return {"id": ds_id, "prepared": prepared, "uri": uri, "note": note}

    def prepare_data(self, spec: JobSpec, timeout_s: Optional[float] = None,
                     pass_credentials: bool = False) -> Dict[str, Any]:
        """Prepare the dataset of ``spec`` on the cluster (a Ray Job running
        ``python -m zeroplane.runtime.train.prepare``, same request and preflights as a training job) and
        wait for it; a prepared dataset is found and reused.

        Returns:
            ``{"id", "reused", "uri", "job_id"}``.

        Raises:
            ZeroplaneError: a preflight failed, the job failed (its last error line), or ``timeout_s``.
        """
        import dataclasses

        from . import datasets

        request = self.jobs.dryrun(spec, new_job_id(f"data-{spec.name}"), pass_credentials=pass_credentials)
        request = dataclasses.replace(request, entrypoint=datasets.PREPARE_ENTRYPOINT,
                                      metadata={**request.metadata, names.META_KIND: datasets.META_KIND_DATA})
        self.jobs.submit(request)
        status = self.wait(request.submission_id, timeout_s=timeout_s)
        lines = self.jobs.logs(request.submission_id).splitlines()
        found = [ln[len(datasets.DATASET_PREFIX):] for ln in lines if ln.startswith(datasets.DATASET_PREFIX)]
        if status != "SUCCEEDED" or not found:
            why = next((ln for ln in reversed(lines) if "failed" in ln or "Error" in ln), status)
            raise ZeroplaneError(f"data preparation job {request.submission_id} {status}: {why.strip()}")
        return {**json.loads(found[-1]), "job_id": request.submission_id}

    def datasets(self, storage: Optional[str] = None) -> List[Any]:
        """Every dataset folder in ``storage`` (default storage when None), complete or not
        (:class:`zeroplane.datasets.DatasetInfo`)."""
        from .datasets import list_datasets

        return list_datasets(self.storage(storage))

    def dataset(self, dataset_id: str, storage: Optional[str] = None) -> Dict[str, Any]:
        """The manifest of a complete dataset.

        Raises:
            NotFoundError: none of that id is complete in the storage. SpecError: a malformed id.
        """
        from .datasets import show_dataset

        return show_dataset(self.storage(storage), dataset_id)

    def resume(self, job_id: str, overrides: Optional[List[str]] = None, pass_credentials: bool = False) -> Submission:
        """Resubmit an ended job so that it continues from its newest complete checkpoint.

        The new Ray Job is ``<job>-r<k>`` (k = 1, 2, …) and runs under the ORIGINAL zeroplane job id: same
        run folder, same checkpoints, same spec (``train.stop_after_steps`` cleared, then ``overrides``
        applied). Resuming a resumed submission resumes the same job.

        Args:
            job_id: the job id or any of its resume submission ids.
            overrides: ``key.path=value`` strings, as ``--set``.
            pass_credentials: see :meth:`submit`.

        Returns:
            The submission; ``resume_step`` None means no complete checkpoint yet (starts at step 0).

        Raises:
            NotFoundError: no such job.
            ConflictError: the job is still running (stop it first).
            SpecError: a bad override, or ``scaling.num_workers`` other than the number of ranks that wrote
                the checkpoint to resume from (DeepSpeed's ZeRO shards hold each rank's partition of the
                optimizer state; nothing is submitted).
            ZeroplaneError: a preflight or the submission failed.
        """
        from .checkpoints import latest_complete
        from .spec import apply_overrides

        info = self.jobs.info(job_id)
        if not info.terminal:
            raise ConflictError(f"job {job_id} is {info.status}; resume it once it has ended "
                                f"(`zeroplane train stop {job_id}`)")
        run = info.zeroplane_job_id
        raw = self.spec_of(job_id).model_dump(mode="json")
        raw["train"]["stop_after_steps"] = None
        spec = parse_spec(apply_overrides(raw, overrides or []), source=f"{job_id} with --set")
        taken = {j.job_id for j in self.jobs.list()}
        k = 1
        while f"{run}{names.RESUME_SUFFIX}{k}" in taken:
            k += 1
        request = self.jobs.dryrun(spec, run, submission_id=f"{run}{names.RESUME_SUFFIX}{k}",
                                   pass_credentials=pass_credentials)
        storage = Storage.for_checkpoint_spec(spec.checkpoint)
        newest = latest_complete(storage, run)
        if newest is not None:
            ranks = storage.read_json(f"{newest.path}/{layout.CKPT_META}").get("world_size")
            if ranks is not None and ranks != spec.scaling.num_workers:
                raise SpecError(
                    f"scaling.num_workers={spec.scaling.num_workers}: job {run}'s step-{newest.step} checkpoint was "
                    f"written by {ranks} ranks, and each rank's ZeRO shard holds its own part of the optimizer "
                    f"state, so it resumes only with {ranks} workers; use --set scaling.num_workers={ranks} "
                    "(or start a new job from the promoted model)")
        self.jobs.submit(request)
        return Submission(job_id=request.submission_id, zeroplane_job_id=run, storage=request.storage_uri,
                          max_steps=spec.train.max_steps, resume_step=newest.step if newest else None)

    def spec_of(self, job_id: str) -> JobSpec:
        """The resolved spec a job was submitted with (from its runtime environment).

        Raises:
            NotFoundError: no such job, or a job zeroplane did not submit.
        """
        raw = self.jobs.spec_json(job_id)
        if raw is None:
            raise NotFoundError(f"job {job_id!r} was not submitted by zeroplane")
        return parse_spec(json.loads(raw), source=job_id)

    def storage_of(self, job_id: str) -> Storage:
        """The storage root of a job: from its spec while the cluster knows the job, else the default
        storage when the job's folder is there — checkpoints outlive the cluster that wrote them.

        Raises:
            NotFoundError: neither the cluster nor the default storage knows the job.
        """
        where = self._cluster_knows(job_id)
        if where is None:
            return Storage.for_checkpoint_spec(self.spec_of(job_id).checkpoint)
        st = self.storage()
        if st.isdir(st.path(layout.job_dir(job_id))):
            return st
        raise NotFoundError(f"job {job_id!r} is neither {where} nor in {st.uri}; "
                            "give its storage with --storage (see `zeroplane train list`)")

    def _cluster_knows(self, job_id: str) -> Optional[str]:
        """None when the cluster knows ``job_id``; else why not (no cluster, or not there), for messages.

        Raises:
            SpecError: a malformed address or profile.
        """
        try:
            self.jobs.info(job_id)
        except SpecError:
            raise
        except NotFoundError:
            return f"on {self.cluster.dashboard_url}"
        except ZeroplaneError as e:  # no cluster (e.g. it was shut down): the storage may still have the job
            return f"on a cluster ({e.message})"
        return None

    def run_id_of(self, job_id: str) -> str:
        """The zeroplane job id (run folder) of a submission: itself, or the job a resume continues.

        Raises:
            NotFoundError: the cluster does not know the submission.
        """
        return self.jobs.info(job_id).zeroplane_job_id

    def run_id_or_self(self, job_id: str) -> str:
        """:meth:`run_id_of` for a job the cluster knows, else ``job_id`` itself (a job of an earlier cluster)."""
        return job_id if self._cluster_knows(job_id) is not None else self.run_id_of(job_id)

    def job_info(self, job_id: str) -> JobInfo:
        """The backend's view of one submission (status, message, times).

        Raises:
            NotFoundError: no such job.
        """
        return self.jobs.info(job_id)

    def list_jobs(self) -> List[JobInfo]:
        """zeroplane's submissions on the cluster, newest first."""
        return self.jobs.list()

    def status(self, job_id: str) -> JobStatus:
        """The backend's view of a job, its newest progress and, once ended, its result file.

        Raises:
            NotFoundError: no such job.
        """
        info = self.jobs.info(job_id)
        events = parse_progress(self.jobs.logs(job_id))
        steps = [e for e in events if e.get("event") == "step"]
        evals = [e for e in events if "val_loss" in e]
        out = JobStatus(info=info, progress=steps[-1] if steps else None,
                        val_loss_step0=next((e["val_loss"] for e in events
                                             if e.get("event") == "eval" and e.get("step") == 0), None),
                        val_loss=evals[-1]["val_loss"] if evals else None,
                        loss_curve=[[e["step"], e["loss"]] for e in steps if "loss" in e])
        if info.terminal:
            try:
                st = self.storage_of(job_id)
                path = st.path(layout.result_file(info.zeroplane_job_id))
                out.result = st.read_json(path) if st.exists(path) else None
            except Exception:  # the result is extra: a missing or unreadable one leaves None
                out.result = None
        return out

    def logs(self, job_id: str) -> str:
        """The job's whole log so far.

        Raises:
            NotFoundError: no such job.
        """
        return self.jobs.logs(job_id)

    def follow_logs(self, job_id: str) -> Iterator[str]:
        """Log text as it is written, from the start, until the job ends.

        Raises:
            NotFoundError: no such job.
        """
        return self.jobs.tail_logs(job_id)

    def wait(self, job_id: str, on_event: Optional[Callable[[Dict[str, Any]], None]] = None,
             poll_s: float = 2.0, timeout_s: Optional[float] = None) -> str:
        """Follow a job until it ends, calling ``on_event`` for each progress event as it is logged.

        The log is streamed (:meth:`follow_logs`), not downloaded again at each poll.

        Args:
            job_id: submission id.
            on_event: called with each event dict, in order, once each.
            poll_s: seconds between status reads after the log stream ended (default 2).
            timeout_s: give up after this many seconds (None: never).

        Returns:
            The terminal status (SUCCEEDED, FAILED or STOPPED).

        Raises:
            NotFoundError: no such job.
            ZeroplaneError: ``timeout_s`` elapsed first (the job keeps running).
        """
        start = time.monotonic()
        parser = ProgressParser()

        def emit(events: List[Dict[str, Any]]) -> None:
            for ev in events:
                if on_event:
                    on_event(ev)

        def left() -> Optional[float]:
            return None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - start))

        try:
            for chunk in self.jobs.tail_logs(job_id, timeout_s=left()):
                emit(parser.feed(chunk))
            emit(parser.close())
            while (status := self.jobs.status(job_id)) not in TERMINAL:
                if left() is not None and left() <= 0:
                    raise TimeoutError(job_id)
                time.sleep(poll_s)
        except TimeoutError:
            raise ZeroplaneError(f"job {job_id} still {self.jobs.status(job_id)} after {timeout_s:.0f}s; it keeps "
                                 f"running (`zeroplane train stop {job_id}` ends it)") from None
        return status

    def stop(self, job_id: str, wait_s: float = 120.0) -> str:
        """Stop a job; returns its final status once its driver and every Ray Train actor are gone.

        Raises:
            NotFoundError: no such job.
            ZeroplaneError: something of it was still alive after ``wait_s`` seconds.
        """
        return self.jobs.stop(job_id, wait_s=wait_s)

    def checkpoints(self, job_id: str, storage: Optional[str] = None,
                    include_incomplete: bool = False) -> List[CheckpointInfo]:
        """Checkpoints of a job (complete only unless asked), oldest first. With ``storage`` no cluster
        is needed; without, the job's storage comes from the cluster (or the default storage).

        Raises:
            NotFoundError: the job is unknown to both the cluster and the default storage.
        """
        st = Storage.from_uri(storage) if storage else self.storage_of(job_id)
        run = job_id if storage else self.run_id_or_self(job_id)
        return list_checkpoints(st, run, include_incomplete=include_incomplete)

    def event_dirs(self, job_ids: List[str], storage: Optional[str] = None) -> Dict[str, Any]:
        """``{job id: local folder of its TensorBoard event files}`` (``s3://`` storage: a fresh local copy
        under ``$ZEROPLANE_HOME/tensorboard``). Storage as in :meth:`checkpoints`; a resume submission id
        becomes its job.

        Raises:
            NotFoundError: a job unknown to the cluster and the storage, or one without event files.
        """
        from .metrics_view import local_event_dir

        out = {}
        for j in job_ids:
            st = Storage.from_uri(storage) if storage else self.storage_of(j)
            run = j if storage else self.run_id_or_self(j)
            out[run] = local_event_dir(st, run)
        return out



# ---------------------------------------------------------------------- calls that need no Client
# The CLI imports only this module (and its own); these are the non-cluster operations it offers.
from . import __version__  # noqa: E402,F401
from .spec import json_schema, load_spec  # noqa: E402,F401


def estimate(spec: JobSpec) -> Dict[str, Any]:
    """Per-worker memory for model states of ``spec`` (:func:`zeroplane.estimate.estimate`)."""
    from .estimate import estimate as _estimate

    return _estimate(spec)


def check_name(name: str, what: str = "model name") -> str:
    """Validate a model name (see :func:`zeroplane.names.check_name`).

    Raises:
        SpecError: names the value and the rule.
    """
    return names.check_name(name, what)


def parse_model_ref(ref: str):
    """``name`` or ``name:vN`` -> ``(name, "vN" | None)``.

    Raises:
        SpecError: a malformed reference.
    """
    check_name(ref.partition(":")[0], "model name")
    return parse_ref(ref)


def cluster_up(num_cpus: Optional[int] = None, dashboard_port: Optional[int] = None,
               serve_http_port: Optional[int] = None, bind_host: Optional[str] = None):
    """Start the embedded local Ray head, or return the one already running
    (:func:`zeroplane.cluster.start_local_head`); returns its ``ClusterInfo`` (``bind_host``: where it
    listens, ``auth``: ``token`` or ``disabled``).

    Args:
        bind_host: ``127.0.0.1`` (default, or ``$ZEROPLANE_BIND_HOST``) or ``0.0.0.0`` for a head other
            machines can reach.

    Raises:
        SpecError: a bad argument.
        ZeroplaneError: Ray did not start, or a running head listens elsewhere than asked.
    """
    from .cluster import start_local_head

    return start_local_head(num_cpus=num_cpus, dashboard_port=dashboard_port, serve_http_port=serve_http_port,
                            bind_host=bind_host)


def cluster_down(grace_s: float = 10.0) -> List[int]:
    """Stop the local head zeroplane started, and only that; returns the pids it ended."""
    from .cluster import stop_local_head

    return stop_local_head(grace_s=grace_s)


def cluster_launcher(action: str, config: str) -> None:
    """``ray up|down -y CONFIG`` through the Ray cluster launcher (:func:`zeroplane.cluster.run_launcher`)."""
    from .cluster import run_launcher

    run_launcher(action, config)


def render_rayjob(spec: JobSpec, job_id: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
    """A KubeRay RayJob manifest for ``spec`` (:func:`zeroplane.kuberay.render_rayjob`; ``kwargs`` pass on).

    Raises:
        SpecError: ``job_id`` breaks the job-id rule (it becomes a storage folder name).
    """
    from .kuberay import render_rayjob as _render

    return _render(spec, job_id=layout.check_job_id(job_id, "--job-id") if job_id else new_job_id(spec.name), **kwargs)


def render_rayservice(ref: str, storage: Optional[str] = None, profile: Optional[str] = None,
                      **kwargs: Any) -> Dict[str, Any]:
    """A KubeRay RayService manifest serving the registered version ``ref`` (``NAME[:vN]``)."""
    from .kuberay import render_rayservice as _render

    name, version = parse_ref(ref)
    st = Storage.from_uri(storage or default_storage(profile))
    rec = Registry(st).get(name, version)
    return _render(name, rec, st.uri, rec.get("serve_defaults") or {}, **kwargs)


def render_raycluster(**kwargs: Any) -> Dict[str, Any]:
    """A KubeRay RayCluster manifest (:func:`zeroplane.kuberay.render_raycluster`)."""
    from .kuberay import render_raycluster as _render

    return _render(**kwargs)


def manifest_text(manifest: Dict[str, Any], fmt: str = "yaml") -> str:
    """A manifest as YAML (``fmt="yaml"``) or JSON."""
    from .kuberay import to_json, to_yaml

    return to_json(manifest) if fmt == "json" else to_yaml(manifest)
