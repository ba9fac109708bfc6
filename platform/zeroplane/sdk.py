"""The Python API that the ``zeroplane`` CLI is a thin layer over.

>>> zp = Client()                              # finds the cluster: --address, RAY_ADDRESS, local head
>>> job = zp.submit(load_spec("jobs/tiny-cpu.yaml"))["job_id"]
>>> zp.wait(job)                               # -> "SUCCEEDED"
>>> zp.promote(job, name="tiny")               # consolidate, verify, register, deploy
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

from .backends.rayjobs import TERMINAL, RayJobsBackend, build_request, new_job_id, redact
from .checkpoints import list_checkpoints
from .errors import NotFoundError, ZeroplaneError
from .registry import Registry, check_model_name, parse_ref
from .spec import JobSpec, parse_spec
from .spec.deepspeed import build_deepspeed_config
from .storage import Storage

PROGRESS_PREFIX = "ZEROPLANE_PROGRESS "
DEFAULT_STORAGE = "~/.zeroplane/storage"


def parse_progress(log_text: str) -> List[Dict[str, Any]]:
    """Progress events printed by rank 0 (``ZEROPLANE_PROGRESS {json}`` lines), in order, deduplicated."""
    out, seen = [], set()
    for line in log_text.splitlines():
        i = line.find(PROGRESS_PREFIX)
        if i < 0:
            continue
        raw = line[i + len(PROGRESS_PREFIX):].strip()
        if raw in seen:
            continue
        try:
            ev = json.loads(raw)
        except json.JSONDecodeError:
            continue
        seen.add(raw)
        out.append(ev)
    return out


def default_storage() -> str:
    """``$ZEROPLANE_STORAGE`` or ``~/.zeroplane/storage``."""
    return os.environ.get("ZEROPLANE_STORAGE", DEFAULT_STORAGE)


class Client:
    """zeroplane against one Ray cluster.

    Args:
        address: dashboard URL (``http://host:8265``) or GCS address; default ``RAY_ADDRESS`` or the
            local head started by ``zeroplane cluster up``.
    """

    def __init__(self, address: Optional[str] = None) -> None:
        from .cluster import apply_auth_env, resolve_cluster

        self.cluster = resolve_cluster(address)
        apply_auth_env()
        self.jobs = RayJobsBackend(self.cluster.dashboard_url)

    # ------------------------------------------------------------------ training
    @staticmethod
    def plan(spec: JobSpec, job_id: Optional[str] = None) -> Dict[str, Any]:
        """What ``submit`` would send: the resolved spec, the DeepSpeed config and the Ray job request
        (secrets masked). Needs no cluster."""
        job_id = job_id or new_job_id(spec.name)
        return {
            "job_id": job_id,
            "spec": spec.model_dump(mode="json"),
            "deepspeed_config": build_deepspeed_config(spec),
            "ray_job_request": redact(build_request(spec, job_id)),
            "memory_estimate": memory_estimate(spec),
        }

    def submit(self, spec: JobSpec, job_id: Optional[str] = None) -> Dict[str, Any]:
        """Submit ``spec`` as a Ray Job after a storage preflight; returns ``{"job_id", "storage"}``.

        Raises:
            ZeroplaneError: the storage is not writable, it is a local folder on a multi-node cluster
                (without ``checkpoint.shared_filesystem: true``), or the submission failed.
        """
        storage = Storage.for_checkpoint_spec(spec.checkpoint)
        if storage.is_local and not spec.checkpoint.shared_filesystem:
            self._check_single_node(storage)
        if os.environ.get("ZEROPLANE_SKIP_RESOURCE_CHECK") != "1":
            self._check_resources(spec)
        preflight_storage(storage)
        job_id = job_id or new_job_id(spec.name)
        self.jobs.submit(build_request(spec, job_id))
        return {"job_id": job_id, "storage": storage.uri_of(storage.path("jobs", job_id))}

    def _check_resources(self, spec: JobSpec) -> None:
        """Refuse a job whose workers cannot fit the cluster as it is now: one worker's CPUs/GPUs above
        every node's, or all workers' CPUs/GPUs above the cluster's total. Ray would otherwise keep the
        job waiting for workers without end. An autoscaling cluster that will grow: set
        ``ZEROPLANE_SKIP_RESOURCE_CHECK=1``. A cluster whose resources cannot be read is not refused.

        Raises:
            ZeroplaneError: naming the field, what the job needs and what the cluster has.
        """
        from .cluster import cluster_status

        nodes = [n for n in cluster_status(self.cluster).get("nodes", []) if n.get("alive")]
        if not nodes:
            return
        s = spec.scaling
        per_worker = {"CPU": float(s.resources_per_worker.get("CPU", 1)),
                      "GPU": float(s.resources_per_worker.get("GPU", 1 if s.use_gpu else 0))}
        for kind, key in (("CPU", "cpus"), ("GPU", "gpus")):
            need = per_worker[kind]
            if need <= 0:
                continue
            biggest = max(float(n.get(key) or 0) for n in nodes)
            total = sum(float(n.get(key) or 0) for n in nodes)
            where = f"the cluster at {self.cluster.dashboard_url}"
            if need > biggest:
                raise ZeroplaneError(
                    f"scaling.resources_per_worker.{kind}={need:g}: no node of {where} has that many "
                    f"(largest: {biggest:g}); lower it (or ZEROPLANE_SKIP_RESOURCE_CHECK=1 for an autoscaling cluster)")
            if need * s.num_workers > total:
                raise ZeroplaneError(
                    f"scaling.num_workers={s.num_workers} x {need:g} {kind} = {need * s.num_workers:g} {kind}, but {where} "
                    f"has {total:g}; lower scaling.num_workers or resources_per_worker "
                    "(or ZEROPLANE_SKIP_RESOURCE_CHECK=1 for an autoscaling cluster)")

    def _check_single_node(self, storage: Storage) -> None:
        """Refuse a node-local storage folder when the cluster has more than one alive node.

        Ray Train workers on other nodes would persist their checkpoint shards to their own disks, so no
        node would hold a complete checkpoint. A cluster whose node list cannot be read is not refused.
        """
        from .cluster import cluster_status

        nodes = [n for n in cluster_status(self.cluster).get("nodes", []) if n.get("alive")]
        if len(nodes) > 1:
            raise ZeroplaneError(
                f"checkpoint.storage_path {storage.uri} is a local folder but the cluster at "
                f"{self.cluster.dashboard_url} has {len(nodes)} nodes, whose workers would each write to their "
                "own disk; use s3://bucket/prefix, or set checkpoint.shared_filesystem: true if that path is "
                "one shared mount (NFS) on every node"
            )

    def resume(self, job_id: str, overrides: Optional[List[str]] = None) -> Dict[str, Any]:
        """Resubmit a finished job so that it continues from its newest complete checkpoint.

        The new Ray Job is ``<job>-r<k>`` (k = 1, 2, …) and runs under the ORIGINAL zeroplane job id: same
        run folder, same checkpoints, same spec (``train.stop_after_steps`` cleared, then ``overrides``
        applied). Resuming a resumed submission resumes the same job.

        Args:
            job_id: the job id or any of its resume submission ids.
            overrides: ``key.path=value`` strings, as ``--set``.

        Returns:
            ``{"job_id": <new submission id>, "zeroplane_job_id", "resume_step": int | None, "storage"}``
            (``resume_step`` None: no complete checkpoint yet, the job starts again from step 0).

        Raises:
            ZeroplaneError: the job is still running (stop it first), storage is not writable, or the
                submission failed.
            SpecError: a bad override.
        """
        from .checkpoints import latest_complete
        from .spec import apply_overrides

        info = self.jobs.info(job_id)
        if info["status"] not in TERMINAL:
            raise ZeroplaneError(f"job {job_id} is {info['status']}; resume it once it has ended "
                                 f"(`zeroplane train stop {job_id}`)")
        run = info["zeroplane_job_id"]
        raw = self.spec_of(job_id).model_dump(mode="json")
        raw["train"]["stop_after_steps"] = None
        spec = parse_spec(apply_overrides(raw, overrides or []), source=f"{job_id} with --set")
        storage = Storage.for_checkpoint_spec(spec.checkpoint)
        preflight_storage(storage)
        newest = latest_complete(storage, run)
        taken = {j["job_id"] for j in self.jobs.list()}
        k = 1
        while f"{run}-r{k}" in taken:
            k += 1
        sub = self.jobs.submit(build_request(spec, run, submission_id=f"{run}-r{k}"))
        return {"job_id": sub, "zeroplane_job_id": run, "resume_step": newest.step if newest else None,
                "storage": storage.uri_of(storage.path("jobs", run))}

    def run_id_of(self, job_id: str) -> str:
        """The zeroplane job id (run folder) of a Ray submission id: itself, or the job a resume continues."""
        return self.jobs.info(job_id)["zeroplane_job_id"]

    def spec_of(self, job_id: str) -> JobSpec:
        """The resolved spec a job was submitted with (from its runtime environment)."""
        d = self.jobs.client.get_job_info(job_id)
        env = ((d.runtime_env or {}).get("env_vars") or {})
        if "ZEROPLANE_SPEC_JSON" not in env:
            raise NotFoundError(f"job {job_id!r} was not submitted by zeroplane")
        return parse_spec(json.loads(env["ZEROPLANE_SPEC_JSON"]), source=job_id)

    def storage_of(self, job_id: str) -> Storage:
        """The storage root of a job: from its spec while the cluster knows the job, else the default
        storage (``$ZEROPLANE_STORAGE`` or ``~/.zeroplane/storage``) when the job's folder is there —
        checkpoints outlive the cluster that wrote them.

        Raises:
            NotFoundError: neither the cluster nor the default storage knows the job.
        """
        try:
            self.jobs.info(job_id)
        except NotFoundError:
            st = Storage.from_uri(default_storage())
            if st.isdir(st.path("jobs", job_id)):
                return st
            raise NotFoundError(
                f"job {job_id!r} is neither on {self.cluster.dashboard_url} nor in {st.uri}; "
                "give its storage with --storage (see `zeroplane train list`)"
            ) from None
        return Storage.for_checkpoint_spec(self.spec_of(job_id).checkpoint)

    def run_id_or_self(self, job_id: str) -> str:
        """:meth:`run_id_of` for a job the cluster knows, else ``job_id`` itself (a job of an earlier cluster)."""
        try:
            return self.run_id_of(job_id)
        except NotFoundError:
            return job_id

    def status(self, job_id: str) -> Dict[str, Any]:
        """Ray job details plus the newest progress event and the final result when finished."""
        info = self.jobs.info(job_id)
        events = parse_progress(self.jobs.client.get_job_logs(job_id))
        steps = [e for e in events if e.get("event") == "step"]
        info["progress"] = steps[-1] if steps else None
        evals = [e for e in events if "val_loss" in e]
        info["val_loss_step0"] = next((e["val_loss"] for e in events if e.get("event") == "eval" and e.get("step") == 0), None)
        info["val_loss"] = evals[-1]["val_loss"] if evals else None
        if info["status"] in TERMINAL:
            try:
                st = self.storage_of(job_id)
                path = st.path("jobs", info["zeroplane_job_id"], "zeroplane_result.json")
                info["result"] = st.read_json(path) if st.exists(path) else None
            except Exception:
                info["result"] = None
        return info

    def wait(self, job_id: str, on_event: Optional[Callable[[Dict[str, Any]], None]] = None,
             poll_s: float = 2.0, timeout_s: Optional[float] = None) -> str:
        """Follow a job until it ends, calling ``on_event`` for each new progress event.

        Returns:
            The terminal status (SUCCEEDED, FAILED or STOPPED).

        Raises:
            ZeroplaneError: ``timeout_s`` elapsed first.
        """
        seen = 0
        start = time.monotonic()
        while True:
            status = self.jobs.status(job_id)
            events = parse_progress(self.jobs.client.get_job_logs(job_id))
            for ev in events[seen:]:
                if on_event:
                    on_event(ev)
            seen = len(events)
            if status in TERMINAL:
                return status
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise ZeroplaneError(f"job {job_id} still {status} after {timeout_s:.0f}s; it keeps running "
                                     f"(`zeroplane train stop {job_id}` ends it)")
            time.sleep(poll_s)

    def follow_logs(self, job_id: str, poll_s: float = 1.0) -> Iterator[str]:
        """Yield log text as it arrives until the job ends."""
        sent = 0
        while True:
            status = self.jobs.status(job_id)
            text = self.jobs.client.get_job_logs(job_id)
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
            if status in TERMINAL:
                return
            time.sleep(poll_s)

    def checkpoints(self, job_id: str, storage: Optional[str] = None, include_incomplete: bool = False):
        """Checkpoints of a job (complete only unless asked), oldest first."""
        st = Storage.from_uri(storage) if storage else self.storage_of(job_id)
        run = job_id if storage else self.run_id_of(job_id)
        return list_checkpoints(st, run, include_incomplete=include_incomplete)

    # ------------------------------------------------------------------ promotion and serving
    def serve_client(self):
        """A :class:`zeroplane.serving.ServeClient` for this cluster."""
        from .serving import ServeClient

        host = "127.0.0.1" if self.cluster.local else "0.0.0.0"
        return ServeClient(self.cluster.dashboard_url, http_host=host, http_port=self.cluster.serve_http_port)

    def promote(self, ref: str, name: str, storage: Optional[str] = None, deploy: bool = True,
                dtype: str = "float32", overrides: Optional[Dict[str, Any]] = None,
                progress: Optional[Callable[[str], None]] = None,
                canary_percent: Optional[float] = None) -> Dict[str, Any]:
        """Consolidate + verify + register the newest complete checkpoint of job ``ref`` (or
        ``job@step`` / a checkpoint URI) as ``name:v<N>``, then deploy it with Ray Serve (see
        :meth:`deploy`; ``canary_percent`` deploys it as a canary of the running version).

        Returns:
            The version record, plus ``url`` when deployed.
        """
        from .promote import promote_checkpoint

        check_model_name(name)
        job_id = ref.partition("@")[0]
        if storage:
            st = Storage.from_uri(storage)
        elif "/" in ref:
            st = storage_of_checkpoint_path(ref)
        else:
            st = self.storage_of(job_id)
            ref = self.run_id_or_self(job_id) + ref[len(job_id):]  # a resume submission id -> its job
        rec = promote_checkpoint(st, ref, name, dtype=dtype, progress=progress)
        if deploy:
            rec["url"] = self.deploy(name, rec["version"], storage=st.uri, overrides=overrides, progress=progress,
                                     canary_percent=canary_percent)
        return rec

    def deploy(self, name: str, version: Optional[str] = None, storage: Optional[str] = None,
               overrides: Optional[Dict[str, Any]] = None,
               progress: Optional[Callable[[str], None]] = None,
               canary_percent: Optional[float] = None, timeout_s: float = 600.0) -> str:
        """Deploy a registered version (newest by default); returns the application URL.

        Deploying to a running application is a zero-downtime in-place update (new replicas start
        before old ones stop). With ``canary_percent`` the version is deployed as a *canary* next to
        the stable version that runs now, taking that percent of the requests; deploying a version
        without ``canary_percent`` ends any split (everything goes to that version).

        Args:
            name: model (application) name.
            version: ``"vN"``; default the newest registered version.
            storage: storage root holding the registry (default :func:`default_storage`).
            overrides: see :func:`zeroplane.serving.app_config`. For a canary, the running
                application's autoscaling, actor options and auth are the base.
            progress: called with one-line progress messages.
            canary_percent: 0 < p < 100, or None for a plain deploy.
            timeout_s: seconds to wait for the rollout (default 600).

        Raises:
            NotFoundError: no such version; or a canary with no running application to split with.
            SpecError: a bad override or percent.
            ZeroplaneError: Serve rejected the config or the rollout did not finish in time.
        """
        from .serving import app_config

        st = Storage.from_uri(storage or default_storage())
        reg = Registry(st)
        rec = reg.get(name, version)
        sc = self.serve_client()
        if canary_percent is None:
            if progress:
                progress(f"deploying {name}:{rec['version']} to Ray Serve")
            app = app_config(name, rec, st.uri, rec.get("serve_defaults") or {}, overrides)
        else:
            running = sc.applications().get(name) or {}
            args = (running.get("deployed_app_config") or {}).get("args") or {}
            if not args.get("version"):
                raise NotFoundError(f"--canary: model {name} is not being served; deploy a stable version first "
                                    f"(`zeroplane serve deploy {name}:vN`)")
            stable = reg.get(name, args["version"])
            if progress:
                progress(f"splitting {name}: {stable['version']} {100 - canary_percent:g}% / "
                         f"{rec['version']} {canary_percent:g}% (canary)")
            base = _running_overrides(running)
            merged = {**base, **(overrides or {}),
                      "autoscaling": {**base.get("autoscaling", {}), **((overrides or {}).get("autoscaling") or {})}}
            app = app_config(name, stable, st.uri, stable.get("serve_defaults") or {}, merged,
                             canary=rec, canary_percent=canary_percent)
        sc.deploy(app, timeout_s=timeout_s, progress=progress)
        return sc.url(name)

    def rollback(self, name: str, storage: Optional[str] = None,
                 progress: Optional[Callable[[str], None]] = None, timeout_s: float = 600.0) -> Dict[str, Any]:
        """Undo the last rollout of ``name`` with the same zero-downtime update as :meth:`deploy`.

        A traffic split is ended by dropping the canary (all traffic back to the stable version);
        otherwise the version registered before the running one (registry order) is deployed, with
        the running application's autoscaling, actor options and auth.

        Returns:
            ``{"name", "from", "to", "url"}`` (versions as ``"vN"``; ``from`` names the canary when one was dropped).

        Raises:
            NotFoundError: the model is not served, or the running version is the oldest registered.
        """
        from .serving import app_config

        st = Storage.from_uri(storage or default_storage())
        reg = Registry(st)
        sc = self.serve_client()
        running = sc.applications().get(name) or {}
        args = (running.get("deployed_app_config") or {}).get("args") or {}
        if not args.get("version"):
            raise NotFoundError(f"model {name} is not being served; nothing to roll back "
                                "(`zeroplane serve status` lists the applications)")
        current = args["version"]
        canary = (args.get("canary") or {}).get("version")
        if canary:
            target, was = reg.get(name, current), canary
        else:
            versions = [r["version"] for r in reg.versions(name)]
            if current not in versions or versions.index(current) == 0:
                raise NotFoundError(f"{name}:{current} is the oldest registered version (versions: "
                                    f"{', '.join(versions)}); there is no earlier version to roll back to")
            target, was = reg.get(name, versions[versions.index(current) - 1]), current
        if progress:
            progress(f"rolling back {name}: {was} -> {target['version']}")
        app = app_config(name, target, st.uri, target.get("serve_defaults") or {}, _running_overrides(running))
        sc.deploy(app, timeout_s=timeout_s, progress=progress)
        return {"name": name, "from": was, "to": target["version"], "url": sc.url(name)}

    def serve_status(self, with_requests: bool = True) -> List[Dict[str, Any]]:
        """Serving applications: versions, weights, replicas and request counts (see ServeClient.status)."""
        return self.serve_client().status(with_requests=with_requests)


def _running_overrides(app_details: Dict[str, Any]) -> Dict[str, Any]:
    """Overrides that keep a running application's autoscaling, actor options, auth and batch size."""
    from .serving import DEPLOYMENT

    cfg = app_details.get("deployed_app_config") or {}
    args = cfg.get("args") or {}
    dep = next((d for d in cfg.get("deployments") or [] if d.get("name") == DEPLOYMENT), {})
    out: Dict[str, Any] = {}
    if dep.get("autoscaling_config"):
        out["autoscaling"] = dict(dep["autoscaling_config"])
    if dep.get("ray_actor_options"):
        out["ray_actor_options"] = dict(dep["ray_actor_options"])
    if "auth" in args:
        out["auth"] = args["auth"]
    if "max_batch_size" in args:
        out["max_batch_size"] = args["max_batch_size"]
    return out


def memory_estimate(spec: JobSpec) -> Dict[str, Any]:
    """Per-worker model-state memory for ``--dry-run``: :func:`zeroplane.estimate.estimate` without the
    runtime (no torch/deepspeed import); ``{"error": …}`` when the model cannot be counted from its config."""
    from .estimate import estimate

    try:
        return estimate(spec, runtime=False)
    except Exception as e:  # a dry run must still show the request
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def storage_of_checkpoint_path(path: str) -> Storage:
    """The storage root holding a checkpoint folder ``<root>/jobs/<job_id>/checkpoint_step_N``.

    Raises:
        SpecError: the path does not have that shape.
    """
    from .checkpoints import step_of
    from .errors import SpecError

    parts = path.rstrip("/").rsplit("/", 3)
    if len(parts) != 4 or parts[1] != "jobs" or step_of(parts[3]) is None:
        raise SpecError(f"{path!r} is not a checkpoint folder <storage>/jobs/<job>/checkpoint_step_NNNNNNN; "
                        "give a job id or such a path")
    return Storage.from_uri(parts[0] or "/")


def preflight_storage(storage: Storage) -> None:
    """Check that the storage root is writable by writing and deleting a small file.

    Raises:
        ZeroplaneError: one line naming the storage (for S3: bucket and endpoint) and the error; never
            the credentials.
    """
    probe = storage.path(".zeroplane-preflight")
    try:
        storage.write_bytes(probe, b"ok")
        storage.fs.delete_file(probe)
    except Exception as e:
        raise ZeroplaneError(storage_error(storage, "is not writable", e)) from None


def storage_error(storage: Storage, what: str, e: BaseException) -> str:
    """One line: ``storage <uri> (bucket B at endpoint E) <what>: <first line of e>``.

    Secret values from the environment are blanked in case a library echoes them back.
    """
    text = " ".join(str(e).split()) or type(e).__name__
    for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        if len(os.environ.get(k) or "") >= 8:  # shorter values would blank ordinary letters
            text = text.replace(os.environ[k], "***")
    if len(text) > 300:
        text = text[:300] + "…"
    where = "" if storage.is_local else (
        f" (bucket {storage.bucket!r} at endpoint {storage.endpoint_url or 'AWS default'})")
    return f"storage {storage.uri}{where} {what}: {text}"


def complete(url: str, prompt: str, max_tokens: int = 32, temperature: float = 0.0, seed: Optional[int] = None,
             api_key: Optional[str] = None, timeout_s: float = 120.0) -> Dict[str, Any]:
    """POST a completion to a deployed model (``url`` from :meth:`Client.deploy`).

    Raises:
        ZeroplaneError: connection failure or an error answer (with the server's reason).
    """
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body: Dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
    if seed is not None:
        body["seed"] = seed
    try:
        r = requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=timeout_s)
    except requests.RequestException as e:
        raise ZeroplaneError(f"cannot reach {url}: {e}") from None
    if r.status_code != 200:
        try:
            reason = r.json()["error"]["message"]
        except Exception:
            reason = r.text[:300]
        hint = " (create a key with `zeroplane serve keys create --save`)" if r.status_code == 401 else ""
        if r.status_code == 404 and "not found" in reason.lower() and "Ping" in reason:
            reason = "no such application on this cluster's Ray Serve"
            hint = " (`zeroplane serve status` lists deployed models; `zeroplane promote` deploys one)"
        raise ZeroplaneError(f"{url} answered {r.status_code}: {reason}{hint}")
    return r.json()
