"""Security of the cluster layer without a running Ray: the Ray token file's mode (tightened when ours,
refused when not), the cluster-launcher configs keeping it private on the nodes, the warning when the token
would travel over plain http to another machine, and the bind host / auth mode a local head records."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import yaml

from zeroplane import cluster
from zeroplane.cluster import auth, launcher, local
from zeroplane.errors import SpecError, ZeroplaneError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "cluster").glob("*.yaml"))
TOKEN = "0123456789abcdef" * 4


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    """Own zeroplane home and HOME; no token, auth mode, address or profile from the outside; the
    once-per-process warning re-armed."""
    monkeypatch.setenv("ZEROPLANE_HOME", str(tmp_path / "zp"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("RAY_ADDRESS", "ZEROPLANE_PROFILE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
                "ZEROPLANE_BIND_HOST"):
        monkeypatch.setenv(var, "x")  # recorded, so that undo also removes what the code under test sets
        monkeypatch.delenv(var)
    monkeypatch.setattr(auth, "_warned_token_in_clear", False)
    return tmp_path


def _token_file(path: Path, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TOKEN)
    os.chmod(path, mode)
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _foreign_token_file(tmp_path: Path) -> Path:
    """A world-readable token file that belongs to another user (needs root to make one)."""
    if os.getuid() != 0:
        pytest.skip("making a file owned by another user needs root")
    path = _token_file(tmp_path / "foreign" / "auth_token", 0o644)
    os.chown(path, 65534, 65534)
    return path


# ------------------------------------------------------------------------ 2. the token file's mode


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_readable_token_file_of_ours_is_tightened_to_0600(_env, monkeypatch, mode):
    path = _token_file(_env / "tok", mode)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert cluster.auth_headers() == {"Authorization": f"Bearer {TOKEN}"}
    assert _mode(path) == 0o600
    os.chmod(path, mode)
    assert cluster.auth_env() == {"RAY_AUTH_MODE": "token"}
    assert _mode(path) == 0o600


def test_the_default_token_file_as_ray_get_auth_token_writes_it_is_tightened(_env):
    path = _token_file(_env / "home" / ".ray" / "auth_token", 0o644)  # what `ray get-auth-token --generate` leaves
    assert cluster.auth_env() == {"RAY_AUTH_MODE": "token"}
    assert _mode(path) == 0o600


def test_a_profiles_token_file_is_tightened(_env):
    path = _token_file(_env / "gpu-token", 0o644)
    (_env / "zp").mkdir(parents=True, exist_ok=True)
    (_env / "zp" / "config.yaml").write_text(
        f"profiles: {{gpu: {{address: 'https://10.0.0.10:8265', auth_token_file: '{path}'}}}}\n"
    )
    cluster.resolve_cluster(profile="gpu")
    assert _mode(path) == 0o600


def test_a_readable_token_file_of_another_user_is_refused_with_the_fix(_env, monkeypatch):
    path = _foreign_token_file(_env)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    for use in (cluster.auth_headers, cluster.auth_env):
        with pytest.raises(ZeroplaneError) as err:
            use()
        message = err.value.message
        assert f"chmod 600 {path}" in message and "0644" in message
        assert TOKEN not in message and "\n" not in message
    assert _mode(path) == 0o644  # not ours: left as it is


def test_a_private_token_file_and_a_token_in_the_environment_are_left_alone(_env, monkeypatch):
    path = _token_file(_env / "tok", 0o600)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert cluster.auth_headers() == {"Authorization": f"Bearer {TOKEN}"}
    assert _mode(path) == 0o600
    os.chmod(path, 0o400)  # read-only for us is private too
    assert cluster.auth_headers() and _mode(path) == 0o400
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")  # the file is not read at all
    os.chmod(path, 0o644)
    assert cluster.auth_headers() == {"Authorization": "Bearer from-env"}
    assert _mode(path) == 0o644


# ------------------------------------------------------------------------ 2. ... and on the nodes


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launcher_configs_keep_the_token_0600_on_every_node(path: Path):
    config = yaml.safe_load(path.read_text())
    assert "~/.ray/auth_token" in config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = " ; ".join(config[key])
        assert "chmod 600 ~/.ray/auth_token" in commands, (path.name, key)
        assert commands.index("chmod 600 ~/.ray/auth_token") < commands.index("ray start"), (path.name, key)


def test_cluster_up_config_tightens_the_local_token_before_ray_up(_env, monkeypatch):
    path = _token_file(_env / "home" / ".ray" / "auth_token", 0o644)
    calls = []

    class _Done:
        returncode = 0

    def fake_run(cmd, check=False):
        calls.append((cmd, _mode(path)))
        return _Done()

    monkeypatch.setattr(launcher.subprocess, "run", fake_run)
    cluster.run_launcher("up", REPO / "cluster" / "aws.yaml")
    assert len(calls) == 1 and calls[0][0][-3:] == ["up", "-y", str(REPO / "cluster" / "aws.yaml")]
    assert calls[0][1] == 0o600  # already private when `ray up` copies it to the nodes


def test_cluster_up_config_refuses_a_foreign_readable_token(_env, monkeypatch):
    foreign = _foreign_token_file(_env)
    (_env / "home" / ".ray").mkdir(parents=True, exist_ok=True)
    os.symlink(foreign, _env / "home" / ".ray" / "auth_token")
    monkeypatch.setattr(launcher.subprocess, "run", lambda *a, **k: pytest.fail("ray up must not run"))
    with pytest.raises(ZeroplaneError, match=r"chmod 600"):
        cluster.run_launcher("up", REPO / "cluster" / "aws.yaml")


# ------------------------------------------------------------------------ 3. the token over plain http


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("zeroplane")]


@pytest.mark.parametrize("url", ["http://10.0.0.10:8265", "http://head.example.com:8265/", "http://[fd00::1]:8265"])
def test_token_over_plain_http_to_another_host_warns_once_per_process(_env, monkeypatch, caplog, url):
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    with caplog.at_level(logging.WARNING):
        assert cluster.auth_headers(url) == {"Authorization": f"Bearer {TOKEN}"}
        cluster.auth_headers(url)
        cluster.auth_headers("http://10.9.9.9:8265")
    found = _warnings(caplog)
    assert len(found) == 1, found
    assert "http://" in found[0] and "https://" in found[0] and TOKEN not in found[0]


@pytest.mark.parametrize("url", ["https://10.0.0.10:8265", "http://127.0.0.1:8265", "http://localhost:8265",
                                 "http://[::1]:8265", "http://127.1.2.3:8265"])
def test_token_over_https_or_to_loopback_does_not_warn(_env, monkeypatch, caplog, url):
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    with caplog.at_level(logging.WARNING):
        assert cluster.auth_headers(url)
    assert _warnings(caplog) == []


def test_no_token_no_warning(_env, caplog):
    with caplog.at_level(logging.WARNING):
        assert cluster.auth_headers("http://10.0.0.10:8265") == {}
    assert _warnings(caplog) == []


def test_resolving_a_plain_http_remote_cluster_with_a_token_warns(_env, monkeypatch, caplog):
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    with caplog.at_level(logging.WARNING):
        cluster.resolve_cluster("http://10.0.0.10:8265")
    assert len(_warnings(caplog)) == 1


# ------------------------------------------------------------------------ 1 + 4. what a local head records


def test_cluster_info_carries_bind_host_and_auth(_env):
    info = cluster.ClusterInfo("127.0.0.1:6379", "http://127.0.0.1:8265", 8000, local=True,
                               bind_host="127.0.0.1", auth="disabled")
    assert cluster.ClusterInfo.from_dict(info.to_dict()) == info
    # A state file written before these fields: binding unknown, auth from its "auth_mode" key.
    old = {"address": "1.2.3.4:6379", "dashboard_url": "http://127.0.0.1:8265", "serve_http_port": 8000,
           "local": True, "auth_mode": "token"}
    assert (cluster.ClusterInfo.from_dict(old).bind_host, cluster.ClusterInfo.from_dict(old).auth) == (None, "token")
    remote = cluster.resolve_cluster("http://10.1.2.3:8265")
    assert (remote.bind_host, remote.auth) == (None, None)


@pytest.mark.parametrize("value, expected", [(None, "token"), ("token", "token"), ("TOKEN", "token"),
                                             ("disabled", "disabled"), ("off", "disabled")])
def test_auth_mode_of_a_new_head(_env, monkeypatch, value, expected):
    if value is not None:
        monkeypatch.setenv("RAY_AUTH_MODE", value)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(_env / "new-token"))
    assert auth._ensure_token_for_new_cluster() == expected
    assert (_env / "new-token").exists() == (expected == "token")


def test_bind_host_is_loopback_unless_asked(_env, monkeypatch):
    assert local._bind_host(None) == "127.0.0.1"
    assert local._bind_host("0.0.0.0") == "0.0.0.0"
    monkeypatch.setenv("ZEROPLANE_BIND_HOST", "0.0.0.0")
    assert local._bind_host(None) == "0.0.0.0"
    assert local._bind_host("127.0.0.1") == "127.0.0.1"  # the argument wins
    monkeypatch.setenv("ZEROPLANE_BIND_HOST", " ")
    assert local._bind_host(None) == "127.0.0.1"  # empty means unset


@pytest.mark.parametrize("value", ["10.0.0.1", "localhost", "*", ""])
def test_other_bind_hosts_are_refused_before_anything_starts(_env, monkeypatch, value):
    with pytest.raises(SpecError, match="127.0.0.1 or 0.0.0.0"):
        cluster.start_local_head(bind_host=value)
    if value:
        monkeypatch.setenv("ZEROPLANE_BIND_HOST", value)
        with pytest.raises(SpecError, match="ZEROPLANE_BIND_HOST"):
            cluster.start_local_head()
    assert not (_env / "zp" / "local-cluster.json").exists()


def test_a_path_that_is_not_plainly_a_token_file_is_never_chmodded(tmp_path):
    """A mistaken path (a folder, a link, a large file) that others can read is refused, its mode untouched."""
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    big = _token_file(tmp_path / "big", 0o644)
    big.write_text("x" * 10_000)
    real = _token_file(tmp_path / "real-token", 0o644)
    link = tmp_path / "link"
    link.symlink_to(real)
    for path, mode in ((folder, 0o777), (big, 0o644), (link, 0o644)):
        with pytest.raises(ZeroplaneError, match="token file"):
            auth.check_token_file(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode


@pytest.mark.parametrize("address", ["::1", "fe80::1:8265", "http://127.0.0.1:abc", "http://127.0.0.1:99999"])
def test_malformed_addresses_are_usage_errors(address):
    with pytest.raises(SpecError):
        cluster.resolve_cluster(address)
