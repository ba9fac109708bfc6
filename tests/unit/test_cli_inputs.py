"""Careless and hostile input to the CLI without a cluster: every mistake is one line with the right exit
code (2 for what the user typed), and no failed command leaves something behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from zeroplane.checkpoints import build_marker, dir_name_for_step
from zeroplane.cli.main import main
from zeroplane.storage import Storage

REPO = Path(__file__).resolve().parents[2]
TINY = "jobs/tiny-cpu.yaml"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("ZEROPLANE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZEROPLANE_STORAGE", str(tmp_path / "st"))
    for var in ("RAY_ADDRESS", "ZEROPLANE_DEBUG", "ZEROPLANE_MAX_UPLOAD_MB"):
        monkeypatch.delenv(var, raising=False)


def run(*args):
    r = CliRunner().invoke(main, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    assert "Traceback" not in r.output
    return r


@pytest.mark.parametrize("args", [
    ["train", "submit", TINY, "--wait", "--timeout-s", "nan"],
    ["train", "stop", "j", "--wait-s", "inf"],
    ["serve", "deploy", "m:v1", "--upscale-delay-s", "inf"],
    ["complete", "m", "hi", "--temperature", "nan"],
    ["render", "kuberay", "raycluster", "--worker-cpus", "inf"],
    ["cluster", "down", "--grace-s", "nan"],
])
def test_non_finite_numbers_are_refused_as_usage_errors(args):
    r = run(*args)
    assert r.exit_code == 2 and "is not a finite number" in r.output, r.output


def test_a_deeply_nested_set_value_is_a_usage_error():
    r = run("spec", "validate", TINY, "--set", "name=" + "[" * 5000)
    assert r.exit_code == 2 and "nested too deeply" in r.output


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_a_bad_upload_limit_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("ZEROPLANE_MAX_UPLOAD_MB", value)
    r = run("train", "submit", TINY, "--dry-run")
    assert r.exit_code == 2 and "ZEROPLANE_MAX_UPLOAD_MB" in r.output


def test_checkpoints_of_a_job_are_found_in_the_default_storage_without_a_cluster(tmp_path):
    st = Storage.from_uri(str(tmp_path / "st"))
    ck = st.path("jobs", "old-job", dir_name_for_step(5))
    st.write_json(f"{ck}/meta.json", {"step": 5})
    st.write_json(f"{ck}/zeroplane_complete.json", build_marker(st.list_files(ck), {"step": 5}))
    r = run("checkpoints", "list", "old-job", "-o", "json")
    assert r.exit_code == 0, r.output
    assert [c["step"] for c in json.loads(r.stdout)] == [5]
    missing = run("checkpoints", "list", "no-such-job")
    assert missing.exit_code == 1 and "zeroplane cluster up" in missing.output and "--storage" in missing.output


@pytest.mark.parametrize("args", [["models", "list", "BAD_NAME"], ["serve", "rollback", "BAD_NAME"],
                                  ["serve", "delete", "BAD_NAME"], ["serve", "deploy", "BAD_NAME:v1"]])
def test_a_bad_model_name_argument_is_named_as_such_before_any_cluster_work(args):
    r = run(*args)
    assert r.exit_code == 2 and "model name 'BAD_NAME'" in r.output and "--name" not in r.output, r.output


def test_keys_create_save_to_an_unwritable_place_creates_no_key(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("ZEROPLANE_HOME", str(tmp_path / "afile"))
    r = run("serve", "keys", "create", "--save")
    assert r.exit_code == 1 and "ZEROPLANE_HOME" in r.output
    assert json.loads(run("serve", "keys", "list", "-o", "json").stdout) == []


def test_promote_refuses_flags_that_contradict_no_deploy(tmp_path):
    r = run("promote", "j", "--name", "m", "--storage", str(tmp_path / "st"), "--no-deploy", "--canary", "10")
    assert r.exit_code == 2 and "--no-deploy" in r.output and "--canary" in r.output


def test_zeroplane_debug_0_means_off(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROPLANE_DEBUG", "0")
    (tmp_path / "st" / "jobs").mkdir(parents=True)
    (tmp_path / "st" / "jobs" / "somejob").write_text("not a folder")
    r = run("checkpoints", "list", "somejob", "--storage", str(tmp_path / "st"))
    assert r.exit_code == 1 and r.output.startswith("Error: NotADirectoryError")


def test_a_spec_without_storage_path_uses_the_storage_every_other_command_uses(tmp_path):
    plan = json.loads(run("train", "submit", TINY, "--dry-run").stdout)
    assert plan["spec"]["checkpoint"]["storage_path"] == str(tmp_path / "st")
    assert plan["storage"] == f"{tmp_path / 'st'}/jobs/{plan['job_id']}"


def test_an_explicit_address_wins_over_ray_address(monkeypatch):
    """Ray's clients prefer $RAY_ADDRESS to the address they are given; --address must still decide."""
    monkeypatch.setenv("RAY_ADDRESS", "junk")
    r = run("train", "list", "--address", "http://127.0.0.1:9")
    assert r.exit_code == 1 and "127.0.0.1:9" in r.output and "junk" not in r.output, r.output
    import os

    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # restored after the client was built


def test_one_damaged_version_marker_does_not_hide_the_other_versions(tmp_path):
    from zeroplane.registry import Registry

    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text("{}")
    reg = Registry(Storage.from_uri(str(tmp_path / "st")))
    for model in ("alpha", "beta"):
        reg.register(model, src, {"source": {"job_id": "j", "step": 1}})
    (tmp_path / "st" / "models" / "alpha" / "v1" / "zeroplane_version.json").write_text("{not json")
    r = run("models", "list", "-o", "json")
    assert r.exit_code == 0, r.output
    assert [(v["name"], v["version"]) for v in json.loads(r.stdout)] == [("beta", "v1")]
    assert "alpha" in r.stderr and "WARNING" in r.stderr


@pytest.mark.parametrize("path", ["/dev/zero"])
def test_a_spec_path_that_is_not_a_spec_file_is_refused_without_reading_it(path):
    r = run("spec", "validate", path)
    assert r.exit_code == 2 and "not a YAML job spec" in r.output


def test_render_checks_the_job_id_it_is_given():
    r = run("render", "kuberay", "rayjob", "jobs/gpt2-124m-8xgpu-zero3.yaml", "--job-id", "BAD ID/../x")
    assert r.exit_code == 2 and "--job-id" in r.output
