"""The CLI without a cluster: help, spec validate/schema, submit --dry-run, exit codes and one-line
errors, listing empty storage. Plus the SDK helpers behind them (plan, redact, parse_progress)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from zeroplane.backends.rayjobs import ENTRYPOINT, build_request, redact
from zeroplane.checkpoints import build_marker, dir_name_for_step
from zeroplane.cli.main import main
from zeroplane.registry import Registry
from zeroplane.sdk import Client, parse_progress
from zeroplane.spec import load_spec
from zeroplane.storage import Storage

REPO = Path(__file__).resolve().parents[2]
TINY = "jobs/tiny-cpu.yaml"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Run from the repo root with an empty zeroplane home and no cluster address."""
    home = tmp_path / "zphome"
    home.mkdir()
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("ZEROPLANE_HOME", str(home))
    monkeypatch.setenv("ZEROPLANE_STORAGE", str(tmp_path / "default-storage"))
    for var in ("RAY_ADDRESS", "ZEROPLANE_DEBUG", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return home


def run(*args):
    result = CliRunner().invoke(main, list(args))
    # every outcome is a clean exit, never an exception escaping the command
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result


def _plan(*extra):
    result = run("train", "submit", TINY, "--dry-run", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stdout


# ---------------------------------------------------------------- help and spec


def test_help():
    result = run("--help")
    assert result.exit_code == 0
    for group in ("cluster", "spec", "train", "checkpoints", "promote", "models", "serve"):
        assert group in result.output


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and "0.1.0" in result.output


def test_spec_validate_ok():
    result = run("spec", "validate", TINY)
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "tiny-cpu" in result.output and "ZeRO-2" in result.output


def test_spec_validate_with_set():
    result = run("spec", "validate", TINY, "--set", "deepspeed.zero_stage=3", "--set", "train.max_steps=9")
    assert result.exit_code == 0, result.output
    assert "ZeRO-3" in result.output and "9 steps" in result.output


def test_spec_validate_invalid_spec_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: ok\ntrain:\n  lr: fast\n")
    result = run("spec", "validate", str(bad))
    assert result.exit_code == 2
    assert "train.lr" in result.output and '"fast"' in result.output
    assert "Traceback" not in result.output


def test_spec_validate_unknown_field_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: ok\nscaling:\n  num_wrokers: 2\n")
    result = run("spec", "validate", str(bad))
    assert result.exit_code == 2
    assert "scaling.num_wrokers" in result.output and "unknown field" in result.output


def test_spec_validate_missing_file_exit_2():
    result = run("spec", "validate", "missing.yaml")
    assert result.exit_code == 2
    assert "missing.yaml" in result.output


def test_spec_validate_bad_set_exit_2():
    result = run("spec", "validate", TINY, "--set", "train.max_steps")
    assert result.exit_code == 2
    assert "key.path=value" in result.output


def test_spec_schema_is_json_with_properties():
    result = run("spec", "schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert {"name", "deepspeed", "train", "scaling"} <= set(schema["properties"])
    assert "DeepSpeedSpec" in schema["$defs"]


# ---------------------------------------------------------------- train submit --dry-run


def test_submit_dry_run_shows_spec_deepspeed_config_and_request():
    plan, _ = _plan()
    assert set(plan) >= {"job_id", "spec", "deepspeed_config", "ray_job_request"}
    assert plan["spec"]["name"] == "tiny-cpu"
    assert plan["spec"]["train"]["max_steps"] == 30
    ds = plan["deepspeed_config"]
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == 4 * 1 * 2
    req = plan["ray_job_request"]
    assert req["entrypoint"] == ENTRYPOINT == "python -m zeroplane.runtime.train.driver"
    assert req["submission_id"] == plan["job_id"]
    assert plan["job_id"].startswith("tiny-cpu-")
    env = req["runtime_env"]["env_vars"]
    assert json.loads(env["ZEROPLANE_SPEC_JSON"]) == plan["spec"]
    assert env["ZEROPLANE_JOB_ID"] == plan["job_id"]
    assert req["metadata"] == {"zeroplane": "train", "zeroplane_name": "tiny-cpu"}
    # the package travels with the job
    assert any(Path(p).name == "zeroplane" for p in req["runtime_env"]["py_modules"])


def test_submit_dry_run_with_set_shows_stage_3():
    plan, _ = _plan("--set", "deepspeed.zero_stage=3")
    assert plan["deepspeed_config"]["zero_optimization"]["stage"] == 3
    assert plan["spec"]["deepspeed"]["zero_stage"] == 3
    env_spec = json.loads(plan["ray_job_request"]["runtime_env"]["env_vars"]["ZEROPLANE_SPEC_JSON"])
    assert env_spec["deepspeed"]["zero_stage"] == 3


def test_submit_dry_run_masks_secrets(monkeypatch):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value-123")
    monkeypatch.setenv("AWS_REGION", "eu-west-9")
    plan, raw = _plan()
    for value in (secret, "AKIAIOSFODNN7EXAMPLE", "session-token-value-123"):
        assert value not in raw
    env = plan["ray_job_request"]["runtime_env"]["env_vars"]
    # no credential travels in a job request unless asked for: the nodes use their own
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"} & set(env)
    assert env["AWS_REGION"] == "eu-west-9"  # not a secret: shown as sent
    # the explicit opt-in warns, and the request is still shown masked
    result = run("train", "submit", TINY, "--dry-run", "--pass-credentials")
    assert result.exit_code == 0, result.output
    assert "--pass-credentials" in result.stderr and "cluster's token" in result.stderr
    for value in (secret, "AKIAIOSFODNN7EXAMPLE", "session-token-value-123"):
        assert value not in result.output
    env = json.loads(result.stdout)["ray_job_request"]["runtime_env"]["env_vars"]
    assert env["AWS_SECRET_ACCESS_KEY"] == env["AWS_ACCESS_KEY_ID"] == env["AWS_SESSION_TOKEN"] == "***"


def test_submit_invalid_override_exits_2_before_contacting_a_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    result = run("train", "submit", TINY, "--set", "deepspeed.offload_param=cpu")
    assert result.exit_code == 2
    assert "offload_param='cpu'" in result.output and "zero_stage 3" in result.output
    assert "127.0.0.1:9" not in result.output
    assert "Traceback" not in result.output


def test_submit_missing_file_exits_2(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    result = run("train", "submit", "nope.yaml")
    assert result.exit_code == 2 and "nope.yaml" in result.output


# ---------------------------------------------------------------- no cluster


def test_status_without_cluster_is_one_clear_line():
    result = run("train", "status", "x")
    assert result.exit_code == 1
    assert "zeroplane cluster up" in result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")


def test_status_without_cluster_in_a_real_process(tmp_path):
    """The same through the real entry point: stderr holds one line, no traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ZEROPLANE_DEBUG")}
    env["ZEROPLANE_HOME"] = str(tmp_path / "home")
    out = subprocess.run([sys.executable, "-m", "zeroplane.cli.main", "train", "status", "x"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("Error: ") and "zeroplane cluster up" in lines[0]


# ---------------------------------------------------------------- promote / models / checkpoints


def test_promote_bad_model_name_exits_2():
    result = run("promote", "job", "--name", "Bad_Name")
    assert result.exit_code == 2
    assert "Bad_Name" in result.output and "lowercase" in result.output


def test_promote_dry_run_with_storage_needs_no_cluster(tmp_path):
    st = Storage.from_uri(str(tmp_path / "st"))
    ck = st.path("jobs", "somejob", dir_name_for_step(15))
    st.write_json(f"{ck}/meta.json", {"step": 15, "spec": {"serve": {}}})
    st.write_json(f"{ck}/zeroplane_complete.json", build_marker(st.list_files(ck), {"step": 15}))
    result = run("promote", "somejob", "--name", "tiny", "--storage", str(tmp_path / "st"), "--dry-run", "--no-deploy")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["would_register"] == "tiny:v1"


def test_models_list_empty_storage(tmp_path):
    result = run("models", "list", "--storage", str(tmp_path / "st"))
    assert result.exit_code == 0, result.output
    result = run("models", "list", "--storage", str(tmp_path / "st"), "-o", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == []


def test_models_list_shows_registered_versions(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text("{}")
    st = Storage.from_uri(str(tmp_path / "st"))
    Registry(st).register("tiny", src, {"source": {"job_id": "j1", "step": 30}, "metrics": {"val_loss": 2.5}})
    result = run("models", "list", "--storage", str(tmp_path / "st"), "-o", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["name"], r["version"]) for r in rows] == [("tiny", "v1")]
    table = run("models", "list", "--storage", str(tmp_path / "st"))
    assert table.exit_code == 0 and "tiny" in table.output and "v1" in table.output


def test_checkpoints_list_empty_storage(tmp_path):
    result = run("checkpoints", "list", "somejob", "--storage", str(tmp_path / "st"))
    assert result.exit_code == 0, result.output
    assert "no complete checkpoints" in result.output


def test_checkpoints_list_json(tmp_path):
    st = Storage.from_uri(str(tmp_path / "st"))
    ck = st.path("jobs", "somejob", dir_name_for_step(15))
    st.write_json(f"{ck}/meta.json", {"step": 15})
    st.write_json(f"{ck}/zeroplane_complete.json",
                  build_marker(st.list_files(ck), {"step": 15, "metrics": {"val_loss": 3.0}}))
    st.write_json(st.path("jobs", "somejob", dir_name_for_step(30), "meta.json"), {"step": 30})  # no marker
    result = run("checkpoints", "list", "somejob", "--storage", str(tmp_path / "st"), "-o", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["step"], r["complete"], r["metrics"]) for r in rows] == [(15, True, {"val_loss": 3.0})]
    result = run("checkpoints", "list", "somejob", "--storage", str(tmp_path / "st"), "--all", "-o", "json")
    assert [(r["step"], r["complete"]) for r in json.loads(result.stdout)] == [(15, True), (30, False)]


def test_unexpected_error_is_one_line_exit_1(tmp_path):
    """An environment problem (here: a file where the job folder should be) is not a traceback."""
    (tmp_path / "st" / "jobs").mkdir(parents=True)
    (tmp_path / "st" / "jobs" / "somejob").write_text("not a folder")
    result = run("checkpoints", "list", "somejob", "--storage", str(tmp_path / "st"))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: NotADirectoryError") and "ZEROPLANE_DEBUG=1" in lines[0]


def test_unexpected_error_keeps_the_exception_with_zeroplane_debug(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROPLANE_DEBUG", "1")
    (tmp_path / "st" / "jobs").mkdir(parents=True)
    (tmp_path / "st" / "jobs" / "somejob").write_text("not a folder")
    result = CliRunner().invoke(main, ["checkpoints", "list", "somejob", "--storage", str(tmp_path / "st")])
    assert isinstance(result.exception, NotADirectoryError)


# ---------------------------------------------------------------- SDK helpers behind the CLI


def test_plan_needs_no_cluster_and_keeps_the_job_id():
    spec = load_spec(TINY)
    plan = Client.plan(spec, job_id="tiny-cpu-fixed")
    assert plan.job_id == "tiny-cpu-fixed"
    assert plan.to_dict()["ray_job_request"]["submission_id"] == "tiny-cpu-fixed"


def test_build_request_keeps_secrets_and_redact_masks_a_copy(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "topsecret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert "AWS_SECRET_ACCESS_KEY" not in build_request(load_spec(TINY), "j")["runtime_env"]["env_vars"]
    req = build_request(load_spec(TINY), "j", pass_credentials=True)
    assert req["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "topsecret"  # sent to the job on request
    shown = redact(req)
    assert shown["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "***"
    assert shown["runtime_env"]["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert req["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "topsecret"  # original untouched


def test_build_request_leaves_out_unset_and_empty_env(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "")
    env = build_request(load_spec(TINY), "j")["runtime_env"]["env_vars"]
    assert not any(k.startswith("AWS_") for k in env)


def test_build_request_sets_ray_train_poll_interval_unless_the_caller_does(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    env = build_request(load_spec(TINY), "j")["runtime_env"]["env_vars"]
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")
    env = build_request(load_spec(TINY), "j")["runtime_env"]["env_vars"]
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "2"


def test_parse_progress_finds_prefixed_lines_in_order_and_deduplicates():
    log = "\n".join([
        "some ray chatter",
        'ZEROPLANE_PROGRESS {"event": "start", "start_step": 0}',
        '(RayTrainWorker pid=123) ZEROPLANE_PROGRESS {"event": "step", "step": 1, "loss": 5.0}',
        'ZEROPLANE_PROGRESS {"event": "step", "step": 1, "loss": 5.0}',  # same event echoed again
        "ZEROPLANE_PROGRESS {not json",
        'ZEROPLANE_PROGRESS {"event": "step", "step": 2, "loss": 4.0}   ',
        "ZEROPLANE_PROGRESS",
    ])
    events = parse_progress(log)
    assert events == [
        {"event": "start", "start_step": 0},
        {"event": "step", "step": 1, "loss": 5.0},
        {"event": "step", "step": 2, "loss": 4.0},
    ]
    assert parse_progress("") == []


def test_storage_of_checkpoint_path_finds_the_root_and_rejects_other_paths(tmp_path):
    from zeroplane.errors import SpecError
    from zeroplane.sdk import storage_of_checkpoint_path

    st = storage_of_checkpoint_path(f"{tmp_path}/jobs/j-1/checkpoint_step_0000010/")
    assert st.uri == str(tmp_path.resolve())
    assert storage_of_checkpoint_path("s3://bucket/pre/fix/jobs/j/checkpoint_step_0000001").uri == "s3://bucket/pre/fix"
    for bad in (f"{tmp_path}/jobs/j-1", f"{tmp_path}/models/m/checkpoint_step_0000010", "checkpoint_step_1"):
        with pytest.raises(SpecError, match="not a checkpoint folder"):
            storage_of_checkpoint_path(bad)


def test_promote_refuses_inverted_replica_bounds_before_any_work(tmp_path):
    from click.testing import CliRunner

    from zeroplane.cli.main import main

    r = CliRunner().invoke(main, ["promote", "somejob", "--name", "tiny", "--storage", str(tmp_path),
                                  "--min-replicas", "5", "--max-replicas", "2"])
    assert r.exit_code == 2
    assert "--min-replicas 5 is above --max-replicas 2" in r.output
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------- structure: dry run, progress stream, profiles


def test_dry_run_without_a_cluster_lists_the_cluster_checks_as_skipped_and_why():
    plan, _ = _plan()
    checks = {c["name"]: c for c in plan["preflight"]}
    assert checks["upload"]["status"] == "ok"
    for name in ("cluster", "storage", "single_node", "resources"):
        assert checks[name]["status"] == "skipped"
        assert "zeroplane cluster up" in checks[name]["detail"]  # the reason a submit would stop at
    assert plan["storage"].endswith(f"/jobs/{plan['job_id']}")


def test_dry_run_with_an_unreachable_address_fails_like_submit(monkeypatch):
    """Given a cluster, the dry run runs submit's preflights: an address nobody answers fails both alike."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    dry = run("train", "submit", TINY, "--dry-run")
    sub = run("train", "submit", TINY)
    assert dry.exit_code == sub.exit_code == 1
    assert "127.0.0.1:9" in dry.output and "Traceback" not in dry.output


def test_progress_parser_gives_the_same_events_whatever_the_chunking():
    from zeroplane.sdk import ProgressParser

    log = "".join(f'(RayTrainWorker pid=1) ZEROPLANE_PROGRESS {{"event": "step", "step": {i}, "loss": {i / 3}}}\n'
                  f"noise {i} ümlaut\n" for i in range(40))
    whole = parse_progress(log)
    assert [e["step"] for e in whole] == list(range(40))
    for size in (1, 7, 64, 1000):
        p = ProgressParser()
        events = []
        for i in range(0, len(log), size):
            events += p.feed(log[i:i + size])
        events += p.close()
        assert events == whole, size


def test_a_profile_storage_is_the_default_storage(tmp_path, _isolated, monkeypatch):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text("{}")
    Registry(Storage.from_uri(str(tmp_path / "profile-st"))).register("tiny", src, {"source": {"job_id": "j", "step": 1}})
    (_isolated / "config.yaml").write_text(
        f"profiles:\n  lab:\n    address: http://127.0.0.1:9\n    storage: {tmp_path / 'profile-st'}\n")
    monkeypatch.delenv("ZEROPLANE_STORAGE")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))  # ~/.zeroplane/storage: empty
    rows = json.loads(run("--profile", "lab", "models", "list", "-o", "json").stdout)
    assert [(r["name"], r["version"]) for r in rows] == [("tiny", "v1")]
    assert json.loads(run("models", "list", "-o", "json").stdout) == []  # no profile: ~/.zeroplane/storage
    monkeypatch.setenv("ZEROPLANE_STORAGE", str(tmp_path / "env-st"))
    assert json.loads(run("--profile", "lab", "models", "list", "-o", "json").stdout) == []  # the env var wins
