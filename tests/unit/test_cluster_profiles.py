"""Finding the cluster: --address, RAY_ADDRESS, then a named profile of ~/.zeroplane/config.yaml
(--profile / ZEROPLANE_PROFILE), then the local head; and the cluster-launcher command for
`cluster up|down CONFIG`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from zeroplane import cluster
from zeroplane.errors import SpecError, ZeroplaneError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROPLANE_HOME", str(tmp_path))
    for var in ("RAY_ADDRESS", "ZEROPLANE_PROFILE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "ZEROPLANE_SERVE_PORT"):
        monkeypatch.setenv(var, "x")  # recorded, so that undo also removes what resolve_cluster sets
        monkeypatch.delenv(var)
    return tmp_path


def _write(home: Path, text: str) -> None:
    (home / "config.yaml").write_text(text)


PROFILES = """
profiles:
  gpu:
    address: http://10.0.0.10:8265
    auth_token_file: ~/tokens/gpu
    storage: s3://bucket/zp
  lab: {address: "10.1.2.3:6380"}
"""


def test_profile_selected_by_argument_or_env(_home, monkeypatch):
    _write(_home, PROFILES)
    info = cluster.resolve_cluster(profile="lab")
    assert (info.address, info.dashboard_url, info.local) == ("10.1.2.3:6380", "http://10.1.2.3:8265", False)
    monkeypatch.setenv("ZEROPLANE_PROFILE", "gpu")
    info = cluster.resolve_cluster()
    assert info.dashboard_url == "http://10.0.0.10:8265"
    assert cluster.load_profile()["storage"] == "s3://bucket/zp"


def test_profile_token_file_becomes_ray_auth_token_path(_home, monkeypatch):
    _write(_home, PROFILES)
    cluster.resolve_cluster(profile="gpu")
    import os

    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(Path("~/tokens/gpu").expanduser())
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/explicit/token")
    cluster.resolve_cluster(profile="gpu")
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == "/explicit/token"  # an explicit setting wins


def test_address_and_ray_address_come_before_the_profile(_home, monkeypatch):
    _write(_home, PROFILES)
    monkeypatch.setenv("ZEROPLANE_PROFILE", "gpu")
    assert cluster.resolve_cluster("http://1.2.3.4:9999").dashboard_url == "http://1.2.3.4:9999"
    monkeypatch.setenv("RAY_ADDRESS", "http://5.6.7.8:8265")
    assert cluster.resolve_cluster().dashboard_url == "http://5.6.7.8:8265"


def test_no_profile_no_address_no_local_head(_home):
    with pytest.raises(ZeroplaneError, match="no Ray cluster"):
        cluster.resolve_cluster()


@pytest.mark.parametrize("text, name, message", [
    (None, "gpu", r"profile 'gpu' is selected but .*config.yaml does not exist"),
    (PROFILES, "cpu", r"profile 'cpu' is not in .*config.yaml \(profiles: gpu, lab\)"),
    ("profiles: {x: {storage: s3://b}}", "x", r"profiles.x.address is missing"),
    ("profiles: {x: {address: 'http://h:1', adress: y}}", "x", r"profiles.x.adress is not a profile key"),
    ("profiles: [", "x", r"cannot read profiles"),
    ("profiles: {x: {address: 'ray://h:10001'}}", "x", r"Ray Client address"),
])
def test_bad_profiles_are_one_line_spec_errors(_home, text, name, message):
    if text is not None:
        _write(_home, text)
    with pytest.raises(SpecError, match=message) as err:
        cluster.resolve_cluster(profile=name)
    assert err.value.exit_code == 2 and "\n" not in err.value.message


def test_launcher_command_for_a_config():
    cmd = cluster.launcher_command("up", REPO / "cluster" / "aws.yaml")
    assert cmd == [sys.executable, "-m", "ray.scripts.scripts", "up", "-y", str(REPO / "cluster" / "aws.yaml")]
    assert cluster.launcher_command("down", REPO / "cluster" / "local.yaml")[3:5] == ["down", "-y"]


def test_launcher_rejects_a_missing_config_or_action():
    with pytest.raises(SpecError, match=r"cluster config 'nope.yaml' does not exist") as err:
        cluster.run_launcher("up", "nope.yaml")
    assert err.value.exit_code == 2
    with pytest.raises(SpecError, match="use up or down"):
        cluster.launcher_command("restart", REPO / "cluster" / "aws.yaml")


def test_profile_storage_is_carried_by_the_cluster_info(_home, monkeypatch):
    _write(_home, PROFILES)
    info = cluster.resolve_cluster(profile="gpu")
    assert info.storage == "s3://bucket/zp"
    assert cluster.ClusterInfo.from_dict(info.to_dict()) == info
    assert cluster.resolve_cluster(profile="lab").storage is None  # a profile without storage
    assert cluster.resolve_cluster("http://1.2.3.4:9999", profile="gpu").storage is None  # profile not used


def test_status_of_an_unreachable_cluster_is_a_report_not_an_error():
    info = cluster.ClusterInfo("127.0.0.1:9", "http://127.0.0.1:9", 8000)
    st = cluster.cluster_status(info)
    assert st["alive"] is False and st["nodes"] == [] and st["jobs"] == {}
    assert st["resources"] == {"CPU": 0.0, "GPU": 0.0}
    assert len(st["errors"]) == 1 and "\n" not in st["errors"][0]
