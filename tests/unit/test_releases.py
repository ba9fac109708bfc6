"""Rollouts that undo themselves, decided from Serve's reported state: the history file on real
storage, the decisions of `watch` and `rollout` against a scripted Serve state sequence (the
integration tests in tests/integration/test_releases_on_serve.py run the same code against a real Serve)."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from zeroplane import releases
from zeroplane.errors import NotFoundError
from zeroplane.releases import History, RolloutFailed, check_fits, replica_error, rollback_target, unschedulable
from zeroplane.storage import Storage

# the shape of Serve's messages (ray/serve/_private/deployment_state.py, Ray 2.60)
FAILED = ("A replica failed to start with exception. Retrying 2 more time(s). Error:\n"
          "ray::ServeReplica:tiny:ModelServer.initialize_and_get_metadata() (pid=1, ip=127.0.0.1)\n"
          "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
          "safetensors_rust.SafetensorError: Error while deserializing header: header too large")
SLOW = ("Deployment 'ModelServer' in application 'tiny' has 1 replicas that have taken more than 30s to be "
        "scheduled. This may be due to waiting for the cluster to auto-scale or for a runtime environment to be "
        "installed. Resources required for each replica: {'CPU': 8.0}, total resources available: {'CPU': 3.5}. "
        "Use `ray status` for more details.")


def _app(version, canary=None, status="RUNNING", dep_status="HEALTHY", message=""):
    args = {"version": version}
    if canary:
        args["canary"] = {"version": canary, "weight_percent": 10}
    return {"status": status, "deployed_app_config": {"name": "tiny", "args": args},
            "deployments": {"ModelServer": {"status": dep_status, "message": message}}}


class ScriptedServe:
    """Serve as a sequence of reported states: each `applications()` call returns the next (the last repeats)."""

    def __init__(self, before, after_apply):
        self.before, self.after, self.i, self.applied = before, list(after_apply), 0, []

    def applications(self):
        if not self.applied:
            return {"tiny": self.before} if self.before else {}
        state = self.after[min(self.i, len(self.after) - 1)]
        self.i += 1
        return {"tiny": state} if state else {}

    def apply(self, app):
        self.applied.append(app)
        if len(self.applied) > 1:  # the restore: Serve takes back the old config at once
            self.after = [self.before]
            self.i = 0

    def delete(self, name):
        self.applied.append(None)


def test_replica_error_and_scheduling_shortfall_are_read_from_serves_messages():
    assert replica_error(FAILED) == "SafetensorError: Error while deserializing header: header too large"
    assert unschedulable(SLOW) == ("cannot schedule: need {'CPU': 8.0} per replica, the cluster has "
                                   "{'CPU': 3.5} available")


def test_a_replica_that_fits_no_node_is_refused_with_both_numbers():
    check_fits({"CPU": 2.0, "GPU": 0.0}, [{"CPU": 4.0}, {"CPU": 2.0}])
    with pytest.raises(RolloutFailed, match=r"need 64 CPU per replica, the largest node has 4"):
        check_fits({"CPU": 64.0}, [{"CPU": 4.0}, {"CPU": 2.0}])
    with pytest.raises(RolloutFailed, match="need 1 GPU"):
        check_fits({"CPU": 1.0, "GPU": 1.0}, [{"CPU": 4.0}])


def test_failed_rollout_restores_the_previous_config_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(releases, "POLL_S", 0.0)
    storage = Storage.from_uri(str(tmp_path))
    v1 = _app("v1")
    serve = ScriptedServe(v1, [_app("v2", status="DEPLOYING", dep_status="UPDATING"),
                               _app("v2", status="DEPLOYING", dep_status="UPDATING", message=FAILED)])
    new = {"name": "tiny", "args": {"version": "v2"}, "deployments": [{"ray_actor_options": {"num_cpus": 1}}]}
    with pytest.raises(RolloutFailed) as e:
        releases.rollout(serve, storage, new, "serve deploy tiny:v2", timeout_s=30)
    assert "SafetensorError" in str(e.value) and "v1 is serving again" in str(e.value)
    assert serve.applied == [new, v1["deployed_app_config"]]
    (entry,) = History(storage, "tiny").entries()
    assert entry["outcome"] == "failed" and entry["from"] == {"version": "v1", "canary": None}
    assert entry["to"] == {"version": "v2", "canary": None} and "SafetensorError" in entry["reason"]
    assert entry["decision_s"] >= 0 and "serving again" in entry["restored"]


def test_replicas_that_stay_unscheduled_are_undone_and_a_stale_message_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(releases, "POLL_S", 0.0)
    storage = Storage.from_uri(str(tmp_path))
    old_failure = _app("v1", message=FAILED)  # left from an earlier failed rollout: not this one's
    serve = ScriptedServe(old_failure, [_app("v2", status="DEPLOYING", dep_status="UPDATING", message=FAILED),
                                        _app("v2", status="DEPLOYING", dep_status="UPDATING", message=SLOW)])
    new = {"name": "tiny", "args": {"version": "v2"}}
    with pytest.raises(RolloutFailed, match=r"cannot schedule: need \{'CPU': 8.0\}"):
        releases.rollout(serve, storage, new, "serve deploy tiny:v2", timeout_s=30, schedule_timeout_s=0)


def test_a_first_deployment_that_fails_is_removed_again(tmp_path, monkeypatch):
    monkeypatch.setattr(releases, "POLL_S", 0.0)
    storage = Storage.from_uri(str(tmp_path))
    serve = ScriptedServe(None, [_app("v1", status="DEPLOY_FAILED", dep_status="DEPLOY_FAILED", message=FAILED)])
    with pytest.raises(RolloutFailed, match="removed again"):
        releases.rollout(serve, storage, {"name": "tiny", "args": {"version": "v1"}}, "serve deploy tiny:v1")
    assert serve.applied[-1] is None


def test_rollback_returns_to_where_the_last_effective_change_started(tmp_path):
    h = History(Storage.from_uri(str(tmp_path)), "tiny")
    with pytest.raises(NotFoundError, match="no recorded deployment"):
        rollback_target(h, {"version": "v1", "canary": None})
    s1, s2, s3 = ({"version": v, "canary": None} for v in ("v1", "v2", "v3"))
    h.append({"from": None, "to": s1, "outcome": "running"})
    with pytest.raises(NotFoundError, match="first deployment"):
        rollback_target(h, s1)
    h.append({"from": s1, "to": s2, "outcome": "running"})
    h.append({"from": s2, "to": s3, "outcome": "failed"})  # undone: v2 is what serves
    assert rollback_target(h, s2) == s1  # not "the version registered before" v2 in some other order
    split = {"version": "v2", "canary": {"version": "v3", "weight_percent": 10.0}}
    h.append({"from": s2, "to": split, "outcome": "running"})
    assert rollback_target(h, split) == s2
    assert [e["id"] for e in h.entries()] == [1, 2, 3, 4]


def _append_many(root: str, n: int) -> None:
    h = History(Storage.from_uri(root), "tiny")
    for i in range(n):
        h.append({"to": {"version": f"v{i}", "canary": None}, "outcome": "running"})


def test_two_processes_appending_lose_no_entry(tmp_path):
    procs = [mp.get_context("spawn").Process(target=_append_many, args=(str(tmp_path), 15)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    ids = [e["id"] for e in History(Storage.from_uri(str(tmp_path)), "tiny").entries()]
    assert ids == list(range(1, 31))


class FollowingServe:
    """Serve that runs whatever was applied last (HEALTHY, or FAILED for a config ``fail`` picks), with a
    ModelServerCanary deployment whenever the config has a canary."""

    def __init__(self, before, fail=lambda app: False, canary_status="HEALTHY"):
        self.applied, self.current, self.fail, self.canary_status = [], before, fail, canary_status

    def applications(self):
        failed = self.fail(self.current)
        deployments = {"ModelServer": {"status": "UNHEALTHY" if failed else "HEALTHY",
                                       "message": FAILED if failed else ""}}
        if self.current["args"].get("canary"):
            deployments["ModelServerCanary"] = {"status": self.canary_status}
        return {"tiny": {"status": "DEPLOY_FAILED" if failed else "RUNNING", "deployed_app_config": self.current,
                         "deployments": deployments}}

    def apply(self, app):
        self.applied.append(app)
        self.current = app


def _config(version, canary=None):
    deployments = [{"name": "ModelServer", "ray_actor_options": {"num_cpus": 1}}]
    args = {"version": version}
    if canary:
        args["canary"] = {"version": canary, "model_uri": f"/m/{canary}", "weight_percent": 50.0}
        deployments.append({"name": "ModelServerCanary", "ray_actor_options": {"num_cpus": 0.5}})
    return {"name": "tiny", "import_path": "x:build", "args": args, "deployments": deployments}


def test_ending_a_split_first_drains_the_canary_then_removes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(releases, "POLL_S", 0.0)
    storage = Storage.from_uri(str(tmp_path))
    before, promoted = _config("v1", canary="v2"), _config("v2")
    serve = FollowingServe(before)
    releases.rollout(serve, storage, promoted, "release: advance to 100%", timeout_s=30)
    drain, final = serve.applied
    assert final == promoted
    # the new ingress (v2) with the old canary deployment kept unchanged, but routed nothing
    assert drain["args"]["version"] == "v2" and drain["args"]["canary"] == {**before["args"]["canary"], "weight_percent": 0.0}
    assert drain["deployments"] == [promoted["deployments"][0], before["deployments"][1]]
    (entry,) = History(storage, "tiny").entries()  # one change in the history, not two
    assert entry["to"] == {"version": "v2", "canary": None} and entry["outcome"] == "running"


def test_a_rollout_that_keeps_or_adds_a_canary_is_applied_in_one_step(tmp_path, monkeypatch):
    monkeypatch.setattr(releases, "POLL_S", 0.0)
    storage = Storage.from_uri(str(tmp_path))
    assert releases.drain_step(None, _config("v1")) is None
    assert releases.drain_step(_config("v1"), _config("v1", canary="v2")) is None
    assert releases.drain_step(_config("v1", canary="v2"), _config("v1", canary="v3")) is None
    serve = FollowingServe(_config("v1"))
    releases.rollout(serve, storage, _config("v1", canary="v2"), "serve deploy tiny:v2 --canary 50", timeout_s=30)
    assert serve.applied == [_config("v1", canary="v2")]


def test_a_drain_step_that_fails_does_not_stop_the_canary_from_being_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(releases, "POLL_S", 0.0)
    storage = Storage.from_uri(str(tmp_path))
    before, back = _config("v1", canary="v2"), _config("v1")
    serve = FollowingServe(before, fail=lambda app: (app["args"].get("canary") or {}).get("weight_percent") == 0.0)
    releases.rollout(serve, storage, back, "release: rollback", timeout_s=30)
    drain, final = serve.applied  # the failed step is not undone back to the split: the canary goes
    assert drain["args"]["canary"]["weight_percent"] == 0.0 and final == back
    assert History(storage, "tiny").entries()[-1]["outcome"] == "running"


def test_a_canary_that_is_not_healthy_is_removed_without_a_drain_step(tmp_path, monkeypatch):
    monkeypatch.setattr(releases, "POLL_S", 0.0)
    storage = Storage.from_uri(str(tmp_path))
    serve = FollowingServe(_config("v1", canary="v2"), canary_status="UNHEALTHY")
    releases.rollout(serve, storage, _config("v1"), "serve rollback tiny", timeout_s=30)
    assert serve.applied == [_config("v1")]


def test_a_draining_canary_takes_no_traffic_in_what_status_shows():
    from zeroplane.serving import split_of

    drain = {"args": {"version": "v2", "canary": {"version": "v2", "model_uri": "/m", "weight_percent": 0.0}}}
    assert split_of({"deployed_app_config": drain}) == [{"version": "v2", "weight_percent": 100.0, "deployment": "ModelServer"}]
    assert releases.describe(releases.state_of(drain)) == "v2 (draining canary v2)"


# Ray 2.60 prints the resource dicts as JSON; the replica needs less than is free: slow, not unschedulable.
SLOW_BUT_FREE = SLOW.replace("{'CPU': 8.0}", '{"CPU": 0.25}').replace("{'CPU': 3.5}", '{"CPU": 3.15}')


def test_replicas_slow_to_start_with_the_resources_free_are_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(releases, "POLL_S", 0.0)
    storage = Storage.from_uri(str(tmp_path))
    slow = _app("v2", status="DEPLOYING", dep_status="UPDATING", message=SLOW_BUT_FREE)
    serve = ScriptedServe(_app("v1"), [slow] * 20 + [_app("v2")])
    new = {"name": "tiny", "args": {"version": "v2"}}
    releases.rollout(serve, storage, new, "serve deploy tiny:v2", timeout_s=30, schedule_timeout_s=0)
    assert serve.applied == [new]  # never undone
    assert [e["outcome"] for e in History(storage, "tiny").entries()] == ["running"]
    assert releases.fits_available(SLOW_BUT_FREE) and not releases.fits_available(SLOW)
    assert not releases.fits_available("taken more than 30s to be scheduled")  # says nothing: not free
