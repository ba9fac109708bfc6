"""Security of the local head against a real Ray (no mocks): by default nothing it listens on is reachable
from another machine, and what it was started with (bind host, token auth or none) is on its ClusterInfo.

Only processes that zeroplane itself started are ever stopped (``stop_local_head``).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import requests

from zeroplane import cluster
from zeroplane.cluster import auth, procs
from zeroplane.errors import ZeroplaneError

pytestmark = pytest.mark.integration


@pytest.fixture
def zp_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Isolated zeroplane home and Ray token file; no RAY_ADDRESS / auth mode / bind host from outside."""
    home = tmp_path / "zeroplane-home"
    monkeypatch.setenv("ZEROPLANE_HOME", str(home))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "ray-auth-token"))
    for var in ("RAY_ADDRESS", "ZEROPLANE_SERVE_PORT", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "ZEROPLANE_BIND_HOST"):
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    yield home
    monkeypatch.undo()
    auth._refresh_ray_auth_cache()  # Ray caches the auth mode in-process: re-read the restored environment


def _head_procs(info: cluster.ClusterInfo) -> dict[int, psutil.Process]:
    """The head's processes now: recorded pids, whatever references its temp dir or GCS address, and all
    their descendants (workers, job drivers, agents)."""
    assert info.temp_dir
    found = procs._collect_head_procs({}, [info.temp_dir], [info.address])
    for pid in info.pids:
        try:
            proc = psutil.Process(pid)
            found.setdefault(pid, proc)
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    return found


def _listening(found: dict[int, psutil.Process]) -> list[tuple[str, int, str, int]]:
    """``(ip, port, process name, pid)`` of every listening TCP socket of ``found``."""
    out = []
    for pid, proc in found.items():
        try:
            conns = proc.net_connections(kind="tcp")
            name = proc.name()
        except psutil.Error:
            continue
        out += [(c.laddr.ip, c.laddr.port, name, pid) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def _run_job(info: cluster.ClusterInfo) -> None:
    """Run one trivial job through the Jobs API: the agents, a job supervisor and a driver are then up."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    cluster.apply_auth_env()
    client = JobSubmissionClient(info.dashboard_url)
    sid = client.submit_job(entrypoint="python -c \"import ray; ray.init(); print('ok')\"")
    deadline = time.monotonic() + 120
    status = client.get_job_status(sid)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(sid)
    assert status == JobStatus.SUCCEEDED, (status, client.get_job_logs(sid))


def _stop(info, zp_env: Path) -> None:
    cluster.stop_local_head(grace_s=3)
    if info and info.temp_dir and not info.temp_dir.startswith(str(zp_env)):
        shutil.rmtree(info.temp_dir, ignore_errors=True)


def test_local_head_listens_on_loopback_only(zp_env: Path) -> None:
    info = None
    try:
        info = cluster.start_local_head(timeout_s=180)
        assert (info.bind_host, info.auth) == ("127.0.0.1", "token")
        assert info.address.startswith("127.0.0.1:")
        _run_job(info)  # the head with everything it starts lazily, while the job's driver is alive or done
        found = _head_procs(info)
        names = {p.name() for p in found.values() if not procs._is_gone(p)}
        assert {"gcs_server", "raylet"} <= names
        sockets = _listening(found)
        assert sockets, "the head listens on nothing?"
        exposed = sorted(s for s in sockets if not auth._is_loopback_host(s[0]))
        assert exposed == [], f"listening beyond loopback: {exposed}"
        print(f"{len(sockets)} listening sockets of {len(found)} head processes, all on loopback: "
              + ", ".join(sorted({f"{name}@{ip}" for ip, _, name, _ in sockets})))
        # what was recorded is what the next command finds
        assert cluster.resolve_cluster() == info
    finally:
        _stop(info, zp_env)


def test_reachable_head_without_auth_says_so(zp_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    info = None
    try:
        info = cluster.start_local_head(timeout_s=180, bind_host="0.0.0.0")
        assert (info.bind_host, info.auth) == ("0.0.0.0", "disabled")
        assert not Path(os.environ["RAY_AUTH_TOKEN_PATH"]).exists()  # no token made for a head without auth
        resp = requests.get(f"{info.dashboard_url}/api/version", timeout=10)
        assert resp.status_code == 200  # no token needed: exactly what the CLI must warn about
        dash_port = int(info.dashboard_url.rsplit(":", 1)[1])
        dashboard = [s for s in _listening(_head_procs(info)) if s[1] == dash_port]
        assert dashboard and all(s[0] in ("0.0.0.0", "::") for s in dashboard), dashboard
        assert cluster.resolve_cluster() == info
        # a head bound elsewhere is not silently handed to a caller that asks for loopback
        with pytest.raises(ZeroplaneError, match="cluster down"):
            cluster.start_local_head(bind_host="127.0.0.1")
    finally:
        _stop(info, zp_env)
