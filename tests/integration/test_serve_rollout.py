"""Rollout, rollback and canary through the control plane (zeroplane.sdk.Client) against a real local Ray
head started with zeroplane.cluster.start_local_head: two registered tiny GPT-2 versions, real HTTP."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import requests

from helpers.tiny_models import local_head, tiny_version

pytestmark = pytest.mark.integration

SMALL = {"autoscaling": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.25}}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A zeroplane local head (own ZEROPLANE_HOME and Ray token file), a registry with tiny:v1 and tiny:v2."""
    from zeroplane import serve_keys
    from zeroplane.registry import Registry
    from zeroplane.sdk import Client
    from zeroplane.storage import Storage

    tmp = tmp_path_factory.mktemp("rollout")
    storage = str(tmp / "storage")
    reg = Registry(Storage.from_uri(storage))
    for seed in (1, 2):
        reg.register("tiny", tiny_version(tmp / f"model-{seed}", seed), {"source": {"job_id": "test", "step": seed}})
    key, _ = serve_keys.create_key(storage, name="test")
    with local_head(tmp):
        yield Client(), storage, key


def _ask(url: str, key: str, body=None, headers=None) -> requests.Response:
    body = body or {"prompt": "the quick", "max_tokens": 2, "temperature": 0}
    return requests.post(f"{url}/v1/completions", json=body, timeout=120,
                         headers={"Authorization": f"Bearer {key}", **(headers or {})})


def test_rollout_and_rollback_drop_no_request(head):
    zp, storage, key = head
    url = zp.deploy("tiny", "v1", storage=storage, overrides=SMALL)
    assert _ask(url, key).json()["model"] == "tiny:v1"

    results: list = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r = _ask(url, key)
                results.append((sent, r.status_code, r.json().get("model")))
            except Exception as e:  # a dropped connection is a failed request
                results.append((sent, repr(e), None))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        zp.deploy("tiny", "v2", storage=storage, overrides=SMALL)
        done = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        thread.join(timeout=180)
    assert results and all(status == 200 for _, status, _ in results), [r for r in results if r[1] != 200][:5]
    after = [model for sent, _, model in results if sent > done]
    assert after and set(after) == {"tiny:v2"}
    assert {"tiny:v1", "tiny:v2"} <= {model for _, _, model in results}

    back = zp.rollback("tiny", storage=storage)
    assert (back.from_version, back.to_version) == ("v2", "v1")
    assert {_ask(url, key).json()["model"] for _ in range(3)} == {"tiny:v1"}
    again = zp.rollback("tiny", storage=storage)  # rollback follows the history: it undoes the rollback
    assert (again.from_version, again.to_version) == ("v1", "v2")


def test_canary_splits_traffic_and_status_reports_it(head):
    zp, storage, key = head
    url = zp.deploy("tiny", "v1", storage=storage, overrides=SMALL)
    zp.deploy("tiny", "v2", storage=storage, canary_percent=50)
    answered = Counter(_ask(url, key).json()["model"] for _ in range(40))
    assert set(answered) == {"tiny:v1", "tiny:v2"} and min(answered.values()) >= 5, answered
    # the same X-Request-Id always lands on the same version; a pinned model version is honoured
    assert len({_ask(url, key, headers={"X-Request-Id": "abc"}).json()["model"] for _ in range(4)}) == 1
    pinned = {"prompt": "the", "max_tokens": 1, "model": "tiny:v2"}
    assert {_ask(url, key, body=pinned).json()["model"] for _ in range(4)} == {"tiny:v2"}
    models = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=60).json()
    assert {(m["id"], m["weight_percent"]) for m in models["data"]} == {("tiny:v1", 50.0), ("tiny:v2", 50.0)}

    deadline = time.monotonic() + 90  # Ray's metrics agent exports every few seconds
    while True:
        (row,) = [r for r in zp.serve_status() if r.name == "tiny"]
        by_version = {v["version"]: v for v in row.versions}
        if all((by_version[v]["requests"] or 0) >= answered[f"tiny:{v}"] for v in ("v1", "v2")):
            break
        assert time.monotonic() < deadline, row
        time.sleep(2)
    assert [(v["version"], v["weight_percent"]) for v in row.versions] == [("v1", 50.0), ("v2", 50.0)]
    assert all(v["running_replicas"] == 1 for v in row.versions)

    back = zp.rollback("tiny", storage=storage)  # ends the split
    assert (back.from_version, back.to_version) == ("v2", "v1")
    assert {_ask(url, key).json()["model"] for _ in range(6)} == {"tiny:v1"}


def _running_replicas(zp) -> int:
    (row,) = [r for r in zp.serve_status(with_requests=False) if r.name == "tiny"]
    return sum(v["running_replicas"] for v in row.versions)


def test_autoscaling_up_under_load_and_to_zero_when_idle(head):
    zp, storage, key = head
    auto = {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 1,
            "upscale_delay_s": 1, "downscale_delay_s": 3}
    url = zp.deploy("tiny", "v1", storage=storage,
                    overrides={"autoscaling": auto, "ray_actor_options": {"num_cpus": 0.25}})
    (row,) = [r for r in zp.serve_status(with_requests=False) if r.name == "tiny"]
    assert row.versions[0]["autoscaling"]["upscale_delay_s"] == 1
    assert row.versions[0]["autoscaling"]["downscale_delay_s"] == 3
    # scaled to zero (or on its way): a request is answered after a cold start
    assert _ask(url, key).status_code == 200

    stop = threading.Event()
    statuses: list = []
    body = {"prompt": "the quick", "max_tokens": 48, "temperature": 0}

    def load():
        while not stop.is_set():
            try:
                statuses.append(_ask(url, key, body=body).status_code)
            except Exception as e:
                statuses.append(repr(e))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    peak = 0
    try:
        deadline = time.monotonic() + 120  # a bound only: it passes as soon as the second replica runs
        while time.monotonic() < deadline and peak < 2:
            peak = max(peak, _running_replicas(zp))
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert peak >= 2, f"never scaled up under load: peak {peak}"
    assert statuses and all(s == 200 for s in statuses), [s for s in statuses if s != 200][:5]

    deadline = time.monotonic() + 150
    while _running_replicas(zp) > 0:
        assert time.monotonic() < deadline, "did not scale back to min_replicas=0 when idle"
        time.sleep(2)
    assert _ask(url, key).status_code == 200  # cold start from zero
