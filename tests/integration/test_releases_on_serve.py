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


#: A gated release that decides within a test's time: one 12 s window per step (Ray's metrics agents
#: export every few seconds), no held-out evaluation (these versions come from no job).
FAST_RELEASE = {"steps": [50, 100], "window_s": 12, "min_requests": 5, "max_error_rate": 0.05,
                "max_wait_windows": 4, "max_bits_per_byte_increase": None}
#: A prompt of ~8 tokens asking for 12 more: over a 16-token context, within a 64-token one.
LONG = {"prompt": "the quick brown fox jumps over the lazy dog", "max_tokens": 12, "temperature": 0}


def _release_outcome(storage: str, canary: str, timeout_s: float = 600) -> dict:
    """The finished release record of ``canary`` (an earlier release's record is there until this one starts).

    ``timeout_s`` only bounds a release that never ends: one takes ~110 s on an idle 2-core machine and over
    twice that while the rest of the suite's processes are still winding down."""
    from zeroplane import layout
    from zeroplane.storage import Storage

    st = Storage.from_uri(storage)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        path = st.path(layout.release_file("tiny"))
        rec = st.read_json(path) if st.exists(path) else {}
        if rec.get("canary") == canary and rec.get("status") in ("promoted", "rolled back", "superseded"):
            return rec
        time.sleep(1.0)
    raise AssertionError(f"the release did not finish in {timeout_s}s: {rec}")


def _gated(head, tmp_path, seed: int, n_positions: int):
    from zeroplane.registry import Registry
    from zeroplane.storage import Storage

    zp, storage, key = head
    rec = Registry(Storage.from_uri(storage)).register(
        "tiny", tiny_version(tmp_path / f"model-{seed}", seed, n_positions=n_positions),
        {"source": {"job_id": "test", "step": seed}, "serve_defaults": {"release": FAST_RELEASE}})
    url = zp.deploy("tiny", "v1", storage=storage, overrides=SMALL)
    results: list = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            r = requests.post(f"{url}/v1/completions", json=LONG, headers={"Authorization": f"Bearer {key}"}, timeout=120)
            results.append((r.status_code, r.json().get("model") if r.status_code == 200 else r.text[:300]))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        zp.deploy("tiny", rec["version"], storage=storage, canary_percent=50, gate=True)
        outcome = _release_outcome(storage, rec["version"])
        took = time.monotonic() - started
    finally:
        stop.set()
        thread.join(timeout=180)
    (row,) = [r for r in zp.serve_status(with_requests=False, storage=storage) if r.name == "tiny"]
    return rec["version"], outcome, took, results, row


def test_a_canary_whose_error_rate_exceeds_its_gate_is_rolled_back(head, tmp_path):
    version, outcome, took, results, row = _gated(head, tmp_path, 8, n_positions=16)
    assert outcome["status"] == "rolled back", outcome
    last = outcome["decisions"][-1]
    assert last["decision"] == "rollback" and "max_error_rate" in last["reason"], outcome["decisions"]
    assert last["numbers"]["canary"]["error_rate"] > 0.05 and last["numbers"]["stable"]["errors"] == 0
    assert [v["version"] for v in row.versions] == ["v1"] and row.release["status"] == "rolled back"
    assert {m for s, m in results if s == 200} == {"tiny:v1"}  # only the canary failed requests
    print(f"\ngated release, bad canary {version}: {len(results)} requests, "
          f"{sum(s != 200 for s, _ in results)} failed (all on the canary); rolled back {took:.1f}s after the "
          f"canary started: {last['reason']}")


def test_a_canary_that_meets_its_gates_reaches_100_percent(head, tmp_path):
    version, outcome, took, results, row = _gated(head, tmp_path, 9, n_positions=64)
    assert outcome["status"] == "promoted", outcome
    assert [d["decision"] for d in outcome["decisions"] if d["decision"] != "wait"] == ["advance"]  # 50 % -> 100 %
    assert [v["version"] for v in row.versions] == [version]
    assert results and all(s == 200 for s, _ in results), [r for r in results if r[0] != 200][:5]
    commands = [e["command"] for e in head[0].serve_history("tiny", storage=head[1])]
    assert any("advance to 100%" in c for c in commands), commands
    print(f"\ngated release, good canary {version}: {len(results)} requests, 0 failed; 50% -> 100% in {took:.1f}s")


def test_models_gc_removes_exactly_what_no_endpoint_needs(head, tmp_path):
    import json

    from click.testing import CliRunner

    from zeroplane.cli.main import main
    from zeroplane.registry import Registry
    from zeroplane.storage import Storage

    zp, storage, key = head
    reg = Registry(Storage.from_uri(storage))
    for seed in (5, 6, 7):  # with v3 (broken), v4 (unschedulable) and the gated ones: versions nobody serves
        reg.register("tiny", tiny_version(tmp_path / f"model-{seed}", seed), {"source": {"job_id": "test", "step": seed}})
    url = zp.deploy("tiny", "v1", storage=storage, overrides=SMALL)
    zp.deploy("tiny", "v2", storage=storage, canary_percent=10)
    others = [r["version"] for r in reg.versions("tiny") if r["version"] not in ("v1", "v2")]
    assert len(others) >= 5
    dry = CliRunner().invoke(main, ["models", "gc", "tiny", "--storage", storage, "-o", "json"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.output)
    assert sorted(r["version"] for r in plan["collect"]) == sorted(others) and plan["deleted"] == []
    assert len(reg.versions("tiny")) == len(others) + 2  # a dry run deletes nothing
    done = CliRunner().invoke(main, ["models", "gc", "tiny", "--yes", "--storage", storage, "-o", "json"])
    assert sorted(json.loads(done.output)["deleted"]) == sorted(f"tiny:{v}" for v in others)
    assert [r["version"] for r in reg.versions("tiny")] == ["v1", "v2"]
    assert {_ask(url, key).json()["model"] for _ in range(10)} <= {"tiny:v1", "tiny:v2"}
    pinned = requests.post(f"{url}/v1/completions", json={"prompt": "the", "max_tokens": 1, "model": "tiny:v2"},
                           headers={"Authorization": f"Bearer {key}"}, timeout=120)
    assert pinned.json()["model"] == "tiny:v2"  # the canary still answers
    shown = CliRunner().invoke(main, ["models", "show", "tiny:v2", "--storage", storage, "-o", "json"])
    assert [e["outcome"] for e in json.loads(shown.output)["deployments"]][-1] == "running"
