"""Releases that protect the endpoint, against a real local Ray + Serve and real HTTP: a version that
crashes in its constructor and one that cannot be scheduled are undone by the CLI's rollout itself
while a client sends requests the whole time (none fails), `serve status` says what serves and what
failed, and `serve rollback` follows the recorded history."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from helpers.tiny_models import local_head, tiny_version

pytestmark = pytest.mark.integration

SMALL = {"autoscaling": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.25}}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """tiny:v1 and v2 (good), v3 (weights that are not a safetensors file: the replica's constructor
    fails; its marker matches, so only loading finds out), v4 (asks 64 CPUs per replica)."""
    from zeroplane import serve_keys
    from zeroplane.registry import Registry
    from zeroplane.sdk import Client
    from zeroplane.storage import Storage

    tmp = tmp_path_factory.mktemp("releases")
    storage = str(tmp / "storage")
    reg = Registry(Storage.from_uri(storage))
    for seed in (1, 2):
        reg.register("tiny", tiny_version(tmp / f"model-{seed}", seed), {"source": {"job_id": "test", "step": seed}})
    broken = tiny_version(tmp / "model-3", 3)
    (tmp / "model-3" / "model.safetensors").write_bytes(b"\x00" * 4096)
    reg.register("tiny", broken, {"source": {"job_id": "test", "step": 3}})
    reg.register("tiny", tiny_version(tmp / "model-4", 4),
                 {"source": {"job_id": "test", "step": 4}, "serve_defaults": {"ray_actor_options": {"num_cpus": 64}}})
    key, _ = serve_keys.create_key(storage, name="test")
    with local_head(tmp):
        yield Client(), storage, key


def _ask(url: str, key: str) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json={"prompt": "the quick", "max_tokens": 2, "temperature": 0},
                         headers={"Authorization": f"Bearer {key}"}, timeout=120)


class Load:
    """A client sending requests back to back until stopped; records (status, model) of each."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key, self.results, self._stop = url, key, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = _ask(self.url, self.key)
                self.results.append((r.status_code, r.json().get("model")))
            except Exception as e:  # a dropped connection is a failed request
                self.results.append((repr(e), None))

    def __enter__(self) -> "Load":
        self._thread.start()
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(1.0)
        self._stop.set()
        self._thread.join(timeout=180)


def test_a_version_that_crashes_on_load_is_undone_while_the_old_one_answers(head):
    from zeroplane.releases import RolloutFailed

    zp, storage, key = head
    url = zp.deploy("tiny", "v1", storage=storage, overrides=SMALL)
    with Load(url, key) as load:
        started = time.monotonic()
        with pytest.raises(RolloutFailed) as e:
            zp.deploy("tiny", "v3", storage=storage, overrides=SMALL)
        took = time.monotonic() - started
    message = str(e.value)
    assert "tiny v3 failed" in message and "v1 is serving again" in message, message
    assert "Traceback" not in message and "safetensor" in message.lower(), message  # the replica's own error
    assert load.results and all(status == 200 for status, _ in load.results), load.results[:5]
    assert {model for _, model in load.results} == {"tiny:v1"}
    (row,) = [r for r in zp.serve_status(with_requests=False, storage=storage) if r.name == "tiny"]
    assert [v["version"] for v in row.versions] == ["v1"] and row.status == "RUNNING"
    assert row.last_change["outcome"] == "failed" and row.last_change["to"]["version"] == "v3"
    print(f"\ncrash on load: {len(load.results)} requests sent, 0 failed; undone in {took:.1f}s "
          f"(decision after {row.last_change['decision_s']}s)")


def test_a_version_that_cannot_be_scheduled_is_refused_before_anything_changes(head):
    from zeroplane.releases import RolloutFailed

    zp, storage, key = head
    url = zp.deploy("tiny", "v1", storage=storage, overrides=SMALL)
    started = time.monotonic()
    with pytest.raises(RolloutFailed, match=r"cannot schedule: need 64 CPU per replica, the largest node has 4"):
        zp.deploy("tiny", "v4", storage=storage, overrides={"autoscaling": SMALL["autoscaling"]})
    assert time.monotonic() - started < 60  # bounded: no wait for Serve's 10-minute rollout timeout
    assert _ask(url, key).json()["model"] == "tiny:v1"
    history = zp.serve_history("tiny", storage=storage)
    assert history[-1]["outcome"] == "failed" and "nothing was changed" in history[-1]["restored"]


def test_rollback_follows_the_recorded_history(head):
    zp, storage, key = head
    url = zp.deploy("tiny", "v2", storage=storage, overrides=SMALL)  # v1 -> v2, after two failed tries
    back = zp.rollback("tiny", storage=storage)
    assert (back.from_version, back.to_version) == ("v2", "v1")
    assert _ask(url, key).json()["model"] == "tiny:v1"
    again = zp.rollback("tiny", storage=storage)  # a rollback is a change too: undoing it returns to v2
    assert (again.from_version, again.to_version) == ("v1", "v2")
    assert _ask(url, key).json()["model"] == "tiny:v2"
    outcomes = [(e["command"], e["outcome"]) for e in zp.serve_history("tiny", storage=storage)]
    assert ("serve deploy tiny:v3", "failed") in outcomes and outcomes[-1] == ("serve rollback tiny", "running")


def test_models_gc_removes_exactly_what_no_endpoint_needs(head, tmp_path):
    import json

    from click.testing import CliRunner

    from zeroplane.cli.main import main
    from zeroplane.registry import Registry
    from zeroplane.storage import Storage

    zp, storage, key = head
    reg = Registry(Storage.from_uri(storage))
    for seed in (5, 6, 7):  # with v3 (broken) and v4 (unschedulable): five versions nobody serves
        reg.register("tiny", tiny_version(tmp_path / f"model-{seed}", seed), {"source": {"job_id": "test", "step": seed}})
    url = zp.deploy("tiny", "v1", storage=storage, overrides=SMALL)
    zp.deploy("tiny", "v2", storage=storage, canary_percent=10)
    dry = CliRunner().invoke(main, ["models", "gc", "tiny", "--storage", storage, "-o", "json"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.output)
    assert sorted(r["version"] for r in plan["collect"]) == ["v3", "v4", "v5", "v6", "v7"] and plan["deleted"] == []
    assert [r["version"] for r in reg.versions("tiny")] == [f"v{i}" for i in range(1, 8)]  # a dry run deletes nothing
    done = CliRunner().invoke(main, ["models", "gc", "tiny", "--yes", "--storage", storage, "-o", "json"])
    assert sorted(json.loads(done.output)["deleted"]) == ["tiny:v3", "tiny:v4", "tiny:v5", "tiny:v6", "tiny:v7"]
    assert [r["version"] for r in reg.versions("tiny")] == ["v1", "v2"]
    assert {_ask(url, key).json()["model"] for _ in range(10)} <= {"tiny:v1", "tiny:v2"}
    pinned = requests.post(f"{url}/v1/completions", json={"prompt": "the", "max_tokens": 1, "model": "tiny:v2"},
                           headers={"Authorization": f"Bearer {key}"}, timeout=120)
    assert pinned.json()["model"] == "tiny:v2"  # the canary still answers
    shown = CliRunner().invoke(main, ["models", "show", "tiny:v2", "--storage", storage, "-o", "json"])
    assert [e["outcome"] for e in json.loads(shown.output)["deployments"]][-1] == "running"
