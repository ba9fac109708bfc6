"""MLflow, optional: one run per job (found again by its job-id tag after a restart or ``train resume``) and
one registered model version per promotion, pointing at zeroplane's version.

Used from both sides: rank 0 of a job logs through :class:`MlflowSink`; ``promote`` calls
:func:`record_promotion`. ``mlflow`` is imported only here and only when a tracking URI is set
(``tracking.mlflow_uri`` in the spec, else ``$MLFLOW_TRACKING_URI``), so a job or a promotion without
one never needs the package (``pip install 'zeroplane[tracking]'`` brings the client, ``mlflow-skinny``).

Names both sides use: the run tag :data:`TAG_JOB_ID` holds the zeroplane job id; the run's artifacts
``zeroplane/spec.json`` and ``zeroplane/deepspeed_config.json`` hold the resolved spec and DeepSpeed config;
a model version carries the tags ``zeroplane.name``, ``zeroplane.version``, ``zeroplane.uri``,
``zeroplane.job_id`` and ``zeroplane.checkpoint_step``.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

#: The run tag holding the zeroplane job id (the run folder's name, the same across resumes).
TAG_JOB_ID = "zeroplane.job_id"
#: MLflow's limits (``mlflow.utils.validation``): metrics and params per ``log_batch``, characters per param.
_BATCH_METRICS, _BATCH_PARAMS, _PARAM_CHARS = 1000, 100, 6000


def tracking_uri(spec_tracking: Optional[Dict[str, Any]]) -> Optional[str]:
    """The MLflow tracking URI for a job: ``tracking.mlflow_uri`` of its spec (a dict as dumped), else
    ``$MLFLOW_TRACKING_URI``, else None (no MLflow)."""
    uri = (spec_tracking or {}).get("mlflow_uri")
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def bound_requests(timeout_s: float) -> None:
    """Make every MLflow HTTP request of this process give up after ``timeout_s`` seconds, without MLflow's
    own retries (default 7 retries with backoff, 120 s each: minutes against a server that is down).

    Sets ``MLFLOW_HTTP_REQUEST_TIMEOUT`` and ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (read by MLflow per request)
    unless the environment already sets them.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(round(timeout_s)))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``: a nested dict as MLflow parameters (values as JSON for lists,
    cut to MLflow's 6,000 characters)."""
    out: Dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v)
            out[key] = text[:_PARAM_CHARS]
    return out


def find_run(client, experiment: str, job_id: str):
    """The newest run of ``experiment`` tagged ``zeroplane.job_id = job_id``, or None (also when the
    experiment does not exist)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_JOB_ID}` = '{job_id}'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


class MlflowSink:
    """Non-blocking, bounded MLflow logging for one job; rank 0 uses it, training never waits for it.

    A daemon thread makes every call to the server. It first finds the job's run (tag :data:`TAG_JOB_ID`
    in ``experiment``) or creates it and logs ``params`` and the JSON ``artifacts``; then, whenever
    :meth:`flush` wakes it or ``period_s`` passes, it sends the pending metrics with ``log_batch``.
    :meth:`log_metrics` only appends to a queue of at most ``max_pending`` values (the oldest are dropped
    and counted when the server stays away that long). A failed call (server down, slow past
    ``timeout_s``, refusing) is written to stderr once per failure streak and retried at the next wake-up;
    the metrics stay queued in order.

    Args:
        uri: tracking server URL.
        experiment: experiment name (created if absent).
        job_id: the zeroplane job id (tag, and the run name of a new run).
        params: flat ``{name: value}`` parameters of a new run (a found run keeps its own: MLflow params are
            immutable, and a resume may change the spec).
        artifacts: ``{artifact path: JSON-able object}`` logged with ``log_dict`` (a found run gets them under
            ``zeroplane/resume-<start_step>/``).
        start_step: the step this run attempt starts from (0 for a new job).
        timeout_s: bound on each request (:func:`bound_requests`).
        period_s: longest wait between two sends.
        max_pending: metric values kept while the server is unreachable.
    """

    def __init__(self, uri: str, experiment: str, job_id: str, params: Dict[str, str],
                 artifacts: Dict[str, Any], start_step: int = 0, timeout_s: float = 5.0, period_s: float = 10.0,
                 max_pending: int = 100_000, log: Optional[Callable[[str], None]] = None) -> None:
        bound_requests(timeout_s)
        self.uri, self.experiment, self.job_id = uri, experiment, job_id
        self._params, self._artifacts, self._start_step = params, artifacts, start_step
        self._period_s = period_s
        self._pending: Deque[Tuple[str, float, int, int]] = collections.deque(maxlen=max_pending)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sent_all = threading.Event()
        self._log = log or (lambda msg: print(f"[zeroplane] mlflow: {msg}", file=sys.stderr, flush=True))
        self.run_id: Optional[str] = None
        self._final_status = "FINISHED"
        self.failures = 0  # failed attempts so far
        self.dropped = 0  # metric values dropped from a full queue
        self._failing = False
        self._client = None
        self._thread = threading.Thread(target=self._run, name="zeroplane-mlflow", daemon=True)
        self._thread.start()

    def log_metrics(self, metrics: Dict[str, float], step: int, timestamp_ms: Optional[int] = None) -> None:
        """Queue ``metrics`` at ``step`` (returns at once; non-finite values are skipped)."""
        import math
        import time

        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        with self._lock:
            for k, v in metrics.items():
                if v is None or not math.isfinite(float(v)):
                    continue
                if len(self._pending) == self._pending.maxlen:
                    self.dropped += 1
                self._pending.append((k, float(v), ts, int(step)))

    def flush(self) -> None:
        """Ask the thread to send now (returns at once)."""
        self._wake.set()

    def close(self, status: str = "FINISHED", wait_s: float = 10.0) -> bool:
        """Send what is queued, mark the run ``status`` (FINISHED | FAILED | KILLED), stop the thread.

        Waits at most ``wait_s`` seconds; returns True when everything was sent and the run marked.
        """
        self._final_status = status
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=wait_s)
        return self._sent_all.is_set()

    @property
    def pending(self) -> int:
        """Metric values queued and not yet sent."""
        with self._lock:
            return len(self._pending)

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=self._period_s)
            self._wake.clear()
            stopping = self._stop.is_set()
            ok = self._attempt()
            if stopping:
                if ok and self.run_id:
                    try:
                        self._client.set_terminated(self.run_id, self._final_status)
                        self._sent_all.set()
                    except Exception as e:
                        self._failed("marking the run ended", e)
                return

    def _attempt(self) -> bool:
        try:
            if self.run_id is None:
                self._open_run()
            self._send_pending()
        except Exception as e:
            self._failed("sending" if self.run_id else "opening the run", e)
            return False
        if self._failing:
            self._log(f"{self.uri} reachable again; queued metrics sent")
            self._failing = False
        return True

    def _failed(self, what: str, e: BaseException) -> None:
        self.failures += 1
        if not self._failing:
            self._log(f"{what} at {self.uri} failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                      f"training goes on, retrying every period ({self.pending} values queued)")
        self._failing = True

    def _open_run(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = self._client or MlflowClient(tracking_uri=self.uri)
        self._client = client
        run = find_run(client, self.experiment, self.job_id)
        if run is None:
            exp = client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment)
            run = client.create_run(exp_id, tags={TAG_JOB_ID: self.job_id}, run_name=self.job_id)
            items = list(self._params.items())
            for i in range(0, len(items), _BATCH_PARAMS):
                client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i:i + _BATCH_PARAMS]])
            prefix = ""
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            prefix = f"resume-{self._start_step}/"
        for path, obj in self._artifacts.items():
            head, _, name = path.rpartition("/")
            client.log_dict(run.info.run_id, obj, f"{head}/{prefix}{name}" if head else f"{prefix}{name}")
        self.run_id = run.info.run_id

    def _send_pending(self) -> None:
        from mlflow.entities import Metric

        while True:
            with self._lock:
                batch = [self._pending.popleft() for _ in range(min(_BATCH_METRICS, len(self._pending)))]
            if not batch:
                return
            try:
                self._client.log_batch(self.run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in batch])
            except Exception:
                with self._lock:  # back to the front, in order, for the next attempt
                    self._pending.extendleft(reversed(batch))
                raise


def record_promotion(record: Dict[str, Any], spec: Optional[Dict[str, Any]],
                     say: Callable[[str], None] = lambda _m: None) -> Dict[str, Any]:
    """Record a zeroplane version in MLflow's model registry, if the job tracked to MLflow; returns ``record``.

    Creates the registered model ``record["name"]`` if absent and a model version whose source is a
    pointer artifact ``zeroplane/versions/<name>/<vN>/zeroplane_version.json`` logged to the job's run
    (so the version links to its source run), tagged with zeroplane's name, version, URI, job id and
    checkpoint step. MLflow trouble never undoes the zeroplane registration: it is reported through
    ``say`` and ``record`` comes back without ``mlflow``.

    Args:
        record: the registered version record (``name``, ``version``, ``uri``, ``source.job_id``,
            ``source.step``, ``source.checkpoint``).
        spec: the job's spec as dumped (its ``tracking`` section picks the server and experiment).
        say: progress/warning lines.

    Returns:
        ``record``, with ``record["mlflow"] = {"registered_model", "version", "run_id", "uri"}`` of the
        MLflow model version when one was created.
    """
    tracking = (spec or {}).get("tracking") or {}
    uri = tracking_uri(tracking)
    if not uri:
        return record
    try:
        import tempfile

        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        bound_requests(float(tracking.get("mlflow_timeout_s") or 5.0) * 2)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        src = record.get("source") or {}
        name, version = record["name"], record["version"]
        run = find_run(client, tracking.get("mlflow_experiment") or "zeroplane", src.get("job_id", ""))
        tags = {"zeroplane.name": name, "zeroplane.version": version, "zeroplane.uri": record.get("uri", ""),
                "zeroplane.job_id": src.get("job_id", ""), "zeroplane.checkpoint_step": str(src.get("step")),
                "zeroplane.checkpoint": src.get("checkpoint", "")}
        try:
            client.create_registered_model(name, description="Versions registered by zeroplane promote.")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if run is not None:
            pointer = f"zeroplane/versions/{name}/{version}"
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "zeroplane_version.json"), "w") as f:
                    json.dump({k: record.get(k) for k in ("name", "version", "uri", "source", "registered_at")}, f)
                client.log_artifact(run.info.run_id, os.path.join(d, "zeroplane_version.json"), pointer)
            source, run_id = f"{run.info.artifact_uri.rstrip('/')}/{pointer}", run.info.run_id
        else:  # the job did not track to MLflow: point at the version folder itself
            say(f"mlflow: no run tagged {TAG_JOB_ID}={src.get('job_id')}; the model version has no source run")
            source, run_id = record.get("uri", ""), None
        mv = client.create_model_version(name, source, run_id=run_id, tags=tags,
                                         description=f"zeroplane {name}:{version} from {src.get('job_id')} "
                                                     f"step {src.get('step')}", await_creation_for=0)
        say(f"mlflow: registered model {name} version {mv.version} -> zeroplane {name}:{version}")
        record["mlflow"] = {"registered_model": name, "version": int(mv.version), "run_id": run_id, "uri": uri}
    except Exception as e:  # zeroplane's version stands; MLflow is the extra
        say(f"mlflow: recording {record.get('name')}:{record.get('version')} at {uri} failed "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); the zeroplane version stands")
    return record


def metric_history(uri: str, run_id: str, key: str) -> List[Tuple[int, float]]:
    """``[(step, value), …]`` of one metric of a run, in step order (every logged value)."""
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))
