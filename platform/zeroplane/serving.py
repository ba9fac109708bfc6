"""Deploy registered model versions as Ray Serve applications (declarative API on the dashboard).

Each model is one Serve application named after the model, at route prefix ``/<name>``, built by
``zeroplane.runtime.serve.app:build_app``. Deploying sends the full set of applications (Serve's
``PUT /api/serve/applications/`` replaces the set), so the other applications' configs are carried
over unchanged.

Re-deploying an application with a new version is a Serve in-place update: the ``ModelServer``
deployment's code version changes, and with ``max_surge_percent: 100`` Serve starts each new replica
before it stops an old one (old replicas drain their in-flight requests), so no request is dropped.
A traffic split adds the deployment ``ModelServerCanary`` (the canary version) to the same application;
the ``ModelServer`` ingress sends it ``weight_percent`` % of requests (see the app's module docstring).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

from .errors import NotFoundError, SpecError, ZeroplaneError, first_line
from . import names
from .names import CANARY_DEPLOYMENT, DEPLOYMENT
from .names import GATEWAY_APP, GATEWAY_IMPORT_PATH, GATEWAY_PREFIX, SERVE_IMPORT_PATH

#: Extra replicas (percent of the target) Serve may start during a rollout: new before old stops.
MAX_SURGE_PERCENT = 100


def app_config(name: str, version: Dict[str, Any], storage_uri: str, serve_defaults: Dict[str, Any],
               overrides: Optional[Dict[str, Any]] = None, canary: Optional[Dict[str, Any]] = None,
               canary_percent: Optional[float] = None) -> Dict[str, Any]:
    """The Serve application config for one model version, optionally split with a canary version.

    Args:
        name: model (and application) name.
        version: registry record (``version``, ``uri``) of the stable version.
        storage_uri: storage root (API keys live there).
        serve_defaults: the job spec's ``serve`` section (``ServeSpec`` as dict).
        overrides: ``autoscaling`` keys (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``,
            ``upscale_delay_s``, ``downscale_delay_s``), ``auth``, ``ray_actor_options`` given on the
            command line; they win over ``serve_defaults``.
        canary: registry record of the canary version, or None for no split.
        canary_percent: percent of requests for ``canary``, 0 < p < 100 (required with ``canary``).

    Returns:
        One entry of a Serve config's ``applications`` list.

    Raises:
        SpecError: a bad override or canary percent (names the value and the range).
    """
    from pydantic import ValidationError

    from .spec import format_validation_error
    from .spec.model import AutoscalingSpec, ServeSpec, check_replica_actor_options

    # ``auth`` and ``ray_actor_options`` of versions registered before they were restricted are not taken
    # on trust: auth comes from the deployer only, actor options are checked below.
    stored = {k: v for k, v in (serve_defaults or {}).items() if k not in ("auth", "ray_actor_options")}
    s = ServeSpec.model_validate(stored).model_dump()
    o = overrides or {}
    autoscaling = {**s["autoscaling"], **(o.get("autoscaling") or {})}
    try:
        autoscaling = AutoscalingSpec.model_validate(autoscaling).model_dump()
    except ValidationError as e:
        raise SpecError("; ".join(format_validation_error(e, "autoscaling").splitlines())) from None
    # A stored version's serve_defaults may predate the allow-list: check what is actually deployed.
    actor_options = {**(serve_defaults or {}).get("ray_actor_options", s["ray_actor_options"]),
                     **(o.get("ray_actor_options") or {})}
    check_replica_actor_options(actor_options, "ray_actor_options")
    deployment = {
        "autoscaling_config": autoscaling,
        "ray_actor_options": actor_options,
        "max_surge_percent": MAX_SURGE_PERCENT,
    }
    args: Dict[str, Any] = {
        "model_name": name,
        "version": version["version"],
        "model_uri": version["uri"],
        "storage_path": storage_uri,
        # keys are off only when the deployer says so (--no-auth); a spec's serve section never decides it
        "auth": o.get("auth", True),
        "max_tokens_cap": s["max_tokens_cap"],
        "max_batch_size": o.get("max_batch_size", s["max_batch_size"]),
        "batch_wait_timeout_s": s["batch_wait_timeout_s"],
        "engine": s["engine"],
    }
    if s["engine"] == "vllm":
        return vllm_app_config(name, version, deployment, args["auth"], canary)
    deployments = [{"name": DEPLOYMENT, **deployment}]
    if canary is not None:
        if canary_percent is None or not 0 < canary_percent < 100:
            raise SpecError(f"--canary {canary_percent}: give a percent between 0 and 100 (exclusive), e.g. --canary 10")
        if canary["version"] == version["version"]:
            raise SpecError(f"--canary: the canary {name}:{canary['version']} is already the stable version; "
                            "deploy another version as the canary")
        args["canary"] = {"version": canary["version"], "model_uri": canary["uri"], "weight_percent": canary_percent}
        deployments.append({"name": CANARY_DEPLOYMENT, **deployment})
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": SERVE_IMPORT_PATH,
        "args": args,
        "deployments": deployments,
    }


#: Builder of Ray Serve LLM's OpenAI application (``serve.engine: vllm``).
VLLM_IMPORT_PATH = "ray.serve.llm:build_openai_app"


def vllm_app_config(name: str, version: Dict[str, Any], deployment: Dict[str, Any], auth: bool,
                    canary: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The Serve application serving a registered version with Ray Serve LLM (vLLM underneath).

    One ``LLMConfig`` (``ray.serve.llm``): ``model_loading_config`` ``{"model_id": "NAME:vN", "model_source":
    <version folder>}`` (requests name ``NAME:vN``), the replicas' ``autoscaling_config`` and
    ``max_ongoing_requests`` as ``deployment_config``, the actor options' ``num_gpus`` as the engine's
    ``tensor_parallel_size`` when above 1. Served at ``/<name>/v1`` like the other engines.

    What it does not have yet: zeroplane's API keys, canary split and per-version metrics are implemented
    in zeroplane's own ingress, which this application does not use; so deploying it needs ``auth`` off
    (``--no-auth``, the deployer's explicit choice) and no canary.

    Raises:
        SpecError: ``auth`` on, or a canary, with ``serve.engine: vllm``.
    """
    if auth:
        raise SpecError("serve.engine 'vllm' serves through Ray Serve LLM's own OpenAI app, which does not check "
                        "zeroplane API keys yet; deploy with --no-auth if the endpoint is private, or use "
                        "serve.engine 'continuous'")
    if canary is not None:
        raise SpecError("--canary is not supported with serve.engine 'vllm' yet; deploy the version whole")
    actor = deployment.get("ray_actor_options") or {}
    engine_kwargs: Dict[str, Any] = {}
    gpus = actor.get("num_gpus") or 0
    if gpus > 1:
        engine_kwargs["tensor_parallel_size"] = int(gpus)
    llm_config = {
        "model_loading_config": {"model_id": f"{name}:{version['version']}", "model_source": version["uri"]},
        "engine_kwargs": engine_kwargs,
        "deployment_config": {"autoscaling_config": deployment["autoscaling_config"],
                              "max_ongoing_requests": 64},
    }
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": VLLM_IMPORT_PATH,
        "args": {"llm_configs": [llm_config]},
    }


def served_version(args: Dict[str, Any]) -> Optional[str]:
    """The (stable) version an application's ``args`` serve: ``args["version"]``, or for a ``vllm`` application
    the ``vN`` of its ``model_id`` ``NAME:vN``; None when neither is there."""
    if args.get("version"):
        return args["version"]
    configs = args.get("llm_configs") or [{}]
    model_id = ((configs[0] or {}).get("model_loading_config") or {}).get("model_id") or ""
    return model_id.rpartition(":")[2] or None


def gateway_config(storage_uri: str) -> Dict[str, Any]:
    """The Serve application of the one OpenAI base URL ``http://<host>:<port>/v1`` (the body's ``model``
    picks the application; see ``zeroplane.runtime.serve.gateway``). It always checks API keys (of
    ``storage_uri``): it reaches every model, also those deployed with ``--no-auth``. One small replica."""
    return {
        "name": GATEWAY_APP,
        "route_prefix": GATEWAY_PREFIX,
        "import_path": GATEWAY_IMPORT_PATH,
        "args": {"storage_path": storage_uri, "auth": True},
        "deployments": [{"name": "OpenAIGateway", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}],
    }


def split_of(app_details: Dict[str, Any]) -> List[Dict[str, Any]]:
    """``[{"version", "weight_percent", "deployment"}]`` of a running application (stable first)."""
    args = (app_details.get("deployed_app_config") or {}).get("args") or {}
    canary = args.get("canary") or None
    if not args.get("version"):
        return []
    w = float(canary["weight_percent"]) if canary else 0.0
    if w == 0:  # no split, or the drain step of a rollout that removes the canary (it takes no traffic)
        return [{"version": args["version"], "weight_percent": 100.0, "deployment": DEPLOYMENT}]
    return [{"version": args["version"], "weight_percent": 100.0 - w, "deployment": DEPLOYMENT},
            {"version": canary["version"], "weight_percent": w, "deployment": CANARY_DEPLOYMENT}]


class ServeClient:
    """Deploy, inspect and delete zeroplane applications on a cluster's Serve."""

    def __init__(self, dashboard_url: str, http_host: str = "127.0.0.1", http_port: int = 8000,
                 public_host: Optional[str] = None) -> None:
        self.dashboard_url, self.http_host, self.http_port = dashboard_url, http_host, http_port
        #: The host clients reach the Serve proxy at (``http_host`` is what the proxy binds).
        self.public_host = public_host or ("127.0.0.1" if http_host in ("0.0.0.0", "") else http_host)
        self._client = None

    @property
    def client(self):
        """``ServeSubmissionClient`` (created on first use)."""
        if self._client is None:
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

            try:
                self._client = ServeSubmissionClient(self.dashboard_url)
            except Exception as e:
                raise ZeroplaneError(f"cannot reach Ray Serve's API at {self.dashboard_url}: {first_line(e)}") from None
        return self._client

    def details(self) -> Dict[str, Any]:
        """Serve's instance details (applications, deployments, replicas, http options)."""
        return self.client.get_serve_details()

    def applications(self) -> Dict[str, Any]:
        """``{app name: details}`` of deployed applications."""
        return self.details().get("applications") or {}

    def deploy(self, app: Dict[str, Any], timeout_s: float = 600.0,
               progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
        """Deploy (or update in place) one application and wait until it is RUNNING.

        Raises:
            ZeroplaneError: the application failed to deploy or did not become RUNNING in time.
        """
        self.apply(app)
        canary = (app["args"].get("canary") or {}).get("version")
        return self.wait_running(app["name"], served_version(app["args"]), timeout_s, progress, canary_version=canary)

    def apply(self, app: Dict[str, Any]) -> None:
        """Send one application's config to Serve (the other applications' configs carried over) without
        waiting; :mod:`zeroplane.releases` watches what follows.

        Raises:
            ZeroplaneError: Serve rejected the config.
        """
        current = self.applications()
        apps: List[Dict[str, Any]] = []
        for name, d in current.items():
            if name != app["name"] and d.get("deployed_app_config"):
                apps.append(d["deployed_app_config"])
        apps.append(app)
        if GATEWAY_APP not in current and app["args"].get("storage_path"):
            apps.append(gateway_config(app["args"]["storage_path"]))
        config = {"http_options": {"host": self.http_host, "port": self.http_port}, "applications": apps}
        try:
            self.client.deploy_applications(config)
        except Exception as e:
            raise ZeroplaneError(f"Serve rejected the deployment of {app['name']}: {first_line(e)}") from None

    def node_resources(self) -> Optional[List[Dict[str, float]]]:
        """Each alive node's total resources (``{"CPU": n, …}``), from ``ray.util.state``; None when they
        cannot be read (the fit check is then left to Serve's own report)."""
        from .cluster.status import node_resources

        try:
            return node_resources(self.dashboard_url)
        except Exception:
            return None

    def wait_running(self, name: str, version: str, timeout_s: float,
                     progress: Optional[Callable[[str], None]] = None,
                     canary_version: Optional[str] = None) -> Dict[str, Any]:
        """Wait until application ``name`` runs ``version`` (and ``canary_version``) with every deployment
        HEALTHY, i.e. the rollout is complete; returns its details.

        Raises:
            ZeroplaneError: the application failed (DEPLOY_FAILED/UNHEALTHY) or ``timeout_s`` seconds passed.
        """
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            d = self.applications().get(name) or {}
            status = d.get("status", "NOT_STARTED")
            args = (d.get("deployed_app_config") or {}).get("args") or {}
            deps = d.get("deployments") or {}
            healthy = bool(deps) and all(x.get("status") == "HEALTHY" for x in deps.values())
            if (status == "RUNNING" and healthy and served_version(args) == version
                    and (args.get("canary") or {}).get("version") == canary_version):
                return d
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise ZeroplaneError(f"Serve application {name} is {status}: {_message(d)}")
            if progress and status != last:
                progress(f"application {name}: {status}")
                last = status
            time.sleep(1.0)
        raise ZeroplaneError(f"Serve application {name} not RUNNING after {timeout_s:.0f}s: {_message(self.applications().get(name) or {})}")

    def status(self, with_requests: bool = True) -> List[Dict[str, Any]]:
        """One row per zeroplane application: versions with weights, replicas and request counts.

        Args:
            with_requests: also read request counts from Ray's metrics export (each node's metrics agent;
                counts lag the traffic by Ray's metrics report period, about 10 s).

        Returns:
            ``[{"name", "status", "url", "versions": [{"version", "weight_percent", "deployment",
            "status", "replicas": {state: count}, "running_replicas", "autoscaling", "requests",
            "errors"}]}]``; ``requests``/``errors`` are None when the metrics export cannot be read.
        """
        apps = self.applications()
        counts = self.request_counts() if with_requests else None
        rows = []
        for name, d in apps.items():
            if name == GATEWAY_APP:
                continue
            deps = d.get("deployments") or {}
            versions = []
            for v in split_of(d):
                dep = deps.get(v["deployment"]) or {}
                states: Dict[str, int] = {}
                for r in dep.get("replicas") or []:
                    states[r.get("state", "?")] = states.get(r.get("state", "?"), 0) + 1
                cfg = dep.get("deployment_config") or {}
                key = (name, v["version"])
                versions.append({**v, "status": dep.get("status"), "replicas": states,
                                 "running_replicas": states.get("RUNNING", 0),
                                 "autoscaling": cfg.get("autoscaling_config"),
                                 "requests": None if counts is None else counts.get(key, {}).get("requests", 0),
                                 "errors": None if counts is None else counts.get(key, {}).get("errors", 0)})
            rows.append({"name": name, "status": d.get("status"), "url": self.url(name),
                         "route_prefix": d.get("route_prefix"), "versions": versions})
        return rows

    def request_counts(self) -> Optional[Dict[Any, Dict[str, float]]]:
        """``{(model, version): {"requests", "errors"}}`` summed over every replica, from the Prometheus
        endpoint of each alive node's metrics agent (found through the dashboard); None if unreadable."""
        import requests

        from .cluster import auth_headers

        try:
            r = requests.get(f"{self.dashboard_url}/nodes?view=summary", headers=auth_headers(self.dashboard_url), timeout=10)
            r.raise_for_status()
            endpoints = _metrics_endpoints(r.json())
        except Exception:
            return None
        if not endpoints:
            return None
        totals: Dict[Any, Dict[str, float]] = {}
        read_any = False
        for url in endpoints:
            try:
                text = requests.get(url, timeout=10).text
            except Exception:
                continue
            read_any = True
            for (model, version), kind, value in _zeroplane_samples(text):
                slot = totals.setdefault((model, version), {"requests": 0, "errors": 0})
                slot[kind] += value
        return totals if read_any else None

    def delete(self, name: str) -> None:
        """Remove one application (the others keep running).

        Raises:
            NotFoundError: no such application.
        """
        current = self.applications()
        if name not in current:
            raise NotFoundError(f"no Serve application {name!r}; `zeroplane serve status` lists them")
        apps = [d["deployed_app_config"] for n, d in current.items() if n != name and d.get("deployed_app_config")]
        if all(a.get("name") == GATEWAY_APP for a in apps):
            apps = []  # the /v1 gateway alone serves nothing
        if apps:
            self.client.deploy_applications({"http_options": {"host": self.http_host, "port": self.http_port},
                                             "applications": apps})
        else:
            self.client.delete_applications()

    def url(self, name: str) -> str:
        """Base URL of an application, e.g. ``http://127.0.0.1:8000/pydoc-gpt`` (on ``public_host``)."""
        host = f"[{self.public_host}]" if ":" in self.public_host else self.public_host
        return f"http://{host}:{self.http_port}/{name}"


def _message(d: Dict[str, Any]) -> str:
    msgs = [d.get("message") or ""]
    for dep in (d.get("deployments") or {}).values():
        if dep.get("message"):
            msgs.append(dep["message"])
    text = " | ".join(m for m in msgs if m)
    return text[:2000] or "(no message)"


def _metrics_endpoints(summary: Any) -> List[str]:
    """``http://ip:port/metrics`` of every alive node's metrics agent in a dashboard node summary."""
    out: List[str] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            port = obj.get("metricsExportPort") or obj.get("metrics_export_port")
            ip = obj.get("nodeManagerAddress") or obj.get("node_manager_address") or obj.get("ip")
            alive = obj.get("state", "ALIVE") == "ALIVE"
            if port and ip and alive:
                out.append(f"http://{ip}:{int(port)}/metrics")
                return
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(summary)
    return sorted(set(out))


def _zeroplane_samples(text: str):
    """``((model, version), "requests"|"errors", value)`` for zeroplane's request counters in Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(names.METRIC_REQUESTS):
                kind = "requests"
            elif sample.name.endswith(names.METRIC_ERRORS):
                kind = "errors"
            else:
                continue
            labels = sample.labels
            if "model" in labels and "version" in labels:
                yield (labels["model"], labels["version"]), kind, sample.value
