"""The serving half of :class:`zeroplane.sdk.Client`: promotion, rollouts and releases on Ray Serve, the
model registry, API keys and completions (a mixin; :mod:`zeroplane.sdk` holds the training half and the
calls that need no cluster)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional

from . import layout, names
from .backends.rayjobs import new_job_id
from .completions import complete
from .errors import NotFoundError, SpecError, ZeroplaneError, first_line
from .registry import Registry, check_model_name, parse_ref
from .releases import History, describe, rollback_target, rollout, state_of
from .results import ApiKeyInfo, ClusterStatus, ModelVersion, NewKey, Promotion, PromotePlan, Rollback, ServeApp
from .saved_key import api_key_path, check_writable_file, save_api_key
from .storage import Storage


class ServingMixin:
    """Methods of :class:`zeroplane.sdk.Client` about serving; they use its ``cluster``, ``storage()``,
    ``jobs`` and job lookups."""

    # ------------------------------------------------------------------ promotion and serving
    def serve_client(self):
        """A :class:`zeroplane.serving.ServeClient` for this cluster."""
        from .serving import ServeClient

        from urllib.parse import urlsplit

        # A remote cluster's Serve proxy is reached on the host of its dashboard, not on this machine.
        public = "127.0.0.1" if self.cluster.local else (urlsplit(self.cluster.dashboard_url).hostname or "127.0.0.1")
        # the proxy listens where the head does (a local head: loopback unless started with --host 0.0.0.0)
        host = getattr(self.cluster, "bind_host", None) or ("127.0.0.1" if self.cluster.local else "0.0.0.0")
        return ServeClient(self.cluster.dashboard_url, http_host=host, http_port=self.cluster.serve_http_port,
                           public_host=public)

    def serve_url(self, name: str) -> str:
        """Base URL of model ``name``'s application, e.g. ``http://127.0.0.1:8000/pydoc-gpt``."""
        return self.serve_client().url(name)

    def _checkpoint_storage(self, ref: str, storage: Optional[str]):
        """``(storage, CheckpointRef)`` for a promote reference; a resume submission id becomes its job."""
        cref = layout.parse_checkpoint_ref(ref)
        if storage:
            return Storage.from_uri(storage), cref
        if cref.is_path:
            return Storage.from_uri(cref.storage_uri), cref
        return self.storage_of(cref.job_id), cref.with_job(self.run_id_or_self(cref.job_id))

    def promote_plan(self, ref: str, name: str, storage: Optional[str] = None, deploy: bool = True,
                     overrides: Optional[Dict[str, Any]] = None) -> PromotePlan:
        """What :meth:`promote` would do: the checkpoint, the version it would register, the Serve config.
        Changes nothing.

        Raises:
            SpecError: a bad name or reference.
            NotFoundError: no complete checkpoint matches.
        """
        from .promote import resolve_checkpoint
        from .serving import app_config

        check_model_name(name)
        st, cref = self._checkpoint_storage(ref, storage)
        ck = resolve_checkpoint(st, cref)
        reg = Registry(st)
        version = reg.next_version(name)
        spec_serve = st.read_json(f"{ck.path}/{layout.CKPT_META}").get("spec", {}).get("serve", {})
        app = None if not deploy else app_config(
            name, {"version": version, "uri": st.uri_of(reg.version_dir(name, version))}, st.uri, spec_serve, overrides)
        return PromotePlan(checkpoint=ck.to_dict(), would_register=f"{name}:{version}", serve_application=app)

    def promote(self, ref: str, name: str, storage: Optional[str] = None, deploy: bool = True,
                dtype: str = "float32", overrides: Optional[Dict[str, Any]] = None,
                progress: Optional[Callable[[str], None]] = None,
                canary_percent: Optional[float] = None, gate: bool = False) -> Promotion:
        """Consolidate + verify + register the newest complete checkpoint of job ``ref`` (or
        ``job@step`` / a checkpoint URI) as ``name:v<N>``, then deploy it with Ray Serve (see
        :meth:`deploy`; ``canary_percent`` deploys it as a canary of the running version, ``gate`` then
        starts a gated release of it).

        Raises:
            SpecError: a bad name, reference or override.
            NotFoundError: no complete checkpoint matches.
            ZeroplaneError: consolidation, verification or the deployment failed.
        """
        from .promote import promote_checkpoint

        check_model_name(name)
        st, cref = self._checkpoint_storage(ref, storage)
        rec = promote_checkpoint(st, cref, name, dtype=dtype, progress=progress)
        url = None
        if deploy:
            url = self.deploy(name, rec["version"], storage=st.uri, overrides=overrides, progress=progress,
                              canary_percent=canary_percent, gate=gate)
        return Promotion(record=rec, url=url)

    def deploy(self, name: str, version: Optional[str] = None, storage: Optional[str] = None,
               overrides: Optional[Dict[str, Any]] = None,
               progress: Optional[Callable[[str], None]] = None,
               canary_percent: Optional[float] = None, timeout_s: float = 600.0,
               command: Optional[str] = None, gate: bool = False) -> str:
        """Deploy a registered version (newest by default); returns the application URL.

        The rollout goes through :func:`zeroplane.releases.rollout`: recorded in the application's
        history, refused before anything changes when a replica fits on no node, and undone (the
        previous config serving again) when a replica fails to start or cannot be scheduled.

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
            command: the operator's command, for the history (default ``serve deploy NAME:vN``).
            gate: with ``canary_percent``: once the canary serves, start a gated release on the cluster
                (:meth:`start_release`) that advances it on evidence or rolls it back.

        Raises:
            NotFoundError: no such version; or a canary with no running application to split with.
            SpecError: a bad override or percent.
            ZeroplaneError: the version's files do not match its marker (:meth:`Registry.check_files`), or Serve
                rejected the config.
            RolloutFailed: the rollout failed and was undone (see :func:`zeroplane.releases.rollout`).
        """
        from .serving import app_config

        if gate and canary_percent is None:
            raise SpecError("--gate needs --canary PERCENT: a gated release starts from a canary, e.g. --canary 10 --gate")
        st = self.storage(storage)
        reg = Registry(st)
        rec = reg.get(name, version)
        reg.check_files(rec)  # a damaged version is refused before any replica tries to load it
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
            base = running_overrides(running)
            merged = {**base, **(overrides or {}),
                      "autoscaling": {**base.get("autoscaling", {}), **((overrides or {}).get("autoscaling") or {})}}
            app = app_config(name, stable, st.uri, stable.get("serve_defaults") or {}, merged,
                             canary=rec, canary_percent=canary_percent)
        what = f"{name}:{rec['version']}" + (f" --canary {canary_percent:g}" if canary_percent is not None else "")
        rollout(sc, st, app, command or f"serve deploy {what}" + (" --gate" if gate else ""), timeout_s=timeout_s,
                nodes=sc.node_resources(), progress=progress)
        if gate:
            job = self.start_release(name, stable, rec, canary_percent, st)
            if progress:
                progress(f"gated release started on the cluster (job {job}); `zeroplane serve status` shows it")
        return sc.url(name)

    def start_release(self, name: str, stable: Dict[str, Any], canary: Dict[str, Any], percent: float,
                      storage: Storage) -> str:
        """Submit the gated release of ``canary`` (serving ``percent`` % next to ``stable``) as a Ray Job
        running :mod:`zeroplane.runtime.release`; returns its job id.

        Raises:
            ZeroplaneError: the submission failed.
        """
        from .backends.rayjobs import PASSTHROUGH_ENV, UPLOAD_EXCLUDES

        job_id = new_job_id(f"release-{name}")
        cluster = {k: v for k, v in self.cluster.to_dict().items()
                   if k in ("address", "dashboard_url", "serve_http_port", "local", "bind_host", "auth")}
        doc = {"id": job_id, "name": name, "stable": stable, "canary": canary, "percent": percent,
               "storage": storage.uri, "cluster": cluster}
        env = {names.ENV_RELEASE_JSON: json.dumps(doc, default=str), "PYTHONUNBUFFERED": "1"}
        env.update({k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)})
        pkg = os.path.dirname(os.path.abspath(__file__))
        try:
            return self.jobs.client.submit_job(
                entrypoint=names.RELEASE_ENTRYPOINT, submission_id=job_id,
                runtime_env={"py_modules": [pkg], "excludes": list(UPLOAD_EXCLUDES), "env_vars": env},
                metadata={names.META_KIND: names.META_KIND_RELEASE, names.META_NAME: name})
        except Exception as e:
            raise ZeroplaneError(f"starting the gated release of {name}:{canary['version']} failed: {first_line(e)}; "
                                 f"the canary keeps {percent:g}% of the traffic (`zeroplane serve rollback {name}` "
                                 "ends it)") from None

    def rollback(self, name: str, storage: Optional[str] = None,
                 progress: Optional[Callable[[str], None]] = None, timeout_s: float = 600.0) -> Rollback:
        """Return ``name`` to what it served before the last change that took effect, as recorded in its
        deployment history (:func:`zeroplane.releases.rollback_target`), with the running application's
        autoscaling, actor options and auth, through the same watched rollout as :meth:`deploy`.

        Raises:
            SpecError: a bad name.
            NotFoundError: the model is not served, no recorded change led to what serves now, or that
                change was the first deployment.
            RolloutFailed: the rollback itself failed and was undone.
        """
        from .serving import app_config

        names.check_name(name, "model name")
        st = self.storage(storage)
        reg = Registry(st)
        sc = self.serve_client()
        running = sc.applications().get(name) or {}
        current = state_of(running.get("deployed_app_config"))
        if current is None:
            raise NotFoundError(f"model {name} is not being served; nothing to roll back "
                                "(`zeroplane serve status` lists the applications)")
        target = rollback_target(History(st, name), current)
        if progress:
            progress(f"rolling back {name}: {describe(current)} -> {describe(target)}")
        stable = reg.get(name, target["version"])
        canary = reg.get(name, target["canary"]["version"]) if target.get("canary") else None
        app = app_config(name, stable, st.uri, stable.get("serve_defaults") or {}, running_overrides(running),
                         canary=canary, canary_percent=(target.get("canary") or {}).get("weight_percent"))
        rollout(sc, st, app, f"serve rollback {name}", timeout_s=timeout_s, nodes=sc.node_resources(),
                progress=progress)
        displaced = (current.get("canary") or {}).get("version") or current["version"]
        return Rollback(name=name, from_version=displaced, to_version=describe(target), url=sc.url(name))

    def serve_history(self, name: str, storage: Optional[str] = None) -> List[Dict[str, Any]]:
        """The deployment history of application ``name``, oldest first (see :class:`zeroplane.releases.History`).

        Raises:
            SpecError: a bad name.
        """
        names.check_name(name, "model name")
        return History(self.storage(storage), name).entries()

    def serve_status(self, with_requests: bool = True, storage: Optional[str] = None) -> List[ServeApp]:
        """Serving applications: versions, weights, replicas and request counts (see ``ServeClient.status``;
        ``with_requests`` reads the counts from Ray's metrics export, which lags by about 10 s), each with
        the newest entry of its deployment history from ``storage`` (what the last change did) and its
        newest gated release."""
        st = self.storage(storage)

        def release_of(name: str) -> Optional[Dict[str, Any]]:
            path = st.path(layout.release_file(name))
            try:
                return st.read_json(path) if st.exists(path) else None
            except ValueError:
                return None

        return [ServeApp(**row, last_change=(History(st, row["name"]).entries() or [None])[-1],
                         release=release_of(row["name"]))
                for row in self.serve_client().status(with_requests=with_requests)]

    def serve_delete(self, name: str) -> None:
        """Remove the Serve application of model ``name``.

        Raises:
            SpecError: a bad name.
            NotFoundError: no such application.
        """
        names.check_name(name, "model name")
        self.serve_client().delete(name)

    def cluster_status(self) -> ClusterStatus:
        """Nodes, resources and job counts of the cluster."""
        from .cluster import cluster_status

        return ClusterStatus.from_dict(cluster_status(self.cluster))

    # ------------------------------------------------------------------ registry and keys (storage only)
    def models(self, name: Optional[str] = None, storage: Optional[str] = None) -> List[ModelVersion]:
        """Registered versions, of ``name`` or of every model, oldest first.

        Raises:
            SpecError: a bad name.
        """
        if name:
            names.check_name(name, "model name")
        reg = Registry(self.storage(storage))
        return [ModelVersion(v) for m in ([name] if name else reg.models()) for v in reg.versions(m)]

    def models_gc(self, name: Optional[str] = None, keep_latest: int = 0, delete: bool = False,
                  storage: Optional[str] = None) -> Dict[str, Any]:
        """List (and with ``delete`` remove) the registered versions no endpoint needs (see
        :mod:`zeroplane.retention`): not serving, not a canary, not the rollback target, not among the
        newest ``keep_latest`` of their model.

        Returns:
            ``{"keep": [{"name", "version", "uri", "why"}], "collect": [...], "deleted": ["name:vN"]}``.

        Raises:
            SpecError: a bad name or ``keep_latest`` < 0.
            ZeroplaneError: Serve cannot be asked what it runs (nothing is deleted then).
        """
        from . import retention

        if name:
            names.check_name(name, "model name")
        if keep_latest < 0:
            raise SpecError(f"--keep-latest {keep_latest}: give 0 or more")
        reg = Registry(self.storage(storage))
        try:
            served = {n: d.get("deployed_app_config") for n, d in self.serve_client().applications().items()}
        except Exception as e:
            raise ZeroplaneError(f"cannot ask Ray Serve which versions are deployed ({first_line(e)}); nothing was "
                                 "deleted. Run `zeroplane models gc` with the cluster that serves this storage up") from None
        keep, drop = retention.plan(reg, served, [name] if name else None, keep_latest)
        deleted = retention.collect(reg, drop) if delete else []
        return {"keep": keep, "collect": drop, "deleted": deleted}

    def model_lineage(self, ref: str, storage: Optional[str] = None) -> Dict[str, Any]:
        """Job → spec → checkpoint step → data → version → every deployment, for ``NAME[:vN]`` (newest by
        default); see :func:`zeroplane.retention.lineage`.

        Raises:
            SpecError: a bad reference; NotFoundError: no such version.
        """
        from .retention import lineage

        name, version = parse_ref(ref)
        st = self.storage(storage)
        return lineage(st, name, version or Registry(st).get(name)["version"])

    def create_key(self, name: Optional[str] = None, storage: Optional[str] = None, save: bool = False) -> NewKey:
        """Create a serving API key; only its hash is stored. ``save``: also write it to
        :func:`api_key_path` (mode 0600) for ``complete``.

        Raises:
            ZeroplaneError: the key file cannot be written (checked before the key is created; if writing
                still fails, the new key is revoked, so that no key lives that nobody holds).
        """
        from .serve_keys import create_key, revoke_key

        if save:
            check_writable_file(api_key_path())
        st = self.storage(storage)
        key, rec = create_key(st.uri, name)
        if not save:
            return NewKey(key=key, record=rec)
        try:
            return NewKey(key=key, record=rec, saved_to=str(save_api_key(key)))
        except OSError as e:
            revoke_key(st.uri, rec["id"])
            raise ZeroplaneError(f"cannot save the key to {api_key_path()}: {e.strerror or e}; it was revoked") from None

    def list_keys(self, storage: Optional[str] = None) -> List[ApiKeyInfo]:
        """Key ids, labels, creation times and revocation state (never the keys)."""
        from .serve_keys import list_keys

        return [ApiKeyInfo.from_record(r) for r in list_keys(self.storage(storage).uri)]

    def revoke_key(self, key_id: str, storage: Optional[str] = None) -> ApiKeyInfo:
        """Revoke a key by id (replicas stop accepting it within their cache TTL).

        Raises:
            NotFoundError: no such key.
        """
        from .serve_keys import revoke_key

        return ApiKeyInfo.from_record(revoke_key(self.storage(storage).uri, key_id))

    def complete(self, name: str, prompt: str, max_tokens: int = 32, temperature: float = 0.0,
                 seed: Optional[int] = None, api_key: Optional[str] = None, timeout_s: float = 120.0):
        """Ask the deployed model ``name`` to continue ``prompt`` (see :func:`complete`).

        Raises:
            SpecError: a bad name.
            ZeroplaneError: no answer, or an error answer (with the server's reason).
        """
        names.check_name(name, "model name")
        return complete(self.serve_url(name), prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                        api_key=api_key, timeout_s=timeout_s, model=name)


def running_overrides(app_details: Dict[str, Any]) -> Dict[str, Any]:
    """Overrides that keep a running application's autoscaling, actor options, auth and batch size."""
    cfg = app_details.get("deployed_app_config") or {}
    args = cfg.get("args") or {}
    dep = next((d for d in cfg.get("deployments") or [] if d.get("name") == names.DEPLOYMENT), {})
    out: Dict[str, Any] = {}
    if dep.get("autoscaling_config"):
        out["autoscaling"] = dict(dep["autoscaling_config"])
    if dep.get("ray_actor_options"):
        out["ray_actor_options"] = dict(dep["ray_actor_options"])
    for k in ("auth", "max_batch_size"):
        if k in args:
            out[k] = args[k]
    return out
