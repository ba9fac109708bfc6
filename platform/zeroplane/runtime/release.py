"""A gated canary release, run on the cluster as a Ray Job: ``python -m zeroplane.runtime.release``.

Started by ``zeroplane promote|serve deploy NAME:vN --canary P --gate`` once the canary serves P % of
the traffic. It runs without the operator's terminal: a Ray Job is how zeroplane already runs work on
the cluster (its log is kept, ``ray job stop`` ends it, it needs no long-lived connection from the CLI,
which only speaks HTTP to the cluster); a detached actor would need a Ray driver connection from the
CLI, and Serve's controller has no hook for decisions of this kind.

What it does (thresholds: the version's ``serve.release`` section, :class:`zeroplane.spec.model.ReleaseSpec`):

1. held-out evaluation, before any more traffic moves: bits per byte of both versions on held-out text
   (:func:`held_out_text`; :func:`zeroplane.gates.bits_per_byte`); more than
   ``max_bits_per_byte_increase`` worse rolls the canary back;
2. then, for each window of ``window_s`` seconds, the canary's error rate and p95 latency against the
   stable version's (:func:`zeroplane.gates.decide`): ``advance`` moves to the next step of ``steps``
   (100 makes the canary the stable version), ``rollback`` returns all traffic to the stable version,
   ``wait`` looks at another window (``max_wait_windows`` in a row roll back: too little traffic);
3. every decision, with its numbers, goes to ``serve/releases/<name>.json`` (what ``serve status``
   shows) and every change of traffic through :func:`zeroplane.releases.rollout` into the deployment
   history. When someone else changes the application meanwhile, the release stops ("superseded").

Input: ``ZEROPLANE_RELEASE_JSON`` = ``{"id", "name", "stable", "canary", "percent", "storage", "cluster"}``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

from .. import gates, layout, names
from ..releases import now_iso, state_of
from ..storage import Storage

ENV_RELEASE_JSON = names.ENV_RELEASE_JSON


class ReleaseRecord:
    """The release's state file, rewritten after every decision (:meth:`zeroplane.storage.Storage.update_json`)."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage, self.path = storage, storage.path(layout.release_file(name))

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` into the record."""
        self.storage.update_json(self.path, lambda doc: {**(doc if isinstance(doc, dict) else {}), **fields,
                                                          "updated_at": now_iso()})

    def decision(self, kind: str, reason: str, numbers: Dict[str, Any], percent: float) -> None:
        """Append one decision ``{"at", "decision", "reason", "numbers", "percent"}``."""
        entry = {"at": now_iso(), "decision": kind, "reason": reason, "numbers": numbers, "percent": percent}

        def change(doc: Any) -> Dict[str, Any]:
            doc = doc if isinstance(doc, dict) else {}
            return {**doc, "decisions": list(doc.get("decisions") or []) + [entry], "updated_at": now_iso()}

        self.storage.update_json(self.path, change)


def held_out_text(storage: Storage, version: Dict[str, Any], n_chars: int) -> List[str]:
    """Held-out documents of the job the canary ``version`` was trained by, up to ``n_chars`` characters.

    The job's spec is read from its checkpoint (``meta.json``); its documents are re-read from the data
    source and the validation ones kept, by the same per-document rule the job split them with
    (:func:`validation_documents`), so the text was never trained on.

    Raises:
        ValueError: the checkpoint or its spec is gone, or the source has no validation document.
    """
    from ..spec import JobSpec

    src = version.get("source") or {}
    meta_path = storage.path(layout.checkpoint_dir(src["job_id"], src["step"]), layout.CKPT_META)
    if not storage.exists(meta_path):
        raise ValueError(f"checkpoint of {version['name']}:{version['version']} ({src}) is gone: no held-out text")
    spec = JobSpec.model_validate(storage.read_json(meta_path)["spec"])
    docs = validation_documents(spec.data, n_chars)
    if not docs:
        raise ValueError(f"the data source {spec.data.source!r} has no validation document")
    return docs


def validation_documents(data, n_chars: int) -> List[str]:
    """The validation documents (parts) of a data source, in source order, up to ``n_chars`` characters.

    The documents are read as data preparation reads them (:func:`zeroplane.runtime.train.prepare.documents_of_file`;
    ``builtin:pydoc``: each topic cut into paragraphs) and a part is kept when
    :func:`zeroplane.runtime.train.prepare.is_validation` puts it in the validation split, the rule the
    job's preparation used. Files are read one at a time until enough text is found.

    Args:
        data: the job's :class:`zeroplane.spec.model.DataSpec`.
        n_chars: characters wanted.
    """
    from .. import datasets as dsets
    from .train import prepare

    out: List[str] = []
    total = 0

    def take(parts) -> bool:
        nonlocal total
        for part in parts:
            if part.strip() and prepare.is_validation(part, data.validation_fraction):
                out.append(part)
                total += len(part)
                if total >= n_chars:
                    return True
        return False

    if data.source == dsets.BUILTIN_PYDOC:
        for doc in prepare.pydoc_documents():
            if take(prepare.paragraphs(doc)):
                break
        return out
    fs, files = dsets.list_source(data.source, None)
    for f in files:
        if f.kind == "parquet":
            import pyarrow.parquet as pq

            with fs.open_input_file(f.path) as fh:
                parts = [v for v in pq.read_table(fh, columns=[data.text_field]).column(0).to_pylist()
                         if isinstance(v, str)]
        else:
            with fs.open_input_stream(f.path, compression=None) as fh:
                docs, _ = prepare.documents_of_file(f.path, fh.read(), data.text_field, "skip")
            parts = [p for doc in docs for p in doc]
        if take(parts):
            break
    return out


def _local_copy(storage: Storage, version: Dict[str, Any], work: str) -> str:
    folder = storage.path(layout.version_dir(version["name"], version["version"]))
    if storage.is_local:
        return folder
    return str(storage.download_dir(folder, os.path.join(work, version["version"])))


def evaluate(storage: Storage, stable: Dict[str, Any], canary: Dict[str, Any], n_chars: int) -> Dict[str, Any]:
    """Bits per byte of both versions on the canary job's held-out text: ``{"stable_bpb", "canary_bpb",
    "increase", "chars"}``."""
    texts = held_out_text(storage, canary, n_chars)
    with tempfile.TemporaryDirectory(prefix="zeroplane-release-") as work:
        s = gates.bits_per_byte(_local_copy(storage, stable, work), texts)
        c = gates.bits_per_byte(_local_copy(storage, canary, work), texts)
    return {"stable_bpb": round(s, 5), "canary_bpb": round(c, 5), "increase": round(c - s, 5),
            "chars": sum(len(t) for t in texts)}


def read_evidence(dashboard_url: str) -> Dict[Any, gates.Window]:
    """Cumulative :class:`zeroplane.gates.Window` per ``(model, version)`` from every alive node's metrics
    agent (found through the dashboard, as ``serve status`` does); {} when nothing can be read."""
    import requests

    from ..cluster import auth_headers
    from ..serving import _metrics_endpoints

    r = requests.get(f"{dashboard_url}/nodes?view=summary", headers=auth_headers(dashboard_url), timeout=10)
    r.raise_for_status()
    pages = []
    for url in _metrics_endpoints(r.json()):
        try:
            pages.append(gates.parse_samples(requests.get(url, timeout=10).text))
        except Exception:  # noqa: BLE001 - a node that does not answer adds nothing to the window
            continue
    return gates.merge(pages)


def run(release: Dict[str, Any], client, sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] = print) -> str:
    """Drive one release to its end; returns the final status (``promoted``, ``rolled back``, ``superseded``).

    Args:
        release: the ``ZEROPLANE_RELEASE_JSON`` document.
        client: a :class:`zeroplane.sdk.Client` for the cluster (its ``deploy`` does the watched rollouts).
        sleep: waits between readings (tests pass a faster one).
        log: where progress lines go (the job's log).
    """
    from ..spec.model import ReleaseSpec

    name, rid = release["name"], release["id"]
    storage = Storage.from_uri(release["storage"])
    stable, canary = release["stable"], release["canary"]
    policy = ReleaseSpec.model_validate((canary.get("serve_defaults") or {}).get("release") or {})
    gate = gates.GatePolicy(policy.max_error_rate, policy.max_p95_latency_ratio, policy.min_requests)
    record = ReleaseRecord(storage, name)
    percent = float(release["percent"])
    record.update(id=rid, stable=stable["version"], canary=canary["version"], status="evaluating",
                  percent=percent, policy=policy.model_dump(), job_id=os.environ.get("RAY_JOB_ID"),
                  started_at=now_iso(), decisions=[])
    sc = client.serve_client()

    def expected(p: float) -> Dict[str, Any]:
        return {"version": stable["version"], "canary": {"version": canary["version"], "weight_percent": p}}

    def finish(status: str) -> str:
        record.update(status=status, finished_at=now_iso())
        log(f"release {rid}: {status}")
        return status

    def running_overrides() -> Dict[str, Any]:
        from ..sdk import running_overrides as current_overrides

        return current_overrides(sc.applications().get(name) or {})

    def back(reason: str) -> str:
        log(f"rolling back {name} to {stable['version']}: {reason}")
        client.deploy(name, stable["version"], storage=release["storage"], overrides=running_overrides(),
                      command=f"release {rid}: rollback ({reason})")
        return finish("rolled back")

    if policy.max_bits_per_byte_increase is not None:
        try:
            numbers = evaluate(storage, stable, canary, policy.eval_chars)
        except ValueError as e:
            record.decision("rollback", f"held-out evaluation impossible: {e}", {}, percent)
            return back(f"held-out evaluation impossible: {e}")
        ok = numbers["increase"] <= policy.max_bits_per_byte_increase
        reason = (f"held-out bits/byte {numbers['canary_bpb']} vs stable {numbers['stable_bpb']} "
                  f"(+{numbers['increase']}, max +{policy.max_bits_per_byte_increase})")
        record.decision("advance" if ok else "rollback", reason, numbers, percent)
        log(reason)
        if not ok:
            return back(reason)
    steps = [p for p in policy.steps if p > percent] or [100.0]
    waited = 0
    while True:
        record.update(status=f"canary at {percent:g}%", percent=percent)
        app = (sc.applications().get(name) or {}).get("deployed_app_config")
        if state_of(app) != expected(percent):
            record.decision("stop", "the application was changed by someone else", {"serving": state_of(app)}, percent)
            return finish("superseded")
        start = read_evidence(sc.dashboard_url)
        sleep(policy.window_s)
        end = read_evidence(sc.dashboard_url)
        windows = {v: gates.difference(end.get((name, v), gates.Window(buckets={})), start.get((name, v)))
                   for v in (stable["version"], canary["version"])}
        kind, reason = gates.decide(gate, windows[stable["version"]], windows[canary["version"]])
        numbers = {"stable": windows[stable["version"]].to_dict(), "canary": windows[canary["version"]].to_dict(),
                   "window_s": policy.window_s}
        log(f"window at {percent:g}%: {kind}: {reason}")
        if kind == "wait":
            waited += 1
            record.decision("wait", reason, numbers, percent)
            if waited >= policy.max_wait_windows:
                return back(f"too little traffic to judge after {waited} windows ({reason})")
            continue
        record.decision(kind, reason, numbers, percent)
        if kind == "rollback":
            return back(reason)
        waited = 0
        percent = steps.pop(0)
        if percent >= 100:
            client.deploy(name, canary["version"], storage=release["storage"], overrides=running_overrides(),
                          command=f"release {rid}: advance to 100% ({reason})")
            return finish("promoted")
        client.deploy(name, canary["version"], storage=release["storage"], canary_percent=percent,
                      command=f"release {rid}: advance to {percent:g}% ({reason})")


def main() -> int:
    """The job's entrypoint: connect to the cluster it runs on and drive the release."""
    import ray

    from ..cluster.state import ClusterInfo
    from ..sdk import Client

    release = json.loads(os.environ[ENV_RELEASE_JSON])
    ctx = ray.init()
    dashboard = ctx.dashboard_url if ctx.dashboard_url.startswith("http") else f"http://{ctx.dashboard_url}"
    client = Client(address=dashboard)
    info = dict(release["cluster"], dashboard_url=dashboard)  # the CLI's URL may not be reachable from here
    client._cluster = ClusterInfo.from_dict(info)
    from ..cluster import apply_auth_env

    apply_auth_env()
    status = run(release, client)
    return 0 if status in ("promoted", "rolled back", "superseded") else 1


if __name__ == "__main__":
    sys.exit(main())
