"""Deploy registered model versions as Ray Serve applications (declarative API on the dashboard).

Each model is one Serve application named after the model, at route prefix ``/<name>``, built by
``zeroplane.runtime.serve.app:build_app``. Deploying sends the full set of applications (Serve's
``PUT /api/serve/applications/`` replaces the set), so the other applications' configs are carried
over unchanged. Re-deploying an application with a new version is a Serve rolling update.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

from .errors import NotFoundError, ZeroplaneError

IMPORT_PATH = "zeroplane.runtime.serve.app:build_app"
DEPLOYMENT = "ModelServer"


def app_config(name: str, version: Dict[str, Any], storage_uri: str, serve_defaults: Dict[str, Any],
               overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The Serve application config for one model version.

    Args:
        name: model (and application) name.
        version: registry record (``version``, ``uri``).
        storage_uri: storage root (API keys live there).
        serve_defaults: the job spec's ``serve`` section (``ServeSpec`` as dict).
        overrides: ``autoscaling`` keys, ``auth``, ``ray_actor_options`` given on the command line.
    """
    from .spec.model import ServeSpec

    s = ServeSpec.model_validate(serve_defaults or {}).model_dump()
    o = overrides or {}
    autoscaling = {**s["autoscaling"], **(o.get("autoscaling") or {})}
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": IMPORT_PATH,
        "args": {
            "model_name": name,
            "version": version["version"],
            "model_uri": version["uri"],
            "storage_path": storage_uri,
            "auth": o.get("auth", s["auth"]),
            "max_tokens_cap": s["max_tokens_cap"],
            "max_batch_size": s["max_batch_size"],
            "batch_wait_timeout_s": s["batch_wait_timeout_s"],
        },
        "deployments": [{
            "name": DEPLOYMENT,
            "autoscaling_config": autoscaling,
            "ray_actor_options": {**s["ray_actor_options"], **(o.get("ray_actor_options") or {})},
        }],
    }


class ServeClient:
    """Deploy, inspect and delete zeroplane applications on a cluster's Serve."""

    def __init__(self, dashboard_url: str, http_host: str = "127.0.0.1", http_port: int = 8000) -> None:
        self.dashboard_url, self.http_host, self.http_port = dashboard_url, http_host, http_port
        self._client = None

    @property
    def client(self):
        """``ServeSubmissionClient`` (created on first use)."""
        if self._client is None:
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

            try:
                self._client = ServeSubmissionClient(self.dashboard_url)
            except Exception as e:
                raise ZeroplaneError(f"cannot reach Ray Serve's API at {self.dashboard_url}: {str(e).splitlines()[0]}") from None
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
        current = self.applications()
        apps: List[Dict[str, Any]] = []
        for name, d in current.items():
            if name != app["name"] and d.get("deployed_app_config"):
                apps.append(d["deployed_app_config"])
        apps.append(app)
        config = {"http_options": {"host": self.http_host, "port": self.http_port}, "applications": apps}
        try:
            self.client.deploy_applications(config)
        except Exception as e:
            raise ZeroplaneError(f"Serve rejected the deployment of {app['name']}: {str(e).splitlines()[0]}") from None
        return self.wait_running(app["name"], app["args"]["version"], timeout_s, progress)

    def wait_running(self, name: str, version: str, timeout_s: float,
                     progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
        """Wait until application ``name`` runs ``version``; returns its details."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            d = self.applications().get(name) or {}
            status = d.get("status", "NOT_STARTED")
            running_version = ((d.get("deployed_app_config") or {}).get("args") or {}).get("version")
            if status == "RUNNING" and running_version == version:
                return d
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise ZeroplaneError(f"Serve application {name} is {status}: {_message(d)}")
            if progress and status != last:
                progress(f"application {name}: {status}")
                last = status
            time.sleep(1.0)
        raise ZeroplaneError(f"Serve application {name} not RUNNING after {timeout_s:.0f}s: {_message(self.applications().get(name) or {})}")

    def delete(self, name: str) -> None:
        """Remove one application (the others keep running).

        Raises:
            NotFoundError: no such application.
        """
        current = self.applications()
        if name not in current:
            raise NotFoundError(f"no Serve application {name!r}; `zeroplane serve status` lists them")
        apps = [d["deployed_app_config"] for n, d in current.items() if n != name and d.get("deployed_app_config")]
        if apps:
            self.client.deploy_applications({"http_options": {"host": self.http_host, "port": self.http_port},
                                             "applications": apps})
        else:
            self.client.delete_applications()

    def url(self, name: str) -> str:
        """Base URL of an application, e.g. ``http://127.0.0.1:8000/pydoc-gpt``."""
        host = "127.0.0.1" if self.http_host in ("0.0.0.0", "") else self.http_host
        return f"http://{host}:{self.http_port}/{name}"


def _message(d: Dict[str, Any]) -> str:
    msgs = [d.get("message") or ""]
    for dep in (d.get("deployments") or {}).values():
        if dep.get("message"):
            msgs.append(dep["message"])
    text = " | ".join(m for m in msgs if m)
    return text[:2000] or "(no message)"
