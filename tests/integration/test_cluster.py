"""Integration tests for zeroplane.cluster against a real local Ray head (no mocks).

Only processes that zeroplane itself started (found via our private temp dir / recorded
pids) are ever stopped: another Ray cluster may be running on this machine and must
survive these tests.
"""

from __future__ import annotations

import json
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
from zeroplane.errors import SpecError, ZeroplaneError

pytestmark = pytest.mark.integration


@pytest.fixture
def zp_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Isolated zeroplane home and Ray token file; no RAY_ADDRESS / serve port / auth mode.

    ``RAY_AUTH_TOKEN_PATH`` points at a file that does not exist yet, so the test covers
    token generation without touching ``~/.ray/auth_token``.
    """
    home = tmp_path / "zeroplane-home"
    monkeypatch.setenv("ZEROPLANE_HOME", str(home))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "ray-auth-token"))
    # setenv then delenv: monkeypatch records the original value and restores it, so
    # apply_auth_env() below cannot leak RAY_AUTH_MODE into other tests.
    for var in ("RAY_ADDRESS", "ZEROPLANE_SERVE_PORT", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    yield home
    # Ray caches the auth mode and token in-process: restore the environment first, then make Ray
    # re-read it, so later tests in this process (a local ray.init) use the real token again.
    monkeypatch.undo()
    auth._refresh_ray_auth_cache()


def _alive(pid: int, create_time: float | None = None) -> bool:
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.5:
            return False  # pid reused
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _referencing(temp_dir: str) -> list[int]:
    pattern = procs._path_pattern([temp_dir])
    return [p.pid for p in procs._procs_referencing(pattern) if not procs._is_gone(p)]


def _other_ray_cores(ours: set[int]) -> dict[int, float]:
    """GCS servers / raylets on this machine that are not ours (another user's cluster)."""
    found = {}
    for proc in psutil.process_iter(["pid", "name", "create_time"]):
        if proc.info["name"] in ("gcs_server", "raylet") and proc.info["pid"] not in ours:
            found[proc.info["pid"]] = proc.info["create_time"]
    return found


def test_local_head_lifecycle(zp_env: Path) -> None:
    t0 = time.monotonic()
    info = None
    try:
        info = cluster.start_local_head(timeout_s=120)
        started_s = time.monotonic() - t0

        # --- started: state file, short temp dir, live pids -------------------------------
        assert info.local and info.temp_dir and info.started_at
        assert len(info.temp_dir) <= 40, info.temp_dir  # tmp_path is long: short fallback
        assert Path(info.temp_dir).is_dir()
        state = json.loads((zp_env / "local-cluster.json").read_text())
        assert cluster.ClusterInfo.from_dict(state) == info
        assert info.pids and all(_alive(pid) for pid in info.pids)
        names = {psutil.Process(pid).name() for pid in info.pids}
        assert {"gcs_server", "raylet"} <= names
        assert info.dashboard_url.startswith("http://127.0.0.1:")
        assert 1 <= info.serve_http_port <= 65535

        # --- a token was generated (private file); dashboard enforces it ------------------
        token_file = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert len(token_file.read_text().strip()) >= 32
        headers = cluster.auth_headers()
        assert "Authorization" in headers
        resp = requests.get(f"{info.dashboard_url}/api/version", headers=headers, timeout=10)
        assert resp.status_code == 200
        assert resp.json()["ray_version"]
        unauth = requests.get(f"{info.dashboard_url}/api/version", timeout=10)
        assert unauth.status_code == 401
        assert cluster.auth_env() == {"RAY_AUTH_MODE": "token"}

        # --- a job submitted through the Jobs API succeeds (proves the client's auth) -----
        from ray.job_submission import JobStatus, JobSubmissionClient

        cluster.apply_auth_env()
        assert os.environ.get("RAY_AUTH_MODE") == "token"
        client = JobSubmissionClient(info.dashboard_url)
        job_id = client.submit_job(entrypoint="python -c 'print(42)'")
        # A driver that connects back to the cluster: the head's environment must carry
        # token auth to job drivers (ray.init with RAY_ADDRESS never auto-enables it).
        driver_id = client.submit_job(
            entrypoint="python -c \"import ray; ray.init(); "
            "print('cpus', ray.cluster_resources().get('CPU'))\""
        )
        for sid, expected in ((job_id, "42"), (driver_id, f"cpus {float(max(os.cpu_count() or 1, 4))}")):
            deadline = time.monotonic() + 60
            status = client.get_job_status(sid)
            while not status.is_terminal() and time.monotonic() < deadline:
                time.sleep(0.5)
                status = client.get_job_status(sid)
            logs = client.get_job_logs(sid)
            assert status == JobStatus.SUCCEEDED, (sid, status, logs)
            assert expected in logs, logs

        # --- status and discovery ----------------------------------------------------------
        st = cluster.cluster_status(info)
        assert st["alive"] is True and "errors" not in st, st
        assert st["address"] == info.address and st["dashboard_url"] == info.dashboard_url
        assert len(st["nodes"]) == 1 and st["nodes"][0]["alive"]
        assert st["resources"]["CPU"] >= 4 and st["resources"]["GPU"] == 0
        assert st["jobs"].get("SUCCEEDED", 0) >= 2
        assert cluster.resolve_cluster() == info
        assert cluster.resolve_cluster(info.dashboard_url) == info
        assert cluster.resolve_cluster(info.address) == info

        # --- second start is idempotent: same cluster, no new head processes --------------
        cores_before = {
            p.pid for p in map(psutil.Process, info.pids) if p.name() in ("gcs_server", "raylet")
        }
        again = cluster.start_local_head()
        assert again == info
        cores_now = {
            pid
            for pid in _referencing(info.temp_dir)
            if psutil.Process(pid).name() in ("gcs_server", "raylet")
        }
        assert cores_now == cores_before

        # --- stop ends exactly our processes ------------------------------------------------
        recorded = {int(pid): meta["create_time"] for pid, meta in state["processes"].items()}
        others = _other_ray_cores(set(_referencing(info.temp_dir)) | set(recorded))
        t_stop = time.monotonic()
        ended = cluster.stop_local_head()
        stop_s = time.monotonic() - t_stop
        assert set(info.pids) <= set(ended)
        assert not [pid for pid, ct in recorded.items() if _alive(pid, ct)]
        assert not (zp_env / "local-cluster.json").exists()
        assert _referencing(info.temp_dir) == []
        # Another user's Ray cluster (if any) is untouched.
        assert [pid for pid, ct in others.items() if _alive(pid, ct)] == list(others)
        assert cluster.stop_local_head() == []
        with pytest.raises(ZeroplaneError, match="no Ray cluster"):
            cluster.resolve_cluster()
        print(f"start {started_s:.1f}s, stop {stop_s:.1f}s, total {time.monotonic() - t0:.1f}s")
    finally:
        cluster.stop_local_head(grace_s=3)  # no-op when the test got through
        if info and info.temp_dir and not info.temp_dir.startswith(str(zp_env)):
            shutil.rmtree(info.temp_dir, ignore_errors=True)


def test_resolve_cluster_from_env_and_errors(
    zp_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing configured, nothing running: the one-line hint.
    with pytest.raises(ZeroplaneError) as exc:
        cluster.resolve_cluster()
    assert str(exc.value.message) == (
        "no Ray cluster: run `zeroplane cluster up` or pass --address / set RAY_ADDRESS"
    )
    assert exc.value.exit_code == 1

    # Dashboard URL in RAY_ADDRESS.
    monkeypatch.setenv("RAY_ADDRESS", "http://10.1.2.3:8265/")
    info = cluster.resolve_cluster()
    assert info.dashboard_url == "http://10.1.2.3:8265"
    assert info.address == "10.1.2.3:6379"
    assert info.serve_http_port == 8000 and info.local is False and info.pids == []

    # GCS address: dashboard assumed on 8265; Serve port from ZEROPLANE_SERVE_PORT.
    monkeypatch.setenv("RAY_ADDRESS", "headnode:6380")
    monkeypatch.setenv("ZEROPLANE_SERVE_PORT", "9000")
    info = cluster.resolve_cluster()
    assert (info.address, info.dashboard_url, info.serve_http_port) == (
        "headnode:6380",
        "http://headnode:8265",
        9000,
    )

    # The explicit argument wins over the environment.
    assert cluster.resolve_cluster("http://other:1234").dashboard_url == "http://other:1234"

    # Ray Client addresses cannot reach the Jobs API.
    with pytest.raises(SpecError, match="dashboard URL"):
        cluster.resolve_cluster("ray://headnode:10001")
    monkeypatch.setenv("RAY_ADDRESS", "ray://headnode:10001")
    with pytest.raises(SpecError, match="RAY_ADDRESS"):
        cluster.resolve_cluster()

    # Round trip of the dataclass.
    d = info.to_dict()
    assert cluster.ClusterInfo.from_dict(json.loads(json.dumps(d))) == info


def test_start_rejects_busy_dashboard_port(zp_env: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ZeroplaneError, match=f"dashboard port {port} is already in use"):
            cluster.start_local_head(dashboard_port=port)
    assert not (zp_env / "local-cluster.json").exists()
    with pytest.raises(SpecError):
        cluster.start_local_head(num_cpus=0)
