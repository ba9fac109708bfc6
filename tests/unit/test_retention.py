"""`models gc` never deletes what a live endpoint needs, and `models show` gives a version's lineage:
a real registry in a tmp folder; what Serve runs is given as its deployed app configs."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from zeroplane import layout, retention
from zeroplane.cli.main import main
from zeroplane.registry import Registry
from zeroplane.releases import History
from zeroplane.storage import Storage

JOB = "tiny-cpu-20250101-000000-abcd"


def _registry(tmp_path: Path, n: int) -> Registry:
    reg = Registry(Storage.from_uri(str(tmp_path / "store")))
    for i in range(1, n + 1):
        d = tmp_path / f"hf{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "i": i}))
        reg.register("tiny", d, {"source": {"job_id": JOB, "step": 10 * i, "checkpoint": f"ck{i}"},
                                 "metrics": {"val_loss": 5.0 - i / 10}})
    return reg


def _served(version, canary=None):
    args = {"version": version}
    if canary:
        args["canary"] = {"version": canary, "weight_percent": 10}
    return {"tiny": {"name": "tiny", "args": args}}


def test_gc_keeps_the_serving_canary_and_rollback_versions_and_collects_exactly_the_rest(tmp_path):
    reg = _registry(tmp_path, 8)
    h = History(reg.storage, "tiny")
    h.append({"from": None, "to": {"version": "v2", "canary": None}, "outcome": "running"})
    h.append({"from": {"version": "v2", "canary": None}, "to": {"version": "v1", "canary": None}, "outcome": "running"})
    h.append({"from": {"version": "v1", "canary": None},
              "to": {"version": "v1", "canary": {"version": "v3", "weight_percent": 10.0}}, "outcome": "running"})
    keep, drop = retention.plan(reg, _served("v1", "v3"))
    assert {(r["version"], r["why"]) for r in keep} == {("v1", "serving"), ("v3", "canary")}
    assert [r["version"] for r in drop] == ["v2", "v4", "v5", "v6", "v7", "v8"]
    # after rolling back to v1 alone, v1 -> v1+v3 is undone by returning to v1, and v2 is not needed either
    assert retention.plan(reg, _served("v1"), keep_latest=2)[0] == [
        {"name": "tiny", "version": "v1", "uri": reg.get("tiny", "v1")["uri"], "why": "serving"},
        {"name": "tiny", "version": "v7", "uri": reg.get("tiny", "v7")["uri"], "why": "newest"},
        {"name": "tiny", "version": "v8", "uri": reg.get("tiny", "v8")["uri"], "why": "newest"}]
    deleted = retention.collect(reg, drop)
    assert deleted == ["tiny:v2", "tiny:v4", "tiny:v5", "tiny:v6", "tiny:v7", "tiny:v8"]
    assert [r["version"] for r in reg.versions("tiny")] == ["v1", "v3"]
    assert reg.next_version("tiny") == "v9"  # numbers are never reused


def test_the_rollback_target_stays(tmp_path):
    reg = _registry(tmp_path, 3)
    h = History(reg.storage, "tiny")
    h.append({"from": {"version": "v1", "canary": None}, "to": {"version": "v3", "canary": None}, "outcome": "running"})
    keep, drop = retention.plan(reg, _served("v3"))
    assert {(r["version"], r["why"]) for r in keep} == {("v3", "serving"), ("v1", "rollback target")}
    assert [r["version"] for r in drop] == ["v2"]


def test_lineage_joins_marker_checkpoint_meta_and_history(tmp_path):
    reg = _registry(tmp_path, 2)
    ck = reg.storage.path(layout.checkpoint_dir(JOB, 20))
    reg.storage.write_json(f"{ck}/{layout.CKPT_META}", {"spec": {"name": "tiny-cpu", "data": {"source": "builtin:pydoc"},
                                                                 "deepspeed": {"zero_stage": 2}}})
    History(reg.storage, "tiny").append({"at": "2026-01-01T00:00:00", "command": "serve deploy tiny:v2",
                                         "from": None, "to": {"version": "v2", "canary": None}, "outcome": "running"})
    info = retention.lineage(reg.storage, "tiny", "v2")
    assert info["job_id"] == JOB and info["checkpoint"] == {"step": 20, "uri": "ck2", "exists": True}
    assert info["spec"]["deepspeed"]["zero_stage"] == 2 and info["data"] == {"source": "builtin:pydoc"}
    assert [e["command"] for e in info["deployments"]] == ["serve deploy tiny:v2"]
    assert retention.lineage(reg.storage, "tiny", "v1")["checkpoint"]["exists"] is False
    out = CliRunner().invoke(main, ["models", "show", "tiny:v2", "--storage", str(tmp_path / "store")])
    assert out.exit_code == 0, out.output
    assert "step 20" in out.output and "serve deploy tiny:v2" in out.output and "zero_stage 2" in out.output
    js = CliRunner().invoke(main, ["models", "show", "tiny:v2", "--storage", str(tmp_path / "store"), "-o", "json"])
    assert json.loads(js.output)["deployments"][0]["outcome"] == "running"


def test_gc_without_a_cluster_deletes_nothing_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROPLANE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    reg = _registry(tmp_path, 2)
    out = CliRunner().invoke(main, ["models", "gc", "--yes", "--storage", str(tmp_path / "store")])
    assert out.exit_code != 0 and "nothing" in out.output.lower(), out.output
    assert [r["version"] for r in reg.versions("tiny")] == ["v1", "v2"]
