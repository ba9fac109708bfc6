"""What a cluster has now: liveness, nodes with their resources, and jobs by status, read through Ray's
state API (``ray.util.state``) with the token-auth header."""

from __future__ import annotations

from typing import Any, Optional

from zeroplane.errors import first_line

from .auth import auth_headers
from .state import ClusterInfo

_TIMEOUT_S = 10
"""Seconds each state-API call may take (node and job listings)."""

_VERSION_TIMEOUT_S = 5
"""Seconds the liveness probe (``/api/version``) may take."""


def cluster_status(info: ClusterInfo) -> dict[str, Any]:
    """Summarise a cluster through its dashboard (with the token-auth header when a token exists).

    Liveness and Ray version come from ``/api/version``; nodes and their logical resources from
    the state API's node listing (``ray.util.state``, ``list_nodes``); jobs (submitted and driver
    jobs) from its job listing. Tolerant: a part that cannot be read stays empty and adds a
    one-line message under ``"errors"``; an unreachable dashboard gives ``alive: False``. Never
    raises for an unreachable or failing cluster.

    Args:
        info: The cluster to query (its ``dashboard_url`` is the one queried, whatever
            ``RAY_ADDRESS`` says).

    Returns:
        ``{"address", "dashboard_url", "alive": bool, "nodes": [{"node_id": str, "ip": str,
        "alive": bool, "cpus": float, "gpus": float}], "resources": {"CPU": total, "GPU": total}
        (logical, alive nodes only), "jobs": {status: count}}`` plus ``"ray_version"`` when known
        and ``"errors": [str]`` when something failed.
    """
    base = info.dashboard_url.rstrip("/")
    result: dict[str, Any] = {
        "address": info.address,
        "dashboard_url": info.dashboard_url,
        "alive": False,
        "nodes": [],
        "resources": {"CPU": 0.0, "GPU": 0.0},
        "jobs": {},
    }
    errors: list[str] = []

    try:
        version = _ray_version(base)
        result["alive"] = True
        if version:
            result["ray_version"] = version
    except Exception as e:  # noqa: BLE001 - report, don't fail
        result["errors"] = [f"/api/version: {first_line(e)[:300]}"]
        return result

    try:
        client = _state_client(base)
    except Exception as e:  # noqa: BLE001
        result["errors"] = [f"state API: {first_line(e)[:300]}"]
        return result

    try:
        nodes = [_node_row(n) for n in _list(client, "NODES")]
        result["nodes"] = nodes
        alive = [n for n in nodes if n["alive"]]
        result["resources"] = {"CPU": sum(n["cpus"] for n in alive), "GPU": sum(n["gpus"] for n in alive)}
    except Exception as e:  # noqa: BLE001
        errors.append(f"nodes: {first_line(e)[:300]}")

    try:
        counts: dict[str, int] = {}
        for job in _list(client, "JOBS"):
            status = getattr(job, "status", None)
            status = str(getattr(status, "value", status) or "UNKNOWN")
            counts[status] = counts.get(status, 0) + 1
        result["jobs"] = counts
    except Exception as e:  # noqa: BLE001
        errors.append(f"jobs: {first_line(e)[:300]}")

    if errors:
        result["errors"] = errors
    return result


def _ray_version(base: str) -> Optional[str]:
    """GET ``{base}/api/version`` with the auth header; the cluster's Ray version (None if not given).

    Raises:
        PermissionError: HTTP 401/403 (token missing or wrong), with where to put the token.
        requests.RequestException / ValueError: no answer, another HTTP error, or not JSON.
    """
    import requests

    resp = requests.get(f"{base}/api/version", headers=auth_headers(base), timeout=_VERSION_TIMEOUT_S)
    if resp.status_code in (401, 403):
        raise PermissionError(
            f"dashboard refused the request (HTTP {resp.status_code}): the cluster uses token "
            "authentication; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the token in "
            "~/.ray/auth_token"
        )
    resp.raise_for_status()
    body = resp.json()
    return str(body["ray_version"]) if isinstance(body, dict) and body.get("ray_version") else None


def _state_client(dashboard_url: str) -> Any:
    """A ``ray.util.state.StateApiClient`` for exactly ``dashboard_url``, sending the auth header.

    ``StateApiClient(address=...)`` (and so ``list_nodes(address=...)``) lets ``RAY_ADDRESS`` /
    ``RAY_API_SERVER_ADDRESS`` override the address it is given; zeroplane's address was already
    resolved (``--address`` wins over ``RAY_ADDRESS``), so the client is set up for it directly.
    Explicit headers also make the request carry the token whether or not ``RAY_AUTH_MODE`` is set
    in this process (Ray only adds its own header in token mode).
    """
    from ray.dashboard.modules.dashboard_sdk import SubmissionClient
    from ray.util.state import StateApiClient

    client = StateApiClient.__new__(StateApiClient)
    SubmissionClient.__init__(client, address=dashboard_url, create_cluster_if_needed=False,
                              headers={"Content-Type": "application/json", **auth_headers(dashboard_url)})
    return client


def _list(client: Any, resource: str) -> list[Any]:
    """All entries of one state-API resource (``"NODES"``, ``"JOBS"``), tolerating partial output."""
    from ray.util.state.common import ListApiOptions, StateResource

    return client.list(StateResource[resource], options=ListApiOptions(timeout=_TIMEOUT_S),
                       raise_on_missing_output=False)


def _node_row(node: Any) -> dict[str, Any]:
    """One ``ray.util.state.common.NodeState`` as ``{"node_id", "ip", "alive", "cpus", "gpus"}``."""
    resources = getattr(node, "resources_total", None) or {}
    return {
        "node_id": node.node_id or "",
        "ip": node.node_ip or "",
        "alive": str(node.state).upper() == "ALIVE",
        "cpus": float(resources.get("CPU", 0) or 0),
        "gpus": float(resources.get("GPU", 0) or 0),
    }


def node_resources(dashboard_url: str) -> list[dict[str, float]]:
    """Each alive node's total resources (``{"CPU": n, "GPU": n, "memory": bytes, …}``), through the
    state API (``ray.util.state``) with the auth header.

    Raises:
        Exception: whatever the state API raises when the dashboard cannot be reached.
    """
    nodes = _list(_state_client(dashboard_url), "NODES")
    return [{k: float(v) for k, v in (getattr(n, "resources_total", None) or {}).items()}
            for n in nodes if str(n.state).upper() == "ALIVE"]
