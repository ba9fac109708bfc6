"""A job spec does not decide the security of later deployments: keys are turned off only at deploy
time, and serving replicas get only resource options from a spec, a flag or a stored version."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from zeroplane.cli.main import main
from zeroplane.errors import SpecError
from zeroplane.serving import app_config

TINY = "jobs/tiny-cpu.yaml"
VERSION = {"version": "v1", "uri": "/tmp/m/v1"}


@pytest.fixture(autouse=True)
def _repo(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])


def test_a_spec_cannot_turn_api_keys_off():
    r = CliRunner().invoke(main, ["spec", "validate", TINY, "--set", "serve.auth=false"])
    assert r.exit_code == 2
    assert "serve.auth" in r.output and "--no-auth" in r.output


@pytest.mark.parametrize("key", ["runtime_env", "max_concurrency", "scheduling_strategy"])
def test_a_spec_gives_replicas_only_resource_options(key):
    r = CliRunner().invoke(main, ["spec", "validate", TINY, "--set", f"serve.ray_actor_options.{key}=1"])
    assert r.exit_code == 2
    assert "serve.ray_actor_options" in r.output and key in r.output and "num_cpus" in r.output
    ok = CliRunner().invoke(main, ["spec", "validate", TINY, "--set", "serve.ray_actor_options.num_gpus=1"])
    assert ok.exit_code == 0, ok.output


def test_stored_serve_defaults_are_not_trusted_for_auth_or_actor_options():
    """A version registered from an older spec: auth false is ignored, a runtime_env refused."""
    app = app_config("m", VERSION, "/tmp/st", {"auth": False, "max_batch_size": 4})
    assert app["args"]["auth"] is True and app["args"]["max_batch_size"] == 4
    with pytest.raises(SpecError, match="runtime_env"):
        app_config("m", VERSION, "/tmp/st", {"ray_actor_options": {"num_cpus": 1, "runtime_env": {"pip": ["evil"]}}})
    with pytest.raises(SpecError, match="runtime_env"):
        app_config("m", VERSION, "/tmp/st", {}, {"ray_actor_options": {"runtime_env": {"env_vars": {"A": "1"}}}})


def test_keys_are_off_only_when_the_deployer_says_so():
    assert app_config("m", VERSION, "/tmp/st", {})["args"]["auth"] is True
    assert app_config("m", VERSION, "/tmp/st", {}, {"auth": False})["args"]["auth"] is False


def test_a_remote_cluster_is_served_on_its_own_host_not_this_machine(monkeypatch, tmp_path):
    from zeroplane.sdk import Client

    monkeypatch.setenv("ZEROPLANE_HOME", str(tmp_path))
    monkeypatch.delenv("ZEROPLANE_SERVE_PORT", raising=False)
    assert Client(address="http://10.1.2.3:8265").serve_url("m") == "http://10.1.2.3:8000/m"


def test_an_api_key_over_plain_http_to_another_host_warns():
    from zeroplane.sdk import ZeroplaneError, complete

    with pytest.warns(UserWarning, match="plain http"), pytest.raises(ZeroplaneError):
        complete("http://192.0.2.1:9/m", "hi", api_key="zp-secret", timeout_s=0.5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ZeroplaneError):  # loopback: no warning
            complete("http://127.0.0.1:9/m", "hi", api_key="zp-secret", timeout_s=0.5)


def test_concurrent_preflights_on_one_storage_do_not_collide(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from zeroplane.sdk import preflight_storage
    from zeroplane.storage import Storage

    st = Storage.from_uri(str(tmp_path / "st"))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: preflight_storage(st), range(200)))
    assert [p.name for p in (tmp_path / "st").iterdir()] == []


def test_a_saved_api_key_is_never_readable_by_others(tmp_path, monkeypatch):
    import stat

    monkeypatch.setenv("ZEROPLANE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZEROPLANE_STORAGE", str(tmp_path / "st"))
    seen = []
    import os

    real_replace = os.replace

    def spy(src, dst):  # the file's mode at the moment it takes the key's name
        if os.path.basename(dst) == "api_key":
            seen.append(stat.S_IMODE(os.stat(src).st_mode))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    r = CliRunner().invoke(main, ["serve", "keys", "create", "--save"])
    assert r.exit_code == 0, r.output
    path = tmp_path / "home" / "api_key"
    assert path.read_text().strip() == r.stdout.strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and seen and all(m == 0o600 for m in seen)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    """A few hundred bytes of nested aliases ("billion laughs") would expand to billions of nodes."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(main, ["spec", "validate", str(bomb)])
    assert r.exit_code == 2 and "aliases" in r.output
    r = CliRunner().invoke(main, ["spec", "validate", TINY, "--set", "serve.ray_actor_options=[&a 1, *a]"])
    assert r.exit_code == 2 and "aliases" in r.output


def test_credentials_in_an_endpoint_url_are_refused_and_never_printed():
    r = CliRunner().invoke(main, ["spec", "validate", TINY, "--set",
                                  "checkpoint.s3_endpoint_url=http://AKIAKEY:s3cr3t-pw@minio:9000"])
    assert r.exit_code == 2 and "credentials do not belong" in r.output
    assert "s3cr3t-pw" not in r.output and "AKIAKEY" not in r.output
